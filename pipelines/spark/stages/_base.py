"""Common machinery of our Spark ML annotators: Spark NLP-style params, Arrow-batch transforms, persistence."""
from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
from pyspark.ml import Transformer
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from clinlong.pipelines.spark.annotation import ANNOTATIONS, ARROW_ANNOTATIONS


def map_batch(batch: pa.RecordBatch, fn: Callable[[pa.RecordBatch], pa.Array], keep: list[str], out: str):
    """`batch`'s `keep` columns and the annotation column `fn` computes, as one or more batches: a batch
    whose annotations would overflow one Arrow array (int32 offsets; Spark's Arrow batches hold 10,000
    rows by default) is split in halves until each part fits."""
    try:
        col = fn(batch)
    except OverflowError:
        if batch.num_rows < 2:
            raise
        half = batch.num_rows // 2
        yield from map_batch(batch.slice(0, half), fn, keep, out)
        yield from map_batch(batch.slice(half), fn, keep, out)
        return
    assert col.type == ARROW_ANNOTATIONS
    yield pa.RecordBatch.from_arrays([batch.column(n) for n in keep] + [col], names=keep + [out])


class AnnotatorStage(Transformer, DefaultParamsReadable, DefaultParamsWritable):
    """A Transformer with Spark NLP's `setInputCols`/`setOutputCol` surface, saved with Spark ML persistence."""

    inputCols = Param(Params._dummy(), "inputCols", "input annotation columns", TypeConverters.toListString)
    outputCol = Param(Params._dummy(), "outputCol", "output annotation column", TypeConverters.toString)

    def setInputCols(self, *cols):
        cols = list(cols[0]) if len(cols) == 1 and isinstance(cols[0], (list, tuple)) else list(cols)
        return self._set(inputCols=cols)

    def getInputCols(self) -> list[str]:
        return self.getOrDefault(self.inputCols)

    def setOutputCol(self, value: str):
        return self._set(outputCol=value)

    def getOutputCol(self) -> str:
        return self.getOrDefault(self.outputCol)

    def _check_inputs(self, df: DataFrame) -> None:
        for c in self.getInputCols():
            if c not in df.columns:
                raise ValueError(f"{type(self).__name__}: input column {c!r} is missing; columns are {df.columns}")

    def _column_metadata(self) -> dict:
        raise NotImplementedError

    def _map_batches(self, df: DataFrame, fn: Callable[[pa.RecordBatch], pa.Array]) -> DataFrame:
        """Append `outputCol` computed by `fn` from each Arrow batch (no per-row UDF)."""
        out = self.getOutputCol()
        schema = T.StructType([f for f in df.schema.fields if f.name != out] + [T.StructField(out, ANNOTATIONS)])
        keep = [f.name for f in df.schema.fields if f.name != out]

        def run(batches):
            for batch in batches:
                yield from map_batch(batch, fn, keep, out)

        result = df.mapInArrow(run, schema)
        return result.withColumn(out, F.col(out).alias(out, metadata=self._column_metadata()))
