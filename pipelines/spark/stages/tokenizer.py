"""Tokenizer: sentence (or document) annotations → `token` annotations carrying their sentence index."""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import DataFrame

from clinlong.pipelines.core.text import tokenize
from clinlong.pipelines.spark.annotation import DOCUMENT, TOKEN, annotations_array
from clinlong.pipelines.spark.stages._base import AnnotatorStage


class Tokenizer(AnnotatorStage):
    inputAnnotatorTypes = ((DOCUMENT,),)
    outputAnnotatorType = TOKEN

    def __init__(self):
        super().__init__()
        self._setDefault(inputCols=["sentence"], outputCol="token")

    def _transform(self, df: DataFrame) -> DataFrame:
        self._check_inputs(df)
        col = self.getInputCols()[0]

        def tokens(batch: pa.RecordBatch) -> pa.Array:
            rows = []
            for sents in batch.column(col).to_pylist():
                out = []
                for i, s in enumerate(sents or []):
                    text, base = s["result"], s["begin"]
                    idx = dict(s["metadata"] or ()).get("sentence", str(i))
                    for b, e, _ in tokenize(text, [(0, len(text) - 1)]):
                        out.append((TOKEN, base + b, base + e, text[b : e + 1], {"sentence": idx}))
                rows.append(out)
            return annotations_array(rows)

        return self._map_batches(df, tokens)
