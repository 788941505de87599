"""BigBirdEmbeddings: [document or sentence, token] → `word_embeddings` with a BigBird artifact
(Clinical-BigBird). The same Params, persistence and output as LongformerEmbeddings; only the family of
the artifact it accepts differs (the engine, packing and runtime are shared, core.model holds both
attentions). Spark NLP has no BigBird embeddings annotator; the name follows its convention.
"""

from __future__ import annotations

from clinlong.pipelines.spark.stages.longformer_embeddings import LongformerEmbeddings


class BigBirdEmbeddings(LongformerEmbeddings):
    modelType = "big_bird"
    defaultModel = ("clinical_bigbird", "en")
