"""What runs inside Spark tasks: Arrow batches of (note_id, text[, input_error]) in; Parquet parts or rows out.

Every input row leaves as output rows or as one errors-table row (stage and reason, never the text): a
note that makes the model step raise is isolated by re-running the batch note by note, so one bad note
never costs its batch.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from . import faults
from .artifact import Artifact
from .engine import EmbedOptions, NoteEmbedder, NoteResult
from .schema import OutputSpec, build_errors, build_table

ArrowFn = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]

REPLACED_UTF8 = "invalid UTF-8 replaced by U+FFFD"

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


@dataclass
class Batch:
    """One input batch, embedded: results in input order, plus the stage of each failure."""

    ids: list
    texts: list
    results: list[NoteResult]
    stages: dict[int, str] = field(default_factory=dict)  # row -> stage, for rows with a skip reason
    warnings: Counter = field(default_factory=Counter)
    extra: dict[str, list] = field(default_factory=dict)  # carried input columns (the partition column)

    def groups(self, column: str) -> list[tuple[str | None, list[int]]]:
        """Row indices by value of a carried column (one group of all rows when `column` is empty)."""
        if not column:
            return [(None, list(range(len(self.ids))))]
        by: dict = {}
        for i, v in enumerate(self.extra[column]):
            by.setdefault(v, []).append(i)
        return list(by.items())

    def subset(self, rows: list[int]) -> tuple[list, list, list[NoteResult]]:
        return [self.ids[i] for i in rows], [self.texts[i] for i in rows], [self.results[i] for i in rows]

    def error_rows(self) -> list[tuple]:
        return [(self.ids[i], r.text_sha256, self.stages.get(i, "check"), r.skip_reason)
                for i, r in enumerate(self.results) if r.skip_reason is not None]


def _decode(texts: list, warnings: Counter) -> list:
    """Binary text columns are decoded as UTF-8; invalid bytes become U+FFFD, as Spark's CSV reader does,
    and both are counted (embedded, not silently)."""
    out = []
    for t in texts:
        if isinstance(t, (bytes, bytearray)):
            t = bytes(t).decode("utf-8", errors="replace")
        if isinstance(t, str) and "\ufffd" in t:
            warnings[REPLACED_UTF8] += 1
        out.append(t)
    return out


def _prepare(emb: NoteEmbedder, batch: pa.RecordBatch):
    ids = batch.column("note_id").to_pylist()
    warnings: Counter = Counter()
    stored = batch.column("text").to_pylist()
    texts = _decode(stored, warnings)
    names = batch.schema.names
    input_errors = batch.column("input_error").to_pylist() if "input_error" in names else [None] * len(ids)
    pre: dict[int, tuple[str, str]] = {}
    for i, (nid, err) in enumerate(zip(ids, input_errors)):
        if err is not None:
            pre[i] = ("read", err)
        elif nid is None:
            pre[i] = ("check", "null note id")
    extra = {n: batch.column(n).to_pylist() for n in names if n not in ("note_id", "text", "input_error")}
    raw = {i: bytes(t) for i, t in enumerate(stored) if isinstance(t, (bytes, bytearray))}
    usable = [None if i in pre else t for i, t in enumerate(texts)]
    try:
        prep = emb.prepare(usable)
    except Exception:  # isolated note by note in _finish
        prep = None
    return ids, texts, usable, pre, warnings, extra, raw, prep


def _finish(emb: NoteEmbedder, ids: list, texts: list, usable: list, pre: dict, warnings: Counter, extra: dict,
            raw: dict, prep) -> Batch:
    results, stages = None, {}
    if prep is not None:  # (None: the batch's preparation raised)
        try:
            results = emb.finish(prep)
        except Exception:  # noqa: BLE001 - isolated note by note below
            results = None
    if results is None:
        results, stages = _one_by_one(emb, usable)
    for i, (stage, reason) in pre.items():
        results[i] = NoteResult.unusable(reason, texts[i])
        stages[i] = stage
    for i, data in raw.items():  # binary text: hash the bytes as stored (what incremental mode compares)
        results[i].text_sha256 = hashlib.sha256(data).hexdigest()
    return Batch(ids, texts, results, stages, warnings, extra)


def _one_by_one(emb: NoteEmbedder, texts: list) -> tuple[list[NoteResult], dict[int, str]]:
    """Re-run a failed batch note by note; a note that fails alone is recorded (exception type only)."""
    results, stages = [], {}
    for i, text in enumerate(texts):
        try:
            results.append(emb.embed([text])[0])
        except Exception as e:  # noqa: BLE001 - recorded per note, the text never in the reason
            results.append(NoteResult.unusable(f"{type(e).__name__} in the model step", text))
            stages[i] = "embed"
    return results, stages


def _embedded(emb: NoteEmbedder, batches: Iterator[pa.RecordBatch]) -> Iterator[Batch]:
    """Embed batch after batch, preparing the next batch (text rules, BPE) on a helper thread while
    the model runs the current one (ONNX Runtime and torch release the GIL while they compute)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="clinlong-prepare") as pool:
        pending = None
        for batch in batches:
            nxt = pool.submit(_prepare, emb, batch)
            if pending is not None:
                yield _finish(emb, *pending.result())
            pending = nxt
        if pending is not None:
            yield _finish(emb, *pending.result())


def _where(emb: NoteEmbedder) -> dict:
    """The device this task's model ran on and the GPU addresses Spark assigned the task."""
    from .devices import assigned_gpus

    return {"device": emb.device, "gpus": ",".join(assigned_gpus())}


