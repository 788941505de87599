"""What the fine-tuned head stages share (LongformerForSequenceClassification, LongformerForTokenClassification
and their BigBird twins): Spark NLP's Params (caseSensitive, maxSentenceLength, batchSize), the artifact and its
head (refused in one line when it has none, or one of the other kind), persistence with the artifact's model_id
checked on load, and the run of each annotation of the first input column through `core.batches.embed_texts`
(per-note fault isolation: a text that fails alone gets its reason, the others their results).
"""

from __future__ import annotations

import numpy as np

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.core.registry import resolve
from clinlong.pipelines.spark.annotation import DOCUMENT, TOKEN
from clinlong.pipelines.spark.stages._base import AnnotatorStage, HasModel

FAMILY_PREFIX = {"longformer": "Longformer", "big_bird": "BigBird"}


def score_text(x) -> str:
    """A score as Spark NLP writes it in metadata (a float's shortest text, e.g. '0.8754321')."""
    return str(np.float32(x))


class HeadStage(HasModel, AnnotatorStage):
    """Base of the head stages; subclasses set `headKind` ("sequence" or "token") and `modelType`."""

    modelType = "longformer"
    headKind = "sequence"
    inputAnnotatorTypes = ((DOCUMENT,), (TOKEN,))

    def __init__(self):
        super().__init__()
        self._setDefault(inputCols=["document", "token"])

    @classmethod
    def pretrained(cls, name: str, lang: str = "en"):
        """The artifact registered as `name` under $CLINLONG_MODELS, or an artifact directory (core.registry)."""
        return cls().setModelPath(str(resolve(name, lang)))

    def setModelPath(self, path: str):
        from clinlong.pipelines.core.head_runs import check_head

        art = Artifact.open(path)
        check_head(art, self.headKind, type(self).__name__)
        if art.model_type != self.modelType:
            other = type(self).__name__.replace(
                FAMILY_PREFIX[self.modelType], FAMILY_PREFIX.get(art.model_type, art.model_type), 1
            )
            raise ValueError(
                f"{path} holds a {art.model_type} model; {type(self).__name__} runs {self.modelType} "
                f"models: use {other}"
            )
        return self._set(modelPath=str(art.path.resolve()), modelId=art.model_id)

    def getLabels(self) -> list[str]:
        """The head's labels in id order (Spark NLP's getClasses)."""
        return list(self._artifact().head.labels)

    def getClasses(self) -> list[str]:
        return self.getLabels()

    def _artifact(self) -> Artifact:
        from clinlong.pipelines.core.head_runs import check_head

        if not self.isSet(self.modelPath):
            raise ValueError(f"{type(self).__name__} has no model: use .pretrained(name, lang) or .setModelPath(dir)")
        art = Artifact.open(self.getOrDefault(self.modelPath), verify=False)
        check_head(art, self.headKind, type(self).__name__)
        return art

    def options(self) -> EmbedOptions:
        return self._model_options()


def run_segments(path: str, opts: EmbedOptions, docs: list) -> tuple[list[tuple[int, int, dict]], list]:
    """Each annotation of every row's first input column, run through the head (one note each, isolated):
    [(row, position in the row, annotation)] and their NoteResults, in order."""
    from clinlong.pipelines.core.batches import embed_texts, embedder
    from clinlong.pipelines.core.head_runs import HeadRunner

    runner = embedder(path, opts, engine=HeadRunner)  # the process's one model cache, the head's file verified too
    segments = [(r, k, d) for r, ds in enumerate(docs) for k, d in enumerate(ds or [])]
    return segments, embed_texts(runner, [d["result"] for _, _, d in segments])
