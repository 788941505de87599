"""What the fine-tuned head stages share (LongformerForSequenceClassification, LongformerForTokenClassification
and their BigBird twins): Spark NLP's Params (caseSensitive, maxSentenceLength, batchSize), the artifact and its
head (refused in one line when it has none, or one of the other kind), persistence with the artifact's model_id
checked on load, and the run of each annotation of the first input column through `core.batches.embed_texts`
(per-note fault isolation: a text that fails alone gets its reason, the others their results).
"""
from __future__ import annotations

import numpy as np
from pyspark.ml.param import Param, Params, TypeConverters

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import MAX_LENGTH, EmbedOptions
from clinlong.pipelines.core.registry import resolve
from clinlong.pipelines.spark.annotation import DOCUMENT, TOKEN
from clinlong.pipelines.spark.stages._base import AnnotatorStage

FAMILY_PREFIX = {"longformer": "Longformer", "big_bird": "BigBird"}


def score_text(x) -> str:
    """A score as Spark NLP writes it in metadata (a float's shortest text, e.g. '0.8754321')."""
    return str(np.float32(x))


class HeadStage(AnnotatorStage):
    """Base of the head stages; subclasses set `headKind` ("sequence" or "token") and `modelType`."""

    modelType = "longformer"
    headKind = "sequence"
    inputAnnotatorTypes = ((DOCUMENT,), (TOKEN,))
    modelPath = Param(Params._dummy(), "modelPath", "native artifact directory (a fine-tuned head's export)",
                      TypeConverters.toString)
    modelId = Param(Params._dummy(), "modelId", "the artifact's model_id (checked when a saved stage is loaded)",
                    TypeConverters.toString)
    caseSensitive = Param(Params._dummy(), "caseSensitive", "keep case before BPE", TypeConverters.toBoolean)
    maxSentenceLength = Param(Params._dummy(), "maxSentenceLength", f"max BPE pieces per sequence (<= {MAX_LENGTH})",
                              TypeConverters.toInt)
    batchSize = Param(Params._dummy(), "batchSize", "max sequences per model call", TypeConverters.toInt)
    precision = Param(Params._dummy(), "precision", "auto (bf16 on GPUs and bf16 CPUs, else fp32), fp32, bf16 or fp16",
                      TypeConverters.toString)

    def __init__(self):
        super().__init__()
        self._setDefault(inputCols=["document", "token"], caseSensitive=True, maxSentenceLength=MAX_LENGTH,
                         batchSize=8, precision=EmbedOptions.precision)

    @classmethod
    def load(cls, path: str):
        """Spark ML persistence's load, refusing an artifact other than the one the stage was saved with."""
        stage = super().load(path)
        if stage.isSet(stage.modelPath) and stage.isSet(stage.modelId):
            found = Artifact.open(stage.getOrDefault(stage.modelPath), verify=False).model_id
            if found != stage.getOrDefault(stage.modelId):
                raise ValueError(f"the saved {cls.__name__} at {path} was built with model "
                                 f"{stage.getOrDefault(stage.modelId)}, but {stage.getOrDefault(stage.modelPath)} now "
                                 f"holds {found}; put that artifact back there or call setModelPath on another copy")
        return stage

    @classmethod
    def pretrained(cls, name: str, lang: str = "en"):
        """The artifact registered as `name` under $CLINLONG_MODELS, or an artifact directory (core.registry)."""
        return cls().setModelPath(str(resolve(name, lang)))

    def setModelPath(self, path: str):
        from clinlong.pipelines.core.head_runs import check_head

        art = Artifact.open(path)
        check_head(art, self.headKind, type(self).__name__)
        if art.model_type != self.modelType:
            other = type(self).__name__.replace(FAMILY_PREFIX[self.modelType],
                                                FAMILY_PREFIX.get(art.model_type, art.model_type), 1)
            raise ValueError(f"{path} holds a {art.model_type} model; {type(self).__name__} runs {self.modelType} "
                             f"models: use {other}")
        return self._set(modelPath=str(art.path.resolve()), modelId=art.model_id)

    def getLabels(self) -> list[str]:
        """The head's labels in id order (Spark NLP's getClasses)."""
        return list(self._artifact().head.labels)

    def getClasses(self) -> list[str]:
        return self.getLabels()

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

    def _artifact(self) -> Artifact:
        from clinlong.pipelines.core.head_runs import check_head

        if not self.isSet(self.modelPath):
            raise ValueError(f"{type(self).__name__} has no model: use .pretrained(name, lang) or .setModelPath(dir)")
        art = Artifact.open(self.getOrDefault(self.modelPath), verify=False)
        check_head(art, self.headKind, type(self).__name__)
        return art

    def options(self) -> EmbedOptions:
        return EmbedOptions(context="note", max_length=self.getMaxSentenceLength(),
                            case_sensitive=self.getCaseSensitive(), batch_size=self.getBatchSize(),
                            precision=self.getPrecision())


def run_segments(path: str, opts: EmbedOptions, docs: list) -> tuple[list[tuple[int, int, dict]], list]:
    """Each annotation of every row's first input column, run through the head (one note each, isolated):
    [(row, position in the row, annotation)] and their NoteResults, in order."""
    from clinlong.pipelines.core.batches import embed_texts
    from clinlong.pipelines.core.head_runs import head_runner

    runner = head_runner(path, opts)
    segments = [(r, k, d) for r, ds in enumerate(docs) for k, d in enumerate(ds or [])]
    return segments, embed_texts(runner, [d["result"] for _, _, d in segments])
