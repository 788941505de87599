"""LongformerForSequenceClassification: [document or sentence, token] → `category`, as Spark NLP's annotator.

The artifact is the export of a fine-tuned *ForSequenceClassification checkpoint (its head in the manifest).
Each annotation of the first input column is BPE-encoded and run as one sequence, with global attention on <s>
as Hugging Face's class runs it (a text past maxSentenceLength runs as the embeddings' overlapping windows, each
with its own <s>, and the windows' logits are averaged; Spark NLP truncates). Output, as Spark NLP's:
- one `category` annotation per input annotation: begin/end of that annotation, `result` the top label, metadata
  {"sentence": its index, "<label>": "<score>" for every label};
- coalesceSentences=True: the scores averaged over the row's annotations, one annotation anchored at the first
  one (Spark NLP anchors it there too);
- activation "sigmoid" (the default for a multi_label_classification head, or set): one annotation per label
  whose score is over `threshold` (strictly), each with every label's score; none when no label passes.
  "softmax": the top label. The head's own activation is the default (Spark NLP's is softmax unless set).
The token column is checked (Spark NLP's inputs) but not read: the text is the annotation's. A text that cannot
be run (empty, or failing alone in the model step) gives one annotation with an empty `result` and its
`skip_reason`; the other rows and annotations are unaffected.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame

from clinlong.pipelines.core.heads import SCORE_ACTIVATIONS, pool_windows, probabilities
from clinlong.pipelines.core.options import check_choice
from clinlong.pipelines.spark.annotation import CATEGORY, annotations_array
from clinlong.pipelines.spark.stages._head_stage import HeadStage, run_segments, score_text


class LongformerForSequenceClassification(HeadStage):
    headKind = "sequence"
    outputAnnotatorType = CATEGORY
    coalesceSentences = Param(
        Params._dummy(),
        "coalesceSentences",
        "one class per document by averaging the probabilities of all its sentences",
        TypeConverters.toBoolean,
    )
    activation = Param(
        Params._dummy(),
        "activation",
        "softmax or sigmoid (default: the head's; sigmoid for multi-label heads)",
        TypeConverters.toString,
    )
    threshold = Param(Params._dummy(), "threshold", "sigmoid: labels whose score is over it", TypeConverters.toFloat)

    def __init__(self):
        super().__init__()
        self._setDefault(outputCol="class", coalesceSentences=False, threshold=0.5)

    def setCoalesceSentences(self, value: bool):
        return self._set(coalesceSentences=value)

    def getCoalesceSentences(self) -> bool:
        return self.getOrDefault(self.coalesceSentences)

    def setActivation(self, value: str):
        check_choice("activation", value, SCORE_ACTIVATIONS)
        return self._set(activation=value)

    def getActivation(self) -> str:
        return self.getOrDefault(self.activation) if self.isSet(self.activation) else self._artifact().head.activation

    def setThreshold(self, value: float):
        return self._set(threshold=value)

    def getThreshold(self) -> float:
        return self.getOrDefault(self.threshold)

    def _transform(self, df: DataFrame) -> DataFrame:
        self._check_inputs(df)
        art = self._artifact()
        opts = self.options().validate(art)
        path, labels = str(art.path), list(art.head.labels)
        activation, threshold, coalesce = self.getActivation(), self.getThreshold(), self.getCoalesceSentences()
        doc_col = self.getInputCols()[0]

        def annotations(anchor: dict, k: int, scores: np.ndarray) -> list[tuple]:
            meta = {
                "sentence": dict(anchor["metadata"] or ()).get("sentence", str(k)),
                **{lab: score_text(s) for lab, s in zip(labels, scores)},
            }
            chosen = (
                [labels[int(np.argmax(scores))]]
                if activation == "softmax"
                else [lab for lab, s in zip(labels, scores) if s > threshold]
            )
            return [(CATEGORY, anchor["begin"], anchor["end"], lab, dict(meta)) for lab in chosen]

        def skipped(anchor: dict, k: int, reason: str) -> tuple:
            return (
                CATEGORY,
                anchor["begin"],
                anchor["end"],
                "",
                {"sentence": dict(anchor["metadata"] or ()).get("sentence", str(k)), "skip_reason": reason},
            )

        def classify(batch: pa.RecordBatch) -> pa.Array:
            docs = batch.column(doc_col).to_pylist()
            segments, results = run_segments(path, opts, docs)
            rows: list[list[tuple]] = [[] for _ in docs]
            by_row: dict[int, list] = {}
            for (r, k, d), res in zip(segments, results):
                by_row.setdefault(r, []).append((k, d, res))
            for r, items in by_row.items():
                ok = [
                    (k, d, probabilities(pool_windows(res.window_logits), activation))
                    for k, d, res in items
                    if res.skip_reason is None
                ]
                if coalesce:
                    k, d, _ = items[0]
                    if ok:
                        rows[r] += annotations(d, k, np.mean([s for _, _, s in ok], axis=0, dtype=np.float64))
                    else:
                        rows[r].append(skipped(d, k, items[0][2].skip_reason))
                    continue
                scores = {k: s for k, _, s in ok}
                for k, d, res in items:
                    rows[r] += annotations(d, k, scores[k]) if k in scores else [skipped(d, k, res.skip_reason)]
            return annotations_array(rows)

        return self._map_batches(df, classify)


class BigBirdForSequenceClassification(LongformerForSequenceClassification):
    """The same stage over a BigBird artifact (Clinical-BigBird fine-tuned: [CLS]'s vector, no global attention)."""

    modelType = "big_bird"
