"""What runs inside Spark tasks: Arrow batches of (note_id, text[, input_error]) in; Parquet files or rows out.

Every input row leaves as output rows or as one errors-table row (stage and reason, never the text).
Failures are sorted by whose fault they are. One that belongs to a note is isolated by re-running the
batch note by note: a note that fails alone becomes an `embed` error row (exception type only) and is
logged by id. One that does not (out of memory for one sequence, device or runtime errors, or every
note of a batch failing alone) fails the task, so Spark retries it and the job fails loudly rather
than recording notes as done.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from clinlong.pipelines.core import faults
from clinlong.pipelines.core.artifact import Artifact, ArtifactError
from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder, NoteResult, overlapped
from clinlong.pipelines.core.schema import OutputSpec, build_table

COUNT_KEYS = ("rows", "notes", "embedded", "tokens", "windows", "model_loads")  # the summed figures of a counts row

log = logging.getLogger("clinlong.tasks")

ArrowFn = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]

REPLACED_UTF8 = "invalid UTF-8 replaced by U+FFFD"

_EMBEDDERS: dict[tuple, NoteEmbedder] = {}  # the process's one model cache
_EMBEDDERS_LOCK = threading.Lock()
_LOADS = 0  # models this process has loaded (task_embedder tells a task those it loaded itself)


def embedder(artifact_path: str, options: EmbedOptions) -> NoteEmbedder:
    """The worker's embedder for this artifact, options and device (the GPU Spark assigned this task,
    or the CPU), and the task's threads set. Keyed by the artifact's model_id, read from its manifest on
    every call: an artifact re-exported in place is a new model, never the old one under the new id.
    A model is verified (sha256 of the files it reads) and loaded once, then reused across batches and tasks."""
    from clinlong.pipelines.core.devices import choose_device
    from clinlong.pipelines.core.logs import configure
    from clinlong.pipelines.core.runtime import choose_backend, model_files, set_task_threads

    global _LOADS
    configure()
    device = choose_device(options.device)
    threads = set_task_threads()
    art = Artifact.open(artifact_path, verify=False)
    key = (art.model_id, options, device, threads)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            art.verify(model_files(art, choose_backend(options.precision, options.backend, device)[0]))
            _EMBEDDERS[key] = NoteEmbedder(art, options, threads=threads, device=device)
            _LOADS += 1
        return _EMBEDDERS[key]


class Preload:
    """Loads the job's model into the executors' Python workers while the driver plans (reads, counts and
    balances the input), so that the embedding tasks, which reuse those workers, start with the model in
    memory: a cold worker spends seconds importing torch, verifying and loading the weights. A Spark job
    of one task per task slot, with the embedding stage's resource profile, run from a thread of the
    driver; best effort: where it fails or lands elsewhere the tasks load the model themselves."""

    WAIT_S = 30.0  # how long a job that ended early waits for a running preload before cancelling it

    def __init__(self, spark, artifact_path: str, options: EmbedOptions, profile=None):
        self.spark, self.artifact_path, self.options, self.profile = spark, artifact_path, options, profile
        self.group = f"clinlong-preload-{uuid.uuid4().hex[:8]}"  # this run's alone, if runs share a session
        self.thread, self.done = None, False

    def __enter__(self) -> "Preload":
        # (a plain thread: Spark then names the stage after this module's collect, not after the thread wrapper)
        self.thread = threading.Thread(target=self._run, name="clinlong-preload", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """A job that ended early (an error, nothing to embed) lets a running preload finish first (seconds),
        so that no task is cut off mid-load; an interrupt, or a preload past WAIT_S, is cancelled."""
        if exc_type is None or issubclass(exc_type, Exception):
            self.thread.join(self.WAIT_S)
        self.done = True
        if self.thread.is_alive():
            self.spark.sparkContext.cancelJobGroup(self.group)

    def _run(self) -> None:
        try:
            self._preload()
        except Exception as e:  # noqa: BLE001 - best effort: the embedding tasks load the model and report failures
            if not self.done:  # (cancelled when the job ended first)
                log.info("model preload did not finish (%s); the embedding tasks load the model", type(e).__name__)

    def _preload(self) -> None:
        from pyspark.sql.pandas.types import from_arrow_schema

        sc = self.spark.sparkContext
        sc.setJobGroup(self.group, "load the model into the executors' Python workers", interruptOnCancel=True)
        slots = max(1, sc.defaultParallelism // int(sc.getConf().get("spark.task.cpus", "1")))
        path, options = self.artifact_path, self.options

        def load(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for _ in batches:
                pass
            try:
                embedder(path, options)
            except ArtifactError:  # the driver verifies the artifact and reports it in one line
                pass
            except Exception as e:  # noqa: BLE001 - the embedding tasks meet it again and report it
                log.info("model preload failed in this worker (%s); the embedding tasks will try again",
                         type(e).__name__)
            yield from ()

        self.spark.range(0, slots, 1, slots).mapInArrow(load, from_arrow_schema(pa.schema([("id", pa.int64())])),
                                                        profile=self.profile).collect()


SHARED_CORES = "clinlong.executor.cores"  # Spark local property: "<application id>:<cores per executor>"


def share_executor_cores(sc) -> int:
    """On the driver: name one executor's cores to the tasks (local[N]: N; else spark.executor.cores),
    so that torch CPU tasks can share them (see task_embedder); 0 where unknown (each task keeps its own)."""
    import re

    local = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", sc.master)
    if local:
        n = local.group(1)
        cores = 1 if n is None else (os.cpu_count() or 1) if n == "*" else int(n)
    else:
        cores = int(sc.getConf().get("spark.executor.cores", "0"))
    sc.setLocalProperty(SHARED_CORES, f"{sc.applicationId}:{cores}" if cores else None)
    return cores


@contextlib.contextmanager
def task_embedder(artifact_path: str, options: EmbedOptions) -> Iterator[tuple[NoteEmbedder, int]]:
    """The worker's embedder for a task, and how many models the task loaded itself (0 where preloaded).
    On a CPU executor whose cores the driver named (a local property), the task registers at once (before
    the model loads) and its torch model takes, call by call, the cores its finished siblings left idle
    (runtime.CoreShare); a GPU task's BPE threads take the executor's."""
    from pyspark import TaskContext

    from clinlong.pipelines.core.devices import choose_device
    from clinlong.pipelines.core.runtime import CoreShare, set_task_threads

    ctx = TaskContext.get()
    value = ctx.getLocalProperty(SHARED_CORES) if ctx else None
    share = None
    if value:
        app, cores = value.rsplit(":", 1)
        if choose_device(options.device) == "cpu":
            where = hashlib.sha1(f"{app}\0{os.getcwd()}".encode()).hexdigest()[:16]  # an executor's workers share a cwd
            share = CoreShare(Path(tempfile.gettempdir()) / f"clinlong-cores-{where}", int(cores), max(1, ctx.cpus()))
        else:  # a GPU task: the executor's cores idle while it runs (reading is an earlier stage); BPE takes them
            os.environ.setdefault("RAYON_NUM_THREADS", cores)
    with share or contextlib.nullcontext():
        before = _LOADS
        emb = embedder(artifact_path, options)
        loaded = _LOADS - before
        model = getattr(emb.encoder, "model", None)
        if share is None or not hasattr(model, "share"):  # ONNX Runtime sessions keep the threads they were built with
            yield emb, loaded
            return
        model.share = share
        try:
            yield emb, loaded
        finally:
            model.share = None
            set_task_threads(share.own)


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


class ModelStepFailed(RuntimeError):
    """The model step failed for a reason that is not one note's: the task fails and Spark retries it."""


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
    return ModelStepFailed(f"{type(e).__name__} {what}; the task fails so that Spark retries it "
                           "(not recorded as a note error)")


