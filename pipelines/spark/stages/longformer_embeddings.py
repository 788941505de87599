"""LongformerEmbeddings: [document or sentence, token] → `word_embeddings`, one vector per token.

Each annotation of the first input column is encoded and run as one sequence, so feeding the
`document` column gives note context (every token sees its neighbours across sentences; notes past
maxSentenceLength run as overlapping windows) and feeding `sentence` gives Spark NLP's per-sentence
behaviour. A token's vector is its first BPE piece's. A token that no BPE piece covers (its characters
are dropped by a SentencePiece normalizer), and every token of an annotation that cannot be embedded,
keeps its annotation with an empty `embeddings` array and the reason in its metadata (`skip_reason`):
no vector is made up. Spark NLP's annotators that pool token vectors need a vector in every annotation
(SentenceEmbeddings 5.5.3 fails on an empty one: ArrayIndexOutOfBoundsException); for them,
`setKeepTokensWithoutVector(False)` leaves such tokens out of the output column (they stay in the token
column, so the two columns say which tokens have no vector).

maxSentenceLength accepts 3 to 4096 (at most the artifact's max length, checked at transform); the
window overlap of longer notes follows it (pipelines.core.windows.default_overlap).

Saved with Spark ML persistence, the stage records the artifact's path and its `model_id`, and loading
it refuses an artifact whose model_id differs (one re-exported in place, or another model at that
path). The artifact itself is not copied into the saved stage (unlike Spark NLP's models): keep it at
that path on every executor, or `setModelPath` after loading.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import TOKEN_NO_PIECE, EmbedOptions
from clinlong.pipelines.core.registry import resolve
from clinlong.pipelines.spark.annotation import DOCUMENT, TOKEN, WORD_EMBEDDINGS, annotations_array, column_metadata
from clinlong.pipelines.spark.stages._base import AnnotatorStage, HasDimension, HasModel, HasStorageRef


class LongformerEmbeddings(HasModel, AnnotatorStage, HasDimension, HasStorageRef):
    modelType = "longformer"  # the artifact family this stage runs (core.model.MODEL_TYPES)
    defaultModel = ("clinical_longformer", "en")
    inputAnnotatorTypes = ((DOCUMENT,), (TOKEN,))
    outputAnnotatorType = WORD_EMBEDDINGS
    tokenVector = Param(
        Params._dummy(), "tokenVector", "first (Spark NLP) or mean of the token's pieces", TypeConverters.toString
    )
    keepTokensWithoutVector = Param(
        Params._dummy(),
        "keepTokensWithoutVector",
        "True: a token with no vector keeps its annotation, an empty embeddings array and "
        "its skip_reason; False: it is left out (for Spark NLP's SentenceEmbeddings)",
        TypeConverters.toBoolean,
    )

    def __init__(self):
        super().__init__()
        self._setDefault(
            inputCols=["document", "token"], outputCol="embeddings", tokenVector="first", keepTokensWithoutVector=True
        )

    @classmethod
    def pretrained(cls, name: str | None = None, lang: str | None = None) -> "LongformerEmbeddings":
        """The artifact registered as `name` under $CLINLONG_MODELS (see core.registry); by default
        the stage's own model (clinical_longformer, clinical_bigbird)."""
        return cls().setModelPath(str(resolve(name or cls.defaultModel[0], lang or cls.defaultModel[1])))

    def setModelPath(self, path: str):
        art = Artifact.open(path)
        if art.model_type != self.modelType:
            other = {"longformer": "LongformerEmbeddings", "big_bird": "BigBirdEmbeddings"}.get(
                art.model_type, "another stage"
            )
            raise ValueError(
                f"{path} holds a {art.model_type} model; {type(self).__name__} runs {self.modelType} "
                f"models: use {other}"
            )
        return self._set(modelPath=str(art.path.resolve()), modelId=art.model_id, dimension=art.dimension)

    def setTokenVector(self, value: str):
        return self._set(tokenVector=value)

    def setKeepTokensWithoutVector(self, value: bool):
        return self._set(keepTokensWithoutVector=value)

    def getKeepTokensWithoutVector(self) -> bool:
        return self.getOrDefault(self.keepTokensWithoutVector)

    def _artifact(self) -> Artifact:
        if not self.isSet(self.modelPath):
            raise ValueError(f"{type(self).__name__} has no model: use .pretrained(name, lang) or .setModelPath(dir)")
        return Artifact.open(self.getOrDefault(self.modelPath), verify=False)

    def getStorageRef(self) -> str:
        return self.getOrDefault(self.storageRef) if self.isSet(self.storageRef) else self._artifact().model_id

    def options(self) -> EmbedOptions:
        return self._model_options(token_vector=self.getOrDefault(self.tokenVector))

    def _column_metadata(self) -> dict:
        return column_metadata(WORD_EMBEDDINGS, self._artifact().dimension, self.getStorageRef())

    def _transform(self, df: DataFrame) -> DataFrame:
        self._check_inputs(df)
        art = self._artifact()
        opts = self.options().validate(art)
        path, dim = str(art.path), art.dimension
        doc_col, tok_col = self.getInputCols()[:2]
        keep_empty = self.getKeepTokensWithoutVector()

        def embed(batch: pa.RecordBatch) -> pa.Array:
            from clinlong.pipelines.core.batches import embed_texts, embedder

            emb = embedder(path, opts)
            docs = batch.column(doc_col).to_pylist()
            toks = batch.column(tok_col).to_pylist()
            segments = [(r, d) for r, ds in enumerate(docs) for d in (ds or [])]
            results = embed_texts(emb, [d["result"] for _, d in segments])  # a note failing alone: its reason
            rows: list[list[tuple]] = [[] for _ in docs]
            vectors = []
            for (r, d), res in zip(segments, results):
                b0, e0 = d["begin"], d["end"]
                inside = [t for t in (toks[r] or []) if b0 <= t["begin"] <= e0]
                if not inside:
                    continue
                if res.skip_reason is not None:  # (a text the checks refuse, or one with no BPE piece)
                    vecs = np.full((len(inside), dim), np.nan, np.float32)
                    why = [res.skip_reason] * len(inside)
                else:
                    res.tokens = [(t["begin"] - b0, t["end"] - b0, 0) for t in inside]
                    vecs = res.token_vectors(opts.token_vector)
                    why = [TOKEN_NO_PIECE if m else None for m in np.isnan(vecs).any(axis=1)]
                if not keep_empty:
                    kept = [i for i, reason in enumerate(why) if reason is None]
                    vecs, inside, why = vecs[kept], [inside[i] for i in kept], [why[i] for i in kept]
                vectors.append(vecs)
                for t, reason in zip(inside, why):
                    meta = {
                        "sentence": dict(t["metadata"] or ()).get("sentence", "0"),
                        "token": t["result"],
                        "pieceId": "-1",
                        "isWordStart": "true",
                    }
                    if reason is not None:
                        meta["skip_reason"] = reason
                    rows[r].append((WORD_EMBEDDINGS, t["begin"], t["end"], t["result"], meta))
            # Segments are listed row by row, so vectors are already in the rows' annotation order.
            flat = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
            return annotations_array(rows, flat, dim)

        return self._map_batches(df, embed)