def _counts(b: Batch, rows: int) -> dict:
    ok = [r for r in b.results if r.skip_reason is None]
    errors = Counter(f"{b.stages.get(i, 'check')}: {r.skip_reason}"
                     for i, r in enumerate(b.results) if r.skip_reason is not None)
    return {"rows": rows, "notes": len(b.results), "embedded": len(ok), "tokens": sum(r.n_tokens for r in ok),
            "windows": sum(r.n_windows for r in ok), "errors": dict(errors), "warnings": dict(b.warnings)}


def _add(counters: dict | None, counts: dict) -> None:
    if counters:
        for k, v in counts.items():
            if k in counters:
                counters[k].add(v)


@dataclass(frozen=True)
class PartTarget:
    """Where a task writes: the output and errors tables, file-name prefix (run, chunk, driver attempt)."""

    table_uri: str
    errors_uri: str
    prefix: str
    run_id: str
    error_schema: pa.Schema


def embed_partition(artifact_path: str, options: EmbedOptions, spec: OutputSpec, target: PartTarget,
                    counters: dict | None = None) -> ArrowFn:
    """For delta-rs: per input batch one Parquet part in the output table folder and one in the errors
    table folder (when there are errors), and one metadata row for the driver's commit (and live counts
    in `counters`, Spark accumulators, for the progress log)."""
    from .delta_sink import write_part

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        emb = embedder(artifact_path, options)
        for b in _embedded(emb, batches):
            files, rows = [], 0
            for values, table in _tables(spec, b):
                path, size = write_part(table, target.table_uri, target.prefix, values)
                files.append({"path": path, "size": size, "file_rows": table.num_rows,
                              "partition_values": json.dumps(values)})
                rows += table.num_rows
            errors = b.error_rows()
            err_path, err_size = ("", 0)
            if errors:
                err_table = build_errors(target.error_schema, errors, spec.model_id, target.run_id)
                err_path, err_size = write_part(err_table, target.errors_uri, target.prefix)
            faults.point("task-after-part")
            counts = _counts(b, rows)
            _add(counters, counts)
            # One metadata row per written file; the batch's counts ride on the first.
            first = {"err_path": err_path, "err_size": err_size, "err_rows": len(errors),
                     **{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in counts.items()}}
            rest = {**dict.fromkeys(first, 0), "err_path": "", "errors": "{}", "warnings": "{}"}
            files = files or [{"path": "", "size": 0, "file_rows": 0, "partition_values": "{}"}]
            yield pa.RecordBatch.from_pylist([{**f, **(first if i == 0 else rest), **_where(emb)}
                                              for i, f in enumerate(files)])

    return run


def _tables(spec: OutputSpec, b: Batch) -> Iterator[tuple[dict, pa.Table]]:
    """A batch's non-empty output tables (file schema: no partition column), one per partition value,
    each with its partition values ({} when the table is not partitioned)."""
    for value, idx in b.groups(spec.partition_by):
        table = build_table(spec, *b.subset(idx))
        if table.num_rows:
            yield ({spec.partition_by: value} if spec.partition_by else {}), table


def full_table(spec: OutputSpec, b: Batch) -> pa.Table:
    """A batch's output rows with the partition column filled in (for Spark-side writers)."""
    if not spec.partition_by:
        return build_table(spec, b.ids, b.texts, b.results)
    tables = [t.append_column(spec.partition_by, pa.array([v[spec.partition_by]] * t.num_rows, pa.string()))
              for v, t in _tables(spec, b)]
    return pa.concat_tables(tables).cast(spec.schema) if tables else spec.schema.empty_table()


def embed_rows(artifact_path: str, options: EmbedOptions, spec: OutputSpec, counters: dict | None = None) -> ArrowFn:
    """The output rows themselves (for Spark-side writers and `predict`); `counters` are optional Spark
    accumulators named rows, notes, embedded, tokens, windows, errors and warnings."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in _embedded(embedder(artifact_path, options), batches):
            table = full_table(spec, b)
            _add(counters, _counts(b, table.num_rows))
            yield from table.to_batches()

    return run


def embed_rows_and_errors(artifact_path: str, options: EmbedOptions, spec: OutputSpec, error_schema: pa.Schema,
                          run_id: str, counters: dict | None = None) -> ArrowFn:
    """For Spark-side writers: output rows and errors-table rows in one stream, told apart by `_error`
    (true on errors rows); the columns are the output schema's followed by the errors table's."""
    schema = combined_schema(spec.schema, error_schema)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in _embedded(embedder(artifact_path, options), batches):
            table = full_table(spec, b)
            errors = build_errors(error_schema, b.error_rows(), spec.model_id, run_id)
            _add(counters, _counts(b, table.num_rows))
            for t, flag in ((table, False), (errors, True)):
                if t.num_rows:
                    cols = {f.name: (t.column(f.name[4:] if f.name.startswith("err_") else f.name)
                                     if (f.name.startswith("err_")) == flag else pa.nulls(t.num_rows, f.type))
                            for f in schema if f.name != "_error"}
                    cols["_error"] = pa.array([flag] * t.num_rows)
                    yield from pa.table(cols, schema=schema).to_batches()

    return run


def combined_schema(out: pa.Schema, errors: pa.Schema) -> pa.Schema:
    """Output columns, then the errors table's columns prefixed `err_`, then `_error`."""
    return pa.schema(list(out) + [pa.field("err_" + f.name, f.type) for f in errors] + [pa.field("_error", pa.bool_())])
