"""What runs on executors for Spark's sake, not the model's: the model preload into the executors' Python
workers while the driver plans (`Preload`), and a task's resources (`task_embedder`: the process's cached
model, and the executor's cores shared among its running torch CPU tasks, named by the driver in a local
property, `share_executor_cores`). The batch loop itself is `core.batches`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from clinlong.pipelines.core import batches
from clinlong.pipelines.core.artifact import ArtifactError
from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder

log = logging.getLogger("clinlong.tasks")


class Preload:
    """Loads the job's model into the executors' Python workers while the driver plans (reads, counts and
    balances the input), so that the embedding tasks, which reuse those workers, start with the model in
    memory: a cold worker spends seconds importing torch, verifying and loading the weights. A Spark job
    of one task per task slot, with the embedding stage's resource profile, run from a thread of the
    driver; best effort: where it fails or lands elsewhere the tasks load the model themselves."""

    WAIT_S = 30.0  # how long a job that ended early waits for a running preload before cancelling it

    def __init__(
        self, spark, artifact_path: str, options: EmbedOptions, profile=None, engine: type[NoteEmbedder] = NoteEmbedder
    ):
        self.spark, self.artifact_path, self.options, self.profile = spark, artifact_path, options, profile
        self.engine = engine  # the engine class the tasks run (core.head_runs.engine_class)
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
        path, options, engine = self.artifact_path, self.options, self.engine

        def load(rows: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for _ in rows:
                pass
            try:
                batches.embedder(path, options, engine)
            except ArtifactError:  # the driver verifies the artifact and reports it in one line
                pass
            except Exception as e:  # noqa: BLE001 - the embedding tasks meet it again and report it
                log.info(
                    "model preload failed in this worker (%s); the embedding tasks will try again", type(e).__name__
                )
            yield from ()

        self.spark.range(0, slots, 1, slots).mapInArrow(
            load, from_arrow_schema(pa.schema([("id", pa.int64())])), profile=self.profile
        ).collect()


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
def task_embedder(
    artifact_path: str, options: EmbedOptions, engine: type[NoteEmbedder] = NoteEmbedder
) -> Iterator[tuple[NoteEmbedder, int]]:
    """The worker's embedder for a task (of class `engine`: core.head_runs.engine_class of the job's task), and
    how many models the task loaded itself (0 where preloaded).
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
        before = batches.loads()
        emb = batches.embedder(artifact_path, options, engine)
        loaded = batches.loads() - before
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
