"""clinlong.pipelines: Clinical-Longformer embeddings over note tables, in layers that import only downward.

- `core`  (no Spark): text rules, windows, the engine, the batch loop every front-end shares (`core.batches`),
  the model runtime, the artifact reader, the one model definition (`core.model`, also imported by export),
  output schemas, storage URIs (and the one place a Delta table is opened), the job's configuration, logging.
- `spark`: Spark ML stages, the `mapInArrow` glue, what executors run for Spark's sake (`spark.executor`),
  sources, progress, the one-liner `load()`.
- `delta`: the sink (delta-rs), the run plan (`RunPlan`: chunks, transaction ids, incremental), the writers
  (`delta.writers`: delta-rs with its Parquet files, delta-spark), maintenance.
- `jobs`:  `embed_notes`, its `summary`, `neighbours`; `pipelines/embed_notes.py` is the thin file
  spark-submit runs.

`import clinlong.pipelines` imports no Spark: the Spark-facing names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use (below)
    from clinlong.pipelines.spark.light import EmbeddingsPipeline, HeadPipeline, load
    from clinlong.pipelines.spark.stages import (
        BigBirdEmbeddings,
        BigBirdForSequenceClassification,
        BigBirdForTokenClassification,
        DocumentAssembler,
        EmbeddingsFinisher,
        LongformerEmbeddings,
        LongformerForSequenceClassification,
        LongformerForTokenClassification,
        NerConverter,
        SentenceDetector,
        SentenceEmbeddings,
        Tokenizer,
    )

# Fine-tuned heads (issue 24) and the chunker of their tags.
HEAD_STAGES = (
    "LongformerForSequenceClassification",
    "BigBirdForSequenceClassification",
    "LongformerForTokenClassification",
    "BigBirdForTokenClassification",
    "NerConverter",
)
_LAZY = {
    "load": "spark.light",
    "EmbeddingsPipeline": "spark.light",
    "HeadPipeline": "spark.light",
    **{
        name: "spark.stages"
        for name in (
            "DocumentAssembler",
            "SentenceDetector",
            "Tokenizer",
            "LongformerEmbeddings",
            "BigBirdEmbeddings",
            "SentenceEmbeddings",
            "EmbeddingsFinisher",
            *HEAD_STAGES,
        )
    },
}
__all__ = [
    "load",
    "EmbeddingsPipeline",
    "HeadPipeline",
    "DocumentAssembler",
    "SentenceDetector",
    "Tokenizer",
    "LongformerEmbeddings",
    "BigBirdEmbeddings",
    "SentenceEmbeddings",
    "EmbeddingsFinisher",
    "LongformerForSequenceClassification",
    "BigBirdForSequenceClassification",
    "LongformerForTokenClassification",
    "BigBirdForTokenClassification",
    "NerConverter",
]
assert sorted(__all__) == sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