def _finish(emb: NoteEmbedder, ids: list, texts: list, usable: list, pre: dict, warnings: Counter, extra: dict,
            raw: dict, prep) -> Batch:
    results, stages = None, {}
    if prep is not None:  # (None: the batch's preparation raised)
        try:
            faults.raise_point(ids)
            results = emb.finish(prep)
        except Exception as e:  # noqa: BLE001 - sorted below: the task's fault, or isolated note by note
            if not_the_notes_fault(e):
                raise _fail_task(e, "in the model step") from None
            results = None
    if results is None:
        results, stages = _one_by_one(emb, ids, usable)
    for i, (stage, reason) in pre.items():
        results[i] = NoteResult.unusable(reason, texts[i])
        stages[i] = stage
    for i, data in raw.items():  # binary text: hash the bytes as stored (what incremental mode compares)
        results[i].text_sha256 = hashlib.sha256(data).hexdigest()
    return Batch(ids, texts, results, stages, warnings, extra)


def _one_by_one(emb: NoteEmbedder, ids: list, texts: list) -> tuple[list[NoteResult], dict[int, str]]:
    """Re-run a failed batch note by note; a note that fails alone is recorded (exception type only) and
    logged by id. Raises ModelStepFailed when the failure is not a note's: a runtime or device error, or
    every one of two or more notes failing alone."""
    results, stages, tried, last = [], {}, 0, None
    for i, (nid, text) in enumerate(zip(ids, texts)):
        tried += text is not None
        try:
            faults.raise_point([nid] if text is not None else [])
            results.append(emb.embed([text])[0])
        except Exception as e:  # noqa: BLE001 - recorded per note, the text never in the reason
            if not_the_notes_fault(e):
                raise _fail_task(e, "in the model step") from None
            results.append(NoteResult.unusable(f"{type(e).__name__} in the model step", text))
            stages[i], last = "embed", e
            log.warning("note id %s: %s in the model step; recorded in the errors table (stage embed)",
                        nid, type(e).__name__)
    if tried >= 2 and len(stages) == tried:
        raise _fail_task(last, f"for every one of the {tried} notes of a batch, each run alone") from None
    return results, stages


