"""Progress for long runs, without note text: periodic driver logs of notes/s, tokens/s and ETA for Spark
jobs, and a one-line progress bar for in-process `predict` on many texts."""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


class JobProgress:
    """Logs every `every` seconds while a Spark job runs: tasks done, notes and tokens so far, rates, ETA.

    Counts come from accumulators (updated as tasks finish) and Spark's status tracker."""

    def __init__(self, spark, counters: dict, every: float = 30.0, log: Callable[[str], None] | None = None,
                 total_notes: int = 0):
        self.spark, self.counters, self.every, self.total_notes = spark, counters, every, total_notes
        self.log = log or (lambda m: print(f"[embed_notes] {m}", file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="clinlong-progress")
        self.start = time.perf_counter()

    def line(self) -> str:
        tracker = self.spark.sparkContext.statusTracker()
        done = total = 0
        for sid in tracker.getActiveStageIds():
            info = tracker.getStageInfo(sid)
            if info is not None:
                done += info.numCompletedTasks
                total += info.numTasks
        elapsed = time.perf_counter() - self.start
        notes, tokens = self.counters["notes"].value, self.counters["tokens"].value
        if self.total_notes and notes:  # across chunks: by notes
            eta = f"{elapsed * max(self.total_notes - notes, 0) / notes:.0f} s"
        else:
            eta = f"{elapsed * (total - done) / done:.0f} s" if done and total else "unknown"
        return (f"progress: tasks {done}/{total}, notes {notes}{f'/{self.total_notes}' if self.total_notes else ''} ({notes / elapsed:.2f}/s), "
                f"tokens {tokens} ({tokens / elapsed:.0f}/s), elapsed {elapsed:.0f} s, ETA {eta}")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.log(self.line())
            except Exception:  # progress must never break the job
                pass

    def __enter__(self) -> "JobProgress":
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class ProgressBar:
    """`[predict] 48/200 notes |#####     | 12.3 notes/s ETA 12 s` on stderr, redrawn in place."""

    def __init__(self, total: int, label: str = "predict", stream=None, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        filled = int(self.width * self.done / max(self.total, 1))
        eta = (self.total - self.done) / rate if rate else 0.0
        self.stream.write(f"\r[{self.label}] {self.done}/{self.total} notes |{'#' * filled}{' ' * (self.width - filled)}| "
                          f"{rate:.1f} notes/s ETA {eta:.0f} s")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
