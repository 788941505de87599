"""Progress of Spark jobs, without note text: periodic driver logs of notes/s, tokens/s and ETA, fed by
the tasks while they run. (In-process `predict` draws a tqdm bar.)"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable


class JobProgress:
    """Logs every `every` seconds while the job runs: tasks done, notes and tokens so far, rates, ETA.

    Counts move during tasks, not only at their end: each task sends its running totals to the driver
    (`ProgressReporter`, a UDP datagram at most every `REPORT_EVERY` seconds; losing one only delays
    the display) and the driver keeps, per task, the latest attempt's figures. They are for display:
    the run's totals come from what its tasks returned and committed."""

    def __init__(self, spark, every: float = 30.0, log: Callable[[str], None] | None = None, total_notes: int = 0):
        self.spark, self.every, self.total_notes = spark, every, total_notes
        self.log = log or logging.getLogger("clinlong.progress").info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="clinlong-progress")
        self._tasks: dict[tuple, tuple[int, dict]] = {}  # (chunk, partition) -> (attempt, counts)
        self._lock = threading.Lock()
        self._sock = None
        self.start = time.perf_counter()

    @property
    def address(self) -> tuple[str, int] | None:
        """Where tasks send their counts, or None when progress is off."""
        return self._sock.getsockname() if self._sock is not None else None

    def counts(self) -> dict:
        with self._lock:
            tasks = list(self._tasks.values())
        return {k: sum(c.get(k, 0) for _, c in tasks) for k in ("notes", "tokens")}

    def line(self) -> str:
        tracker = self.spark.sparkContext.statusTracker()
        done = total = running = 0
        for sid in tracker.getActiveStageIds():
            info = tracker.getStageInfo(sid)
            if info is not None:
                done += info.numCompletedTasks
                total += info.numTasks
                running += info.numActiveTasks
        elapsed = time.perf_counter() - self.start
        c = self.counts()
        notes, tokens = c["notes"], c["tokens"]
        if self.total_notes and notes:  # across chunks: by notes
            eta = f"{elapsed * max(self.total_notes - notes, 0) / notes:.0f} s"
        else:
            eta = f"{elapsed * (total - done) / done:.0f} s" if done and total else "unknown"
        of_total = f"/{self.total_notes}" if self.total_notes else ""
        return (
            f"tasks {done}/{total} ({running} running), notes {notes}{of_total} "
            f"({notes / elapsed:.2f}/s), tokens {tokens} ({tokens / elapsed:.0f}/s), elapsed {elapsed:.0f} s, "
            f"ETA {eta}"
        )

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
                m = json.loads(data)
                key, attempt = (m["chunk"], m["partition"]), m["attempt"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            with self._lock:
                if key not in self._tasks or self._tasks[key][0] <= attempt:
                    self._tasks[key] = (attempt, m)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.log(self.line())
            except Exception:  # progress must never break the job
                pass

    def __enter__(self) -> "JobProgress":
        if self.every > 0:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((_driver_host(self.spark), 0))
                sock.settimeout(0.5)
                self._sock = sock
                threading.Thread(target=self._receive, daemon=True, name="clinlong-progress-in").start()
            except OSError:  # no address to listen on: counts then come only from finished chunks' logs
                logging.getLogger("clinlong.progress").warning(
                    "live task counts are off: cannot listen on the driver's address"
                )
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._sock is not None:
            self._sock.close()


def _driver_host(spark) -> str:
    """The address executors reach the driver at (loopback for local masters)."""
    if spark.sparkContext.master.startswith("local"):
        return "127.0.0.1"
    return socket.gethostbyname(spark.conf.get("spark.driver.host", socket.gethostname()))


class ProgressReporter:
    """A task's running counts, sent to the driver's `JobProgress` at most every `REPORT_EVERY` seconds
    (UDP: never blocks, never fails the task). Only counts and ids travel, never text."""

    REPORT_EVERY = 1.0

    def __init__(self, address: tuple[str, int] | None, chunk: int):
        self.address, self.chunk = address, chunk
        self.counts = {"notes": 0, "tokens": 0}
        self._last = 0.0
        self._sock = None

    def add(self, notes: int, tokens: int) -> None:
        self.counts["notes"] += notes
        self.counts["tokens"] += tokens
        now = time.monotonic()
        if self.address and now - self._last >= self.REPORT_EVERY:
            self._last = now
            self.send()

    def send(self) -> None:
        if not self.address:
            return
        try:
            from pyspark import TaskContext

            ctx = TaskContext.get()
            where = (
                {"partition": ctx.partitionId(), "attempt": ctx.attemptNumber()}
                if ctx
                else {"partition": 0, "attempt": 0}
            )
            if self._sock is None:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.sendto(json.dumps({"chunk": self.chunk, **where, **self.counts}).encode(), tuple(self.address))
        except OSError:
            pass
