"""DocumentAssembler: raw text column → `document` annotations (one per row)."""

from __future__ import annotations

import pyarrow as pa
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame

from clinlong.pipelines.spark.annotation import DOCUMENT, annotations_array
from clinlong.pipelines.spark.stages._base import AnnotatorStage


class DocumentAssembler(AnnotatorStage):
    """Null, empty or whitespace-only text gives an empty annotation array (nothing to embed)."""

    inputAnnotatorTypes = ()
    outputAnnotatorType = DOCUMENT
    inputCol = Param(Params._dummy(), "inputCol", "raw text column", TypeConverters.toString)

    def __init__(self):
        super().__init__()
        self._setDefault(inputCol="text", outputCol="document")

    def setInputCol(self, value: str):
        return self._set(inputCol=value)

    def getInputCol(self) -> str:
        return self.getOrDefault(self.inputCol)

    def getInputCols(self) -> list[str]:
        return [self.getInputCol()]

    def _transform(self, df: DataFrame) -> DataFrame:
        self._check_inputs(df)
        col = self.getInputCol()

        def documents(batch: pa.RecordBatch) -> pa.Array:
            rows = [
                [] if not isinstance(t, str) or not t.strip() else [(DOCUMENT, 0, len(t) - 1, t, {"sentence": "0"})]
                for t in batch.column(col).to_pylist()
            ]
            return annotations_array(rows)

        return self._map_batches(df, documents)
