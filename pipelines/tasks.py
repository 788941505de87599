"""What runs inside Spark tasks: Arrow batches of (note_id, text) in; Parquet parts or rows out."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator

import pyarrow as pa

from .artifact import Artifact
from .engine import EmbedOptions, NoteEmbedder, NoteResult
from .schema import OutputSpec, build_table

ArrowFn = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]

_EMBEDDERS: dict[tuple, NoteEmbedder] = {}


def embedder(artifact_path: str, options: EmbedOptions) -> NoteEmbedder:
    """The worker's embedder for this artifact, options and device (the GPU Spark assigned this task,
    or the CPU): loaded (and verified) once, then reused across batches and tasks."""
    from .devices import choose_device

    device = choose_device(options.device)
    key = (artifact_path, options, device)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = NoteEmbedder(Artifact.open(artifact_path), options, device=device)
    return _EMBEDDERS[key]


def _embedded(emb: NoteEmbedder, spec: OutputSpec,
              batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[list[NoteResult], pa.Table]]:
    """Embed batch after batch, preparing the next batch (text rules, BPE) on a helper thread while
    the model runs the current one (ONNX Runtime and torch release the GIL while they compute)."""
    from concurrent.futures import ThreadPoolExecutor

    def prepare(batch: pa.RecordBatch):
        ids, texts = batch.column("note_id").to_pylist(), batch.column("text").to_pylist()
        return ids, texts, emb.prepare(texts)

    with ThreadPoolExecutor(1, thread_name_prefix="clinlong-prepare") as pool:
        pending = None
        for batch in batches:
            nxt = pool.submit(prepare, batch)
            if pending is not None:
                yield _finish(emb, spec, *pending.result())
            pending = nxt
        if pending is not None:
            yield _finish(emb, spec, *pending.result())


def _finish(emb: NoteEmbedder, spec: OutputSpec, ids: list, texts: list, prep) -> tuple[list[NoteResult], pa.Table]:
    results = emb.finish(prep)
    for nid, r in zip(ids, results):
        if nid is None and r.skip_reason is None:
            r.skip_reason = "null note id"
    return results, build_table(spec, ids, texts, results)


def _where(emb: NoteEmbedder) -> dict:
    """The device this task's model ran on and the GPU addresses Spark assigned the task."""
    from .devices import assigned_gpus

    return {"device": emb.device, "gpus": ",".join(assigned_gpus())}


def _counts(results: list[NoteResult], rows: int) -> dict:
    return {"rows": rows, "notes": len(results), "tokens": sum(r.n_tokens for r in results),
            "windows": sum(r.n_windows for r in results),
            "skipped": dict(Counter(r.skip_reason for r in results if r.skip_reason))}


def embed_partition(artifact_path: str, options: EmbedOptions, spec: OutputSpec, table_uri: str,
                    counters: dict | None = None) -> ArrowFn:
    """For delta-rs: one Parquet part per input batch written into the table folder, a metadata row each
    (and live counts in `counters`, Spark accumulators, for the driver's progress log)."""
    from .delta_sink import write_part

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        emb = embedder(artifact_path, options)
        for results, table in _embedded(emb, spec, batches):
            path, size = write_part(table, table_uri) if table.num_rows else ("", 0)
            counts = _counts(results, table.num_rows)
            if counters:
                for k, v in counts.items():
                    counters[k].add(v)
            counts["skipped"] = json.dumps(counts["skipped"])
            yield pa.RecordBatch.from_pylist([{"path": path, "size": size, **counts, **_where(emb)}])

    return run


def embed_rows(artifact_path: str, options: EmbedOptions, spec: OutputSpec, counters: dict | None = None) -> ArrowFn:
    """The output rows themselves (for Spark-side writers); `counters` are optional Spark accumulators
    named rows, notes, tokens, windows and skipped."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for results, table in _embedded(embedder(artifact_path, options), spec, batches):
            if counters:
                for k, v in _counts(results, table.num_rows).items():
                    counters[k].add(v)
            yield from table.to_batches()

    return run
