"""The batch loop, once, for every front-end: the job's Spark tasks (both writers), the one-liner's
`predict` and the Spark ML stages. No Spark here.

A batch goes decode -> prepare -> model -> finish: Arrow rows of (note_id, text[, input_error], carried
columns) are decoded (`prepare`: binary text as UTF-8, input errors and null ids set aside, checks, BPE and
windows of the usable texts, as a named `Prepared` record), the model runs (`finish`), and every input row
leaves as a result with a skip reason or vectors (`Batch`). `embed_batches` overlaps the next batch's
preparation with the current model call.

Failures are sorted by whose fault they are. One that belongs to a note is isolated by re-running the
batch note by note (`embed_isolated`): a note that fails alone gets the skip reason "<ExceptionType> in the
model step" (stage `embed`; the message is never kept: it could quote the text) and is logged by id. One
that does not (out of memory, device or runtime-session errors, or every note of a batch failing alone)
raises `ModelStepFailed`, so a Spark task fails and is retried, and the job fails loudly rather than
recording notes as done.

The model cache (`embedder`) holds one loaded model per artifact, options, device and thread count in the
process, and `counts`/`TaskCounts` are the figures every writer reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from clinlong.pipelines.core import engine, faults
from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder, NoteResult, overlapped
from clinlong.pipelines.core.errors import ModelStepFailed  # noqa: F401 - re-exported: defined in core.errors
from clinlong.pipelines.core.schema import OutputSpec, build_table

log = logging.getLogger("clinlong.tasks")

COUNT_KEYS = ("rows", "notes", "embedded", "tokens", "windows", "model_loads")  # the summed figures of a counts row
REPLACED_UTF8 = "invalid UTF-8 replaced by U+FFFD"
CHARS_PER_TOKEN = 4  # about what byte-level BPE makes of English clinical text
EMBED_STAGE = "embed"  # the errors table's stage of a note the model step failed on alone

_EMBEDDERS: dict[tuple, NoteEmbedder] = {}  # the process's one model cache
_EMBEDDERS_LOCK = threading.Lock()
_loads = [0]  # models this process has loaded (a task tells those it loaded itself: see `loads`)


def embedder(artifact_path: str, options: EmbedOptions, engine: type[NoteEmbedder] = NoteEmbedder) -> NoteEmbedder:
    """The process's embedder for this artifact, options and device (the GPU Spark assigned this task, or
    the CPU), and the threads set for it. Keyed by the artifact's model_id, read from its manifest on every
    call: an artifact re-exported in place is a new model, never the old one under the new id. A model is
    verified (sha256 of the files it reads) and loaded once, then reused across batches and tasks.
    `engine`: the NoteEmbedder class to build (core.head_runs.HeadRunner for a fine-tuned head).

    Raises:
        ArtifactError: the artifact is missing, incomplete or fails its checksums.
    """
    from clinlong.pipelines.core.devices import choose_device
    from clinlong.pipelines.core.logs import configure
    from clinlong.pipelines.core.runtime import choose_backend, model_files, set_task_threads

    configure()
    device = choose_device(options.device)
    threads = set_task_threads()
    art = Artifact.open(artifact_path, verify=False)
    key = (engine, art.model_id, options, device, threads)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            art.verify(model_files(art, choose_backend(options.precision, options.backend, device)[0]))
            _EMBEDDERS[key] = engine(art, options, threads=threads, device=device)
            _loads[0] += 1
        return _EMBEDDERS[key]


def loads() -> int:
    """How many models this process has loaded so far (the difference over a call is what it loaded)."""
    return _loads[0]


def not_the_notes_fault(e: BaseException) -> bool:
    """Out of memory, device and runtime-session errors: retrying elsewhere may succeed, recording the
    note would bury it. (The message is inspected, never logged: it could quote input.)"""
    if isinstance(e, MemoryError):
        return True
    kind, module = type(e).__name__, type(e).__module__ or ""
    if "OutOfMemory" in kind or kind == "AcceleratorError" or module.startswith("onnxruntime"):
        return True
    msg = str(e)
    return any(s in msg for s in ("CUDA", "CUBLAS", "cuDNN", "out of memory", "Failed to allocate", "device-side"))


def _fail_task(e: BaseException, what: str) -> ModelStepFailed:
    return ModelStepFailed(
        f"{type(e).__name__} {what}; the task fails so that Spark retries it (not recorded as a note error)"
    )


def embed_isolated(
    emb: NoteEmbedder, ids: list, texts: list, work: engine.Prepared | None = None, prepared: bool = False
) -> tuple[list[NoteResult], dict[int, str]]:
    """One result per text (None: a row set aside, given a result by the caller), and the stage `embed`
    for each note the model step failed on alone. `work` is `emb.prepare(texts)` when the caller ran it
    (`prepared`; None there: it raised), so a batch is prepared once.

    Raises:
        ModelStepFailed: the failure is not a note's (see `not_the_notes_fault`), or every one of two or
            more notes failed alone.
    """
    if not prepared:
        try:
            work = emb.prepare(texts)
        except Exception:  # noqa: BLE001 - isolated note by note below
            work = None
    if work is not None:
        try:
            faults.raise_point(ids, texts)
            return emb.finish(work), {}
        except Exception as e:  # noqa: BLE001 - sorted below: the task's fault, or isolated note by note
            if not_the_notes_fault(e):
                raise _fail_task(e, "in the model step") from None
    return _one_by_one(emb, ids, texts)


def _one_by_one(emb: NoteEmbedder, ids: list, texts: list) -> tuple[list[NoteResult], dict[int, str]]:
    """Re-run a failed batch note by note; a note that fails alone is recorded (exception type only) and
    logged by id. Raises ModelStepFailed when the failure is not a note's: a runtime or device error, or
    every one of two or more notes failing alone."""
    results, stages, tried, last = [], {}, 0, None
    for i, (nid, text) in enumerate(zip(ids, texts)):
        tried += text is not None
        try:
            faults.raise_point([nid] if text is not None else [], [text])
            results.append(emb.embed([text])[0])
        except Exception as e:  # noqa: BLE001 - recorded per note, the text never in the reason
            if not_the_notes_fault(e):
                raise _fail_task(e, "in the model step") from None
            results.append(NoteResult.unusable(f"{type(e).__name__} in the model step", text))
            stages[i], last = EMBED_STAGE, e
            log.warning(
                "note id %s: %s in the model step; recorded in the errors table (stage embed)", nid, type(e).__name__
            )
    if tried >= 2 and len(stages) == tried:
        raise _fail_task(last, f"for every one of the {tried} notes of a batch, each run alone") from None
    return results, stages


def embed_texts(emb: NoteEmbedder, texts: list, ids: list | None = None) -> list[NoteResult]:
    """One result per text, in order, with per-note fault isolation (see `embed_isolated`): what `predict`
    and the ML stages call. `ids` name the notes in the log (default: their positions).

    Raises:
        ModelStepFailed: a failure that is not a note's.
    """
    return embed_isolated(emb, list(range(len(texts))) if ids is None else ids, texts)[0]


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
        """(note_id, text_sha256, stage, reason) of each row that has no vectors: the errors table's rows."""
        return [
            (self.ids[i], r.text_sha256, self.stages.get(i, "check"), r.skip_reason)
            for i, r in enumerate(self.results)
            if r.skip_reason is not None
        ]


