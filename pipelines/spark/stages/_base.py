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

from clinlong.pipelines.spark.annotation import ANNOTATIONS, ARROW_ANNOTATIONS, column_metadata


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


class HasStorageRef(Params):
    """Spark NLP's `storageRef`: which embeddings a vector column holds (defaults to the model_id)."""

    storageRef = Param(Params._dummy(), "storageRef", "embeddings reference", TypeConverters.toString)

    def setStorageRef(self, value: str):
        return self._set(storageRef=value)


class HasDimension(Params):
    """Spark NLP's `dimension`: the vector size of an embeddings column."""

    dimension = Param(Params._dummy(), "dimension", "vector size", TypeConverters.toInt)

    def setDimension(self, value: int):
        return self._set(dimension=value)

    def getDimension(self) -> int:
        return self.getOrDefault(self.dimension)


class AnnotatorStage(Transformer, DefaultParamsReadable, DefaultParamsWritable):
    """A Transformer with Spark NLP's `setInputCols`/`setOutputCol` surface, saved with Spark ML persistence.

    Like Spark NLP's annotators, each stage declares the annotator type(s) each input column must hold
    (`inputAnnotatorTypes`, checked against the columns' metadata) and the type it outputs."""

    inputAnnotatorTypes: tuple[tuple[str, ...], ...] = ()
    outputAnnotatorType = ""

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

    @property
    def _to_java(self):
        """Our stages run in Python and have no JVM twin. Spark NLP's LightPipeline (which hands the JVM the
        PipelineModel's Java object, stage by stage, and would silently skip an unknown stage there) is
        refused in one line. A property raising AttributeError keeps `hasattr(stage, "_to_java")` False,
        as pyspark's tuning persistence and Params.params read it."""
        raise AttributeError(f"{type(self).__name__} is a clinlong stage that runs in Python, with no JVM object: "
                             "Spark NLP's LightPipeline runs JVM stages only; use PipelineModel.transform(df), or "
                             "clinlong.pipelines.load(...).predict(texts) for in-process annotation")

    def _check_inputs(self, df: DataFrame) -> None:
        cols = self.getInputCols()
        types = self.inputAnnotatorTypes
        if len(types) == 1:  # one declaration for every input column (EmbeddingsFinisher)
            types = types * len(cols)
        for c, allowed in zip(cols, types or [()] * len(cols)):
            if c not in df.columns:
                raise ValueError(f"{type(self).__name__}: input column {c!r} is missing; columns are {df.columns}")
            found = (df.schema[c].metadata or {}).get("annotatorType")
            if allowed and found not in allowed:
                raise ValueError(f"{type(self).__name__}: input column {c!r} holds {found or 'no annotations'}, "
                                 f"not {' or '.join(allowed)}; pass setInputCols(...) a column of that type")

    def _column_metadata(self) -> dict:
        """Spark NLP's metadata of the output column (embeddings stages add dimension and storage ref)."""
        return column_metadata(self.outputAnnotatorType)

    def _map_batches(self, df: DataFrame, fn: Callable[[pa.RecordBatch], pa.Array],
                     metadata: dict | None = None) -> DataFrame:
        """Append `outputCol` computed by `fn` from each Arrow batch (no per-row UDF), with `metadata`
        (default: the stage's column metadata) on the new column."""
        out = self.getOutputCol()
        schema = T.StructType([f for f in df.schema.fields if f.name != out] + [T.StructField(out, ANNOTATIONS)])
        keep = [f.name for f in df.schema.fields if f.name != out]

        def run(batches):
            for batch in batches:
                yield from map_batch(batch, fn, keep, out)

        result = df.mapInArrow(run, schema)
        return result.withColumn(out, F.col(out).alias(out, metadata=metadata or self._column_metadata()))
