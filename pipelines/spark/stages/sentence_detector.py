"""SentenceDetector: `document` annotations → one `document` annotation per sentence (clinical rules)."""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import DataFrame

from clinlong.pipelines.core.text import detect_sentences
from clinlong.pipelines.spark.annotation import DOCUMENT, annotations_array
from clinlong.pipelines.spark.stages._base import AnnotatorStage


class SentenceDetector(AnnotatorStage):
    inputAnnotatorTypes = ((DOCUMENT,),)
    outputAnnotatorType = DOCUMENT

    def __init__(self):
        super().__init__()
        self._setDefault(inputCols=["document"], outputCol="sentence")

    def _transform(self, df: DataFrame) -> DataFrame:
        self._check_inputs(df)
        col = self.getInputCols()[0]

        def sentences(batch: pa.RecordBatch) -> pa.Array:
            rows = []
            for docs in batch.column(col).to_pylist():
                out, i = [], 0
                for d in docs or []:
                    text, base = d["result"], d["begin"]
                    for b, e in detect_sentences(text):
                        out.append((DOCUMENT, base + b, base + e, text[b : e + 1], {"sentence": str(i)}))
                        i += 1
                rows.append(out)
            return annotations_array(rows)

        return self._map_batches(df, sentences)
