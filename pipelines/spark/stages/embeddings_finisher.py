"""EmbeddingsFinisher: embeddings annotations → plain array<array<float>> (or ML vectors) columns."""

from __future__ import annotations

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from clinlong.pipelines.spark.annotation import SENTENCE_EMBEDDINGS, WORD_EMBEDDINGS
from clinlong.pipelines.spark.stages._base import AnnotatorStage


class EmbeddingsFinisher(AnnotatorStage):
    inputAnnotatorTypes = ((WORD_EMBEDDINGS, SENTENCE_EMBEDDINGS),)
    outputAnnotatorType = ""
    outputCols = Param(Params._dummy(), "outputCols", "output columns, one per input", TypeConverters.toListString)
    outputAsVector = Param(
        Params._dummy(), "outputAsVector", "array<vector> instead of array<array<float>>", TypeConverters.toBoolean
    )
    cleanAnnotations = Param(
        Params._dummy(), "cleanAnnotations", "drop the annotation columns", TypeConverters.toBoolean
    )

    def __init__(self):
        super().__init__()
        self._setDefault(inputCols=["embeddings"], outputAsVector=False, cleanAnnotations=False)

    def setOutputCols(self, *cols):
        cols = list(cols[0]) if len(cols) == 1 and isinstance(cols[0], (list, tuple)) else list(cols)
        return self._set(outputCols=cols)

    def getOutputCols(self) -> list[str]:
        if self.isSet(self.outputCols):
            return self.getOrDefault(self.outputCols)
        return [f"finished_{c}" for c in self.getInputCols()]

    def setOutputAsVector(self, value: bool):
        return self._set(outputAsVector=value)

    def setCleanAnnotations(self, value: bool):
        return self._set(cleanAnnotations=value)

    def _transform(self, df: DataFrame) -> DataFrame:
        self._check_inputs(df)
        ins, outs = self.getInputCols(), self.getOutputCols()
        if len(ins) != len(outs):
            raise ValueError(f"EmbeddingsFinisher: {len(ins)} input columns but {len(outs)} output columns")
        for i, o in zip(ins, outs):
            arrays = F.transform(F.col(i), lambda a: a["embeddings"])
            if self.getOrDefault(self.outputAsVector):
                from pyspark.ml.functions import array_to_vector

                arrays = F.transform(arrays, lambda v: array_to_vector(v))
            df = df.withColumn(o, arrays)
        if self.getOrDefault(self.cleanAnnotations):
            df = df.drop(*ins)
        return df