@dataclass
class Prepared:
    """A decoded Arrow batch ready for the model (see `prepare`, `finish`)."""

    ids: list  # note ids, in input order
    texts: list  # decoded texts (binary columns as UTF-8, invalid bytes as U+FFFD)
    usable: list  # texts, None where the row was set aside (`set_aside`)
    set_aside: dict[int, tuple[str, str]]  # row -> (stage, reason): an input error (read) or a null id (check)
    warnings: Counter  # counted, not failed: invalid UTF-8 replaced
    extra: dict[str, list]  # carried input columns (the partition column)
    raw: dict[int, bytes]  # row -> the bytes of a binary text, hashed as stored (what incremental mode compares)
    work: engine.Prepared | None  # checks, BPE and windows of `usable`; None: preparing the batch raised


def decode(texts: list, warnings: Counter) -> list:
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


def prepare(emb: NoteEmbedder, batch: pa.RecordBatch) -> Prepared:
    """Decode an Arrow batch, set aside rows that are not notes, and run the CPU-side work before the model."""
    ids = batch.column("note_id").to_pylist()
    warnings: Counter = Counter()
    stored = batch.column("text").to_pylist()
    texts = decode(stored, warnings)
    names = batch.schema.names
    input_errors = batch.column("input_error").to_pylist() if "input_error" in names else [None] * len(ids)
    aside: dict[int, tuple[str, str]] = {}
    for i, (nid, err) in enumerate(zip(ids, input_errors)):
        if err is not None:
            aside[i] = ("read", err)
        elif nid is None:
            aside[i] = ("check", "null note id")
    extra = {n: batch.column(n).to_pylist() for n in names if n not in ("note_id", "text", "input_error")}
    raw = {i: bytes(t) for i, t in enumerate(stored) if isinstance(t, (bytes, bytearray))}
    usable = [None if i in aside else t for i, t in enumerate(texts)]
    try:
        work = emb.prepare(usable)
    except Exception:  # noqa: BLE001 - isolated note by note in finish
        work = None
    return Prepared(ids, texts, usable, aside, warnings, extra, raw, work)


