"""What runs inside Spark tasks: Arrow batches of (note_id, text) in, embedded Parquet parts out."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator

import pyarrow as pa

from .artifact import Artifact
from .engine import EmbedOptions, NoteEmbedder

_EMBEDDERS: dict[tuple, NoteEmbedder] = {}


def embedder(artifact_path: str, options: EmbedOptions) -> NoteEmbedder:
    """The worker's embedder for this artifact and options: loaded (and verified) once, then reused."""
    key = (artifact_path, options)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = NoteEmbedder(Artifact.open(artifact_path), options)
    return _EMBEDDERS[key]


def embed_partition(artifact_path: str, options: EmbedOptions, granularity: str, table_uri: str,
                    schema: pa.Schema, model_id: str) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The mapInArrow function: one Parquet part per input batch, a metadata row per part."""
    from .delta_sink import write_part
    from .schema import build_table

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        emb = embedder(artifact_path, options)
        for batch in batches:
            ids = batch.column("note_id").to_pylist()
            texts = batch.column("text").to_pylist()
            results = emb.embed(texts)
            for i, (nid, r) in enumerate(zip(ids, results)):
                if nid is None and r.skip_reason is None:
                    r.skip_reason = "null note id"
            table = build_table(granularity, ids, texts, results, model_id, emb.artifact.dimension, schema,
                                options.token_vector)
            path, size = write_part(table, table_uri) if table.num_rows else ("", 0)
            skipped = Counter(r.skip_reason for r in results if r.skip_reason)
            yield pa.RecordBatch.from_pylist([{
                "path": path, "size": size, "rows": table.num_rows, "notes": len(results),
                "tokens": sum(r.n_tokens for r in results), "windows": sum(r.n_windows for r in results),
                "skipped": json.dumps(skipped),
            }])

    return run


def embed_rows(artifact_path: str, options: EmbedOptions, granularity: str, schema: pa.Schema,
               model_id: str) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The mapInArrow function that returns the output rows themselves (for Spark-side writers)."""
    from .schema import build_table

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        emb = embedder(artifact_path, options)
        for batch in batches:
            ids = batch.column("note_id").to_pylist()
            texts = batch.column("text").to_pylist()
            table = build_table(granularity, ids, texts, emb.embed(texts), model_id, emb.artifact.dimension,
                                schema, options.token_vector)
            yield from table.to_batches()

    return run
