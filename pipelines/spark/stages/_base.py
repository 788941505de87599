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

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import MAX_LENGTH, EmbedOptions
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


class HasModel(Params):
    """The Params of a stage that runs an exported artifact (Spark NLP's names: caseSensitive, maxSentenceLength,
    batchSize), our `precision`, and the artifact's path and model_id; `load` refuses an artifact whose model_id
    differs from the one the stage was saved with. Defaults: case-sensitive, 4,096 pieces, 8 sequences a call."""

    modelPath = Param(Params._dummy(), "modelPath", "native artifact directory", TypeConverters.toString)
    modelId = Param(
        Params._dummy(),
        "modelId",
        "the artifact's model_id (checked when a saved stage is loaded)",
        TypeConverters.toString,
    )
    caseSensitive = Param(Params._dummy(), "caseSensitive", "keep case before BPE", TypeConverters.toBoolean)
    maxSentenceLength = Param(
        Params._dummy(), "maxSentenceLength", f"max BPE pieces per sequence (<= {MAX_LENGTH})", TypeConverters.toInt
    )
    batchSize = Param(Params._dummy(), "batchSize", "max sequences per model call", TypeConverters.toInt)
    precision = Param(
        Params._dummy(),
        "precision",
        "auto (bf16 on GPUs and bf16 CPUs, else fp32), fp32, bf16 or fp16",
        TypeConverters.toString,
    )

    def __init__(self):
        super().__init__()
        self._setDefault(
            caseSensitive=True, maxSentenceLength=MAX_LENGTH, batchSize=8, precision=EmbedOptions.precision
        )

    @classmethod
    def load(cls, path: str):
        """Spark ML persistence's load, refusing an artifact other than the one the stage was saved with."""
        stage = super().load(path)
        if stage.isSet(stage.modelPath) and stage.isSet(stage.modelId):
            found = Artifact.open(stage.getOrDefault(stage.modelPath), verify=False).model_id
            if found != stage.getOrDefault(stage.modelId):
                raise ValueError(
                    f"the saved {cls.__name__} at {path} was built with model "
                    f"{stage.getOrDefault(stage.modelId)}, but {stage.getOrDefault(stage.modelPath)} now "
                    f"holds {found}; put that artifact back there or call setModelPath on another copy"
                )
        return stage

    def setCaseSensitive(self, value: bool):
        return self._set(caseSensitive=value)

    def getCaseSensitive(self) -> bool:
        return self.getOrDefault(self.caseSensitive)

    def setMaxSentenceLength(self, value: int):
        if not 3 <= value <= MAX_LENGTH:
            raise ValueError(f"maxSentenceLength must be between 3 and {MAX_LENGTH}, got {value}")
        return self._set(maxSentenceLength=value)

    def getMaxSentenceLength(self) -> int:
        return self.getOrDefault(self.maxSentenceLength)

    def setBatchSize(self, value: int):
        return self._set(batchSize=value)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def setPrecision(self, value: str):
        return self._set(precision=value)

    def getPrecision(self) -> str:
        return self.getOrDefault(self.precision)

    def _model_options(self, **extra) -> EmbedOptions:
        """The engine options these Params give (note context: each annotation of the first input is a note)."""
        return EmbedOptions(
            context="note",
            max_length=self.getMaxSentenceLength(),
            case_sensitive=self.getCaseSensitive(),
            batch_size=self.getBatchSize(),
            precision=self.getPrecision(),
            **extra,
        )


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
        raise AttributeError(
            f"{type(self).__name__} is a clinlong stage that runs in Python, with no JVM object: "
            "Spark NLP's LightPipeline runs JVM stages only; use PipelineModel.transform(df), or "
            "clinlong.pipelines.load(...).predict(texts) for in-process annotation"
        )

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
                raise ValueError(
                    f"{type(self).__name__}: input column {c!r} holds {found or 'no annotations'}, "
                    f"not {' or '.join(allowed)}; pass setInputCols(...) a column of that type"
                )

    def _column_metadata(self) -> dict:
        """Spark NLP's metadata of the output column (embeddings stages add dimension and storage ref)."""
        return column_metadata(self.outputAnnotatorType)

    def _map_batches(
        self, df: DataFrame, fn: Callable[[pa.RecordBatch], pa.Array], metadata: dict | None = None
    ) -> DataFrame:
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