def finish(emb: NoteEmbedder, p: Prepared) -> Batch:
    """Run the model on a prepared batch (per-note fault isolation) and give every row its result.

    Raises:
        ModelStepFailed: a failure that is not a note's.
    """
    results, stages = embed_isolated(emb, p.ids, p.usable, p.work, prepared=True)
    for i, (stage, reason) in p.set_aside.items():
        results[i] = NoteResult.unusable(reason, p.texts[i])
        stages[i] = stage
    for i, data in p.raw.items():  # binary text: hash the bytes as stored (what incremental mode compares)
        results[i].text_sha256 = hashlib.sha256(data).hexdigest()
    return Batch(p.ids, p.texts, results, stages, p.warnings, p.extra)


def coalesce(batches: Iterator[pa.RecordBatch], chars: int) -> Iterator[pa.RecordBatch]:
    """Arrow batches joined until they hold about `chars` characters of text, so that a model call can fill
    its row (a GPU's 65,536 tokens are hundreds of short notes; Spark's Arrow batches hold 64 rows)."""
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        size += batch.column("text").nbytes
        if size >= chars:
            yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
            pending, size = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)


def embed_batches(emb: NoteEmbedder, batches: Iterator[pa.RecordBatch]) -> Iterator[Batch]:
    """Embed batch after batch, preparing the next (checks, BPE, windows) while the model runs the current;
    small batches are joined until they fill at least one of the model's rows."""
    batches = coalesce(batches, CHARS_PER_TOKEN * emb.token_budget)
    return overlapped(lambda batch: prepare(emb, batch), lambda p: finish(emb, p), batches)


def tables(spec: OutputSpec, b: Batch) -> Iterator[tuple[dict, pa.Table]]:
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
    parts = [
        t.append_column(spec.partition_by, pa.array([v[spec.partition_by]] * t.num_rows, pa.string()))
        for v, t in tables(spec, b)
    ]
    return pa.concat_tables(parts).cast(spec.schema) if parts else spec.schema.empty_table()


def where(emb: NoteEmbedder) -> dict:
    """The device (and the precision `auto` chose there) this process's model runs on, and the GPU addresses
    Spark assigned the task."""
    from clinlong.pipelines.core.devices import assigned_gpus

    return {"device": f"{emb.device} {emb.precision}", "gpus": ",".join(assigned_gpus())}


def counts(b: Batch, rows: int) -> dict:
    """One batch's figures: output rows written, notes in, embedded, BPE tokens and windows of the embedded
    notes, errors by "stage: reason", warnings by reason."""
    ok = [r for r in b.results if r.skip_reason is None]
    errors = Counter(
        f"{b.stages.get(i, 'check')}: {r.skip_reason}" for i, r in enumerate(b.results) if r.skip_reason is not None
    )
    return {
        "rows": rows,
        "notes": len(b.results),
        "embedded": len(ok),
        "tokens": sum(r.n_tokens for r in ok),
        "windows": sum(r.n_windows for r in ok),
        "model_loads": 0,
        "errors": dict(errors),
        "warnings": dict(b.warnings),
    }


class TaskCounts:
    """A task's counts over its batches, as one counts row (errors and warnings as JSON)."""

    def __init__(self):
        self.n = Counter()
        self.errors, self.warnings = Counter(), Counter()

    def add(self, c: dict) -> None:
        self.n.update({k: c[k] for k in COUNT_KEYS})
        self.errors.update(c["errors"])
        self.warnings.update(c["warnings"])

    def as_row(self) -> dict:
        return {
            **{k: self.n[k] for k in COUNT_KEYS},
            "errors": json.dumps(dict(self.errors)),
            "warnings": json.dumps(dict(self.warnings)),
        }