CHARS_PER_TOKEN = 4  # about what byte-level BPE makes of English clinical text


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


def _embedded(emb: NoteEmbedder, batches: Iterator[pa.RecordBatch]) -> Iterator[Batch]:
    """Embed batch after batch, preparing the next (checks, BPE, windows) while the model runs the current;
    small batches are joined until they fill at least one of the model's rows."""
    batches = coalesce(batches, CHARS_PER_TOKEN * emb.token_budget)
    return overlapped(lambda batch: _prepare(emb, batch), lambda prepared: _finish(emb, *prepared), batches)


def _where(emb: NoteEmbedder) -> dict:
    """The device (and the precision `auto` chose there) this task's model ran on, and the GPU addresses
    Spark assigned the task."""
    from clinlong.pipelines.core.devices import assigned_gpus

    return {"device": f"{emb.device} {emb.precision}", "gpus": ",".join(assigned_gpus())}


def _counts(b: Batch, rows: int) -> dict:
    ok = [r for r in b.results if r.skip_reason is None]
    errors = Counter(f"{b.stages.get(i, 'check')}: {r.skip_reason}"
                     for i, r in enumerate(b.results) if r.skip_reason is not None)
    return {"rows": rows, "notes": len(b.results), "embedded": len(ok), "tokens": sum(r.n_tokens for r in ok),
            "windows": sum(r.n_windows for r in ok), "model_loads": 0, "errors": dict(errors),
            "warnings": dict(b.warnings)}


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


def embed_rows(artifact_path: str, options: EmbedOptions, spec: OutputSpec) -> ArrowFn:
    """The output rows themselves (for the Spark ML stages and `predict`)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in _embedded(embedder(artifact_path, options), batches):
            yield from full_table(spec, b).to_batches()

    return run
