"""LongformerForTokenClassification: [document or sentence, token] → `named_entity`, as Spark NLP's annotator.

The artifact is the export of a fine-tuned *ForTokenClassification checkpoint. Each annotation of the first input
column is BPE-encoded and run as one sequence (past maxSentenceLength: the embeddings' overlapping windows, each
piece's logits from the window where it sits farthest from an edge; Spark NLP truncates). Every token inside it
gets one `named_entity` annotation, aligned one-to-one with the token column: begin/end of the token, `result` the
label (id2label) of the argmax of its first BPE piece's logits (Spark NLP's rule), metadata {"sentence", "word",
"confidence": the label's score, "<label>": "<score>" for every label}. A token that no BPE piece covers, and
every token of a text that cannot be run (it fails alone in the model step, or is empty), gets an empty `result`
and a `skip_reason`: no tag is made up (NerConverter reads an empty tag as outside any chunk).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame

from clinlong.pipelines.core.engine import TOKEN_NO_PIECE
from clinlong.pipelines.core.heads import probabilities
from clinlong.pipelines.spark.annotation import NAMED_ENTITY, annotations_array
from clinlong.pipelines.spark.stages._head_stage import HeadStage, run_segments, score_text


class LongformerForTokenClassification(HeadStage):
    headKind = "token"
    outputAnnotatorType = NAMED_ENTITY

    def __init__(self):
        super().__init__()
        self._setDefault(outputCol="ner")

    def _transform(self, df: DataFrame) -> DataFrame:
        from clinlong.pipelines.core.head_runs import token_logits

        self._check_inputs(df)
        art = self._artifact()
        opts = self.options().validate(art)
        path, labels, activation = str(art.path), list(art.head.labels), art.head.activation
        doc_col, tok_col = self.getInputCols()[:2]

        def tag(batch: pa.RecordBatch) -> pa.Array:
            docs = batch.column(doc_col).to_pylist()
            toks = batch.column(tok_col).to_pylist()
            segments, results = run_segments(path, opts, docs)
            rows: list[list[tuple]] = [[] for _ in docs]
            for (r, _, d), res in zip(segments, results):
                b0, e0 = d["begin"], d["end"]
                inside = [t for t in (toks[r] or []) if b0 <= t["begin"] <= e0]
                if not inside:
                    continue
                if res.skip_reason is None:
                    res.tokens = [(t["begin"] - b0, t["end"] - b0, 0) for t in inside]
                    logits = token_logits(res)
                    missing = np.isnan(logits).any(axis=1)
                    scores = probabilities(np.nan_to_num(logits), activation)
                for i, t in enumerate(inside):
                    meta = {"sentence": dict(t["metadata"] or ()).get("sentence", "0"), "word": t["result"]}
                    if res.skip_reason is not None or missing[i]:
                        meta["skip_reason"] = res.skip_reason or TOKEN_NO_PIECE
                        rows[r].append((NAMED_ENTITY, t["begin"], t["end"], "", meta))
                        continue
                    best = int(np.argmax(logits[i]))
                    meta["confidence"] = score_text(scores[i, best])
                    meta.update({lab: score_text(s) for lab, s in zip(labels, scores[i])})
                    rows[r].append((NAMED_ENTITY, t["begin"], t["end"], labels[best], meta))
            return annotations_array(rows)

        return self._map_batches(df, tag)


class BigBirdForTokenClassification(LongformerForTokenClassification):
    """The same stage over a BigBird artifact (a fine-tuned BigBirdForTokenClassification's export)."""

    modelType = "big_bird"
