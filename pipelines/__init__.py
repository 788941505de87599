"""clinlong.pipelines: Clinical-Longformer embeddings over note tables, in layers that import only downward.

- `core`  (no Spark): text rules, windows, the engine, the model runtime, the artifact reader, the one
  model definition (`core.model`, also imported by export), output schemas, Parquet files, storage URIs,
  the job's configuration, logging.
- `spark`: Spark ML stages, Arrow task functions, sources, progress, the one-liner `load()`.
- `delta`: the sink (delta-rs), the run plan (chunks, transaction ids, incremental), the writers,
  maintenance.
- `jobs`:  `embed_notes`, `neighbours`; `pipelines/embed_notes.py` is the thin file spark-submit runs.

`import clinlong.pipelines` imports no Spark: the Spark-facing names below load on first use.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "load": "spark.light", "EmbeddingsPipeline": "spark.light",
    **{name: "spark.stages" for name in ("DocumentAssembler", "SentenceDetector", "Tokenizer", "LongformerEmbeddings",
                                          "BigBirdEmbeddings", "SentenceEmbeddings", "EmbeddingsFinisher")},
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
