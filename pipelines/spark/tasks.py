"""The `mapInArrow` glue between Spark and the batch loop (`core.batches`): Arrow batches of (note_id, text)
in, output rows out, for the Spark ML stages' and `predict`'s Spark path. The writers' own task functions
live with the writers (`delta.writers.rs`, `delta.writers.spark`); what a task needs of its executor
(the cached model, shared cores, the preload) is `spark.executor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa

from clinlong.pipelines.core import batches
from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.core.head_runs import engine_class
from clinlong.pipelines.core.schema import OutputSpec

ArrowFn = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]


def embed_rows(artifact_path: str, options: EmbedOptions, spec: OutputSpec) -> ArrowFn:
    """The output rows themselves (for the Spark ML stages and `predict`), a note that fails the model
    step alone as a row with its skip reason (see `core.batches`); a head's table for `spec.task` classify/ner."""

    def run(rows: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        emb = batches.embedder(artifact_path, options, engine_class(spec.task))
        for b in batches.embed_batches(emb, rows):
            yield from batches.full_table(spec, b).to_batches()

    return run
