"""SentenceEmbeddings: [sentence or document, word_embeddings] → `sentence_embeddings` per span.

Spark NLP's behaviour: the AVERAGE (or SUM) of the token vectors inside each span. (The job and
`predict` compute the piece-level means the README defines instead.) Tokens with an empty `embeddings`
array (no vector) are left out; a span with no token vector gets an empty array and `skip_reason` in its
metadata, never a zero vector.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame

from clinlong.pipelines.core.engine import SENTENCE_NO_PIECE
from clinlong.pipelines.spark.annotation import (
    DOCUMENT,
    SENTENCE_EMBEDDINGS,
    WORD_EMBEDDINGS,
    annotations_array,
    column_metadata,
)
from clinlong.pipelines.spark.stages._base import AnnotatorStage, HasDimension, HasStorageRef


class SentenceEmbeddings(AnnotatorStage, HasDimension, HasStorageRef):
    inputAnnotatorTypes = ((DOCUMENT,), (WORD_EMBEDDINGS,))
    outputAnnotatorType = SENTENCE_EMBEDDINGS
    poolingStrategy = Param(Params._dummy(), "poolingStrategy", "AVERAGE or SUM", TypeConverters.toString)

    def __init__(self):
        super().__init__()
        self._setDefault(
            inputCols=["sentence", "embeddings"],
            outputCol="sentence_embeddings",
            poolingStrategy="AVERAGE",
            dimension=0,
            storageRef="",
        )

    def setPoolingStrategy(self, value: str):
        if value not in ("AVERAGE", "SUM"):
            raise ValueError(f"poolingStrategy must be AVERAGE or SUM, got {value!r}")
        return self._set(poolingStrategy=value)

    def _column_metadata(self, dim: int = 0, ref: str = "") -> dict:
        return column_metadata(
            SENTENCE_EMBEDDINGS,
            dim or self.getOrDefault(self.dimension) or None,
            ref or self.getOrDefault(self.storageRef) or None,
        )

    def _transform(self, df: DataFrame) -> DataFrame:
        self._check_inputs(df)
        span_col, emb_col = self.getInputCols()[:2]
        meta = df.schema[emb_col].metadata or {}
        # Unset dimension and storageRef come from the embeddings column, for this call only (no Param changes).
        dim = self.getOrDefault(self.dimension) if self.isSet(self.dimension) else int(meta.get("dimension") or 0)
        ref = self.getOrDefault(self.storageRef) if self.isSet(self.storageRef) else meta.get("ref", "")
        average = self.getOrDefault(self.poolingStrategy) == "AVERAGE"

        def pool(batch: pa.RecordBatch) -> pa.Array:
            rows, vectors = [], []
            for spans, embs in zip(batch.column(span_col).to_pylist(), batch.column(emb_col).to_pylist()):
                embs = embs or []
                embs = [e for e in embs if len(e["embeddings"] or ()) == dim]  # tokens without a vector: none
                begins = np.array([e["begin"] for e in embs], np.int64)
                mat = np.array([e["embeddings"] for e in embs], np.float32).reshape(len(embs), dim)
                out = []
                for i, s in enumerate(spans or []):
                    sel = (begins >= s["begin"]) & (begins <= s["end"])
                    meta = {
                        "sentence": dict(s["metadata"] or ()).get("sentence", str(i)),
                        "token": s["result"],
                        "pieceId": "-1",
                        "isWordStart": "true",
                    }
                    if sel.any():
                        v = mat[sel].sum(0)
                        vectors.append(v / int(sel.sum()) if average else v)
                    else:  # no token of the sentence has a vector: neither has the sentence
                        vectors.append(np.full(dim, np.nan, np.float32))
                        meta["skip_reason"] = SENTENCE_NO_PIECE
                    out.append((SENTENCE_EMBEDDINGS, s["begin"], s["end"], s["result"], meta))
                rows.append(out)
            flat = np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)
            return annotations_array(rows, flat, dim)

        return self._map_batches(df, pool, self._column_metadata(dim, ref))
