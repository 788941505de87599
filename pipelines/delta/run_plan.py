"""What a run is and which notes it owes: the run id behind Delta's transaction identifiers, the
chunk each note belongs to, how a chunk is spread over tasks of equal work, and for `--mode
incremental` the notes still to embed and the rows that a changed text (or a retried model-step
failure) has made stale. `plan` decides a run as one frozen `RunPlan`; nothing here writes but
`delete_stale`, which the job calls once the run's chunks are committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from clinlong.pipelines.core.config import JobConfig
from clinlong.pipelines.delta.writers.base import Chunk, Writer

log = logging.getLogger("clinlong.job")

RESULT_OPTIONS = (
    "context",
    "max_length",
    "case_sensitive",
    "window_overlap",
    "token_vector",
    "precision",
    "max_chars",
    "global_attention",
)  # options that change the output; batch sizes and devices do not


def run_id(parts: dict) -> str:
    """A short stable id for a run description (16 hex digits of its sha256)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def n_chunks(n_notes: int, chunk_notes: int) -> int:
    """Chunks of at most ~chunk_notes notes (0: one chunk)."""
    return max(1, math.ceil(n_notes / chunk_notes)) if chunk_notes > 0 else 1


def with_chunk(notes: DataFrame, chunks: int) -> DataFrame:
    """Add `_chunk`, a hash of (note_id, text) mod `chunks`: the same note lands in the same chunk on
    every rerun, whatever the partitioning."""
    return notes.withColumn("_chunk", F.pmod(F.xxhash64("note_id", "text"), F.lit(chunks)).cast("int"))


def text_hash(col: str = "text"):
    """Spark's sha256 of the text's UTF-8 bytes: equal to `engine.text_sha256` for string text."""
    return F.sha2(F.col(col).cast("binary"), 256)


def done_keys(output: DataFrame | None, errors: DataFrame | None, model_id: str) -> DataFrame | None:
    """(note_id, text_sha256) already embedded, or recorded as errors of the input itself (`read`,
    `check`), for `model_id`. `embed` errors are not done: the next incremental run retries them."""
    if errors is not None:
        errors = errors.where(F.col("stage") != "embed")
    keys = [
        t.where(F.col("model_id") == model_id).select("note_id", "text_sha256")
        for t in (output, errors)
        if t is not None
    ]
    if not keys:
        return None
    out = keys[0]
    for k in keys[1:]:
        out = out.unionByName(k)
    return out.distinct()


def _null_safe(a: DataFrame, b: DataFrame, a_sha: str):
    return a["note_id"].eqNullSafe(b["note_id"]) & a[a_sha].eqNullSafe(b["text_sha256"])


def pending(notes: DataFrame, done: DataFrame | None) -> DataFrame:
    """Notes whose (id, text hash) is neither in the output nor in the errors table."""
    if done is None:
        return notes
    hashed = notes.withColumn("_sha", text_hash())
    return hashed.join(done, _null_safe(hashed, done, "_sha"), "left_anti").drop("_sha")


def stale(notes: DataFrame, table: DataFrame, model_id: str) -> DataFrame:
    """(note_id, text_sha256) rows of `table` for `model_id` whose note is in the input with another
    text: the old version of a changed note, to delete once the new one is committed."""
    current = notes.select("note_id", text_hash().alias("_sha")).distinct()
    ids = current.select("note_id").distinct()
    rows = table.where(F.col("model_id") == model_id).select("note_id", "text_sha256").distinct()
    rows = rows.join(ids, "note_id", "left_semi")
    return rows.join(current, _null_safe(current, rows, "_sha"), "left_anti")


def balance(part: DataFrame, tasks: int, overhead_chars: int = 200) -> DataFrame:
    """`part` in `tasks` partitions of about equal work, by text length rather than row count.

    Work is a note's length in characters plus `overhead_chars` (the model's cost grows linearly with
    length under windowed attention). Heavy notes (each over an eighth of a task's share) are placed
    first, heaviest first, each on the least-loaded task; the rest are spread over the remaining
    capacity through a table of slots, by a hash of (note_id, text). Both placements are exact: each
    task index is written as a value whose Spark hash lands in that partition (`_exact_targets`), so
    `repartition` puts every note where the plan says, for any number of notes.
    """
    if tasks <= 1:
        return part.repartition(1)
    cost = F.coalesce(F.length("text"), F.lit(0)) + F.lit(overhead_chars)
    keyed = part.withColumn("_cost", cost.cast("long")).withColumn("_key", F.xxhash64("note_id", "text"))
    total = keyed.agg(F.sum("_cost")).first()[0] or 0
    heavy = (
        keyed.where(F.col("_cost") * (8 * tasks) >= F.lit(total))
        .select("_key", "_cost")
        .orderBy(F.col("_cost").desc())
        .limit(4 * tasks)
        .collect()
    )
    placed, slots = plan_tasks(total, [(r["_key"], r["_cost"]) for r in heavy], tasks)
    exact = _exact_targets(part.sparkSession, tasks)
    slot = F.element_at(
        F.array(*[F.lit(exact[t]) for t in slots]), (F.pmod(F.col("_key"), F.lit(len(slots))) + 1).cast("int")
    )
    if placed:
        lookup = F.create_map(*[F.lit(v) for k, t in placed.items() for v in (k, exact[t])])
        slot = F.coalesce(lookup[F.col("_key")], slot)
    return keyed.repartition(tasks, slot.cast("long")).drop("_cost", "_key")  # long: as _exact_targets hashed


def plan_tasks(
    total: int, heavy: list[tuple[int, int]], tasks: int, slots_per_task: int = 16
) -> tuple[dict[int, int], list[int]]:
    """Longest-processing-time placement of the heavy (key, cost) notes, and a slot table that gives
    each task a share of the light notes in proportion to its remaining capacity."""
    loads = [0] * tasks
    placed = {}
    for key, c in sorted(heavy, key=lambda kc: -kc[1]):
        t = min(range(tasks), key=loads.__getitem__)
        placed[key] = t
        loads[t] += c
    target = total / tasks
    room = [max(target - load, 0.0) for load in loads]
    if not sum(room):
        room = [1.0] * tasks
    n = tasks * slots_per_task
    share = [r * n / sum(room) for r in room]
    counts = [int(s) for s in share]
    for t in sorted(range(tasks), key=lambda t: counts[t] - share[t])[: n - sum(counts)]:  # largest remainders
        counts[t] += 1
    return placed, [t for t in range(tasks) for _ in range(counts[t])]


_EXACT_TARGETS: dict[int, list[int]] = {}  # by task count: Spark's hash is fixed, so once per process


def _exact_targets(spark, tasks: int) -> list[int]:
    """For each partition index p, a long whose Spark hash partitioning (pmod(murmur3(v), tasks), what
    `repartition(tasks, col)` uses) is p: found by asking Spark to hash candidates, once per task count."""
    if tasks in _EXACT_TARGETS:
        return _EXACT_TARGETS[tasks]
    found: dict[int, int] = {}
    n = 32 * tasks
    while len(found) < tasks:
        rows = spark.range(n - 32 * tasks, n).select("id", F.pmod(F.hash("id"), F.lit(tasks)).alias("p")).collect()
        for r in rows:
            found.setdefault(r["p"], r["id"])
        n += 32 * tasks
    _EXACT_TARGETS[tasks] = [found[p] for p in range(tasks)]
    return _EXACT_TARGETS[tasks]


def retried_errors(pending: DataFrame, errors: DataFrame, model_id: str) -> DataFrame:
    """(note_id, text_sha256) of `embed`-stage error rows for `model_id` whose note this run embeds
    again: a model-step failure is retried by the next incremental run, and its old row goes once the
    retry is committed (`read` and `check` rows describe the input itself and stay)."""
    keys = pending.select("note_id", text_hash().alias("_sha")).distinct()
    rows = errors.where((F.col("model_id") == model_id) & (F.col("stage") == "embed")).select("note_id", "text_sha256")
    return rows.join(keys, (rows["note_id"] == keys["note_id"]) & (rows["text_sha256"] == keys["_sha"]), "left_semi")


@dataclass(frozen=True)
class RunPlan:
    """One run, decided before any work: what makes it this run (`identity`, hashed into `run_id`; `app_id`
    is the Delta transaction app id of its commits), the notes it owes (`notes`: the input, or in
    incremental mode what is not yet embedded or recorded, persisted; `all_notes` the whole input there),
    how many there are (`input_rows`, of `input_total`), `chunks` of them, the first chunk not committed
    by an earlier attempt (`first`, the resume point), and `tasks` per chunk."""

    identity: dict
    run_id: str
    app_id: str
    chunks: int
    first: int
    tasks: int
    notes: DataFrame
    all_notes: DataFrame
    input_rows: int
    input_total: int
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # names this driver's files (its own only)

    def parts(self) -> Iterator[tuple[Chunk, DataFrame]]:
        """Each chunk still to commit and its notes, balanced over `tasks` tasks of about equal work."""
        chunked = with_chunk(self.notes, self.chunks)
        for c in range(self.first, self.chunks):
            ctx = Chunk(c, self.chunks, self.run_id, self.app_id, f"{self.run_id}-c{c:05d}-{self.attempt}")
            yield ctx, balance(chunked.where(chunked["_chunk"] == c).drop("_chunk"), self.tasks)

    def release(self) -> None:
        """Drop the persisted notes."""
        self.notes.unpersist()
        if self.all_notes is not self.notes:
            self.all_notes.unpersist()


def run_description(cfg: JobConfig, model_id: str, fingerprint: list) -> dict:
    """What makes two invocations the same run: input data, columns, model, output, result-changing options
    (the task and its window pooling only where they are not the embedding task's, so embedding runs keep
    the ids they had before there were tasks)."""
    heads = {"task": cfg.task, "window_pooling": cfg.window_pooling} if cfg.task != "embed" else {}
    return {
        **heads,
        "input": fingerprint,
        "format": cfg.input_format,
        "id": [cfg.id_col, cfg.id_type],
        "text": cfg.text_col,
        "model": model_id,
        "granularity": cfg.granularity,
        "mode": cfg.mode,
        "vector_dtype": cfg.vector_dtype,
        "chunk_notes": cfg.chunk_notes,
        "partition_by": cfg.partition_by,
        "options": {k: getattr(cfg.options, k) for k in RESULT_OPTIONS},
    }


def plan(
    cfg: JobConfig, notes: DataFrame, writer: Writer, model_id: str, fingerprint: list, default_tasks: int
) -> RunPlan:
    """The run: its identity (input fingerprint, columns, model, output and result-changing options; in
    incremental mode the output tables' versions too), the notes it owes (read and counted once, persisted),
    its chunks, run id, and where an earlier attempt of it stopped (the writer's committed transaction)."""
    from pyspark import StorageLevel

    ident = run_description(cfg, model_id, fingerprint)
    all_notes = notes
    if cfg.mode == "incremental":
        cols = ["note_id", "text_sha256", "model_id"]
        done = done_keys(writer.read(cfg.out, cols), writer.read(cfg.errors_path, cols + ["stage"]), model_id)
        notes = pending(notes, done)
        ident["tables"] = [writer.version(cfg.out), writer.version(cfg.errors_path)]
        all_notes = all_notes.persist(StorageLevel.DISK_ONLY)  # the input's size, beside what is left of it
        total = all_notes.count()
    notes = notes.persist(StorageLevel.DISK_ONLY)  # read (and planned) once, reused by every chunk
    n_in = notes.count()
    if cfg.mode != "incremental":
        all_notes, total = notes, n_in
    # Nothing to embed: no commit at all (an overwrite still commits, to empty the table).
    chunks = 0 if n_in == 0 and cfg.mode != "overwrite" else n_chunks(n_in, cfg.chunk_notes)
    ident["chunks"] = chunks
    rid = cfg.run_id or run_id(ident)
    app_id = f"clinlong-{rid}"
    first = writer.committed_version(cfg.out, app_id) + 1
    if first and first >= chunks:
        log.info("run %s: all %d chunk(s) were committed by an earlier attempt; nothing to do", rid, chunks)
    elif first:
        log.info("run %s: chunks 0..%d of %d were committed by an earlier attempt; resuming", rid, first - 1, chunks)
    tasks = cfg.partitions or default_tasks
    log.info(
        "run %s: %d input rows in %d chunk(s) of ~%d notes, up to %d task(s) per chunk",
        rid,
        n_in,
        chunks,
        cfg.chunk_notes or n_in,
        tasks,
    )
    return RunPlan(ident, rid, app_id, chunks, first, tasks, notes, all_notes, n_in, total)


def delete_stale(writer: Writer, plan: RunPlan, cfg: JobConfig, model_id: str) -> dict:
    """Incremental mode, after the new rows are committed, one merge commit per table and kind: rows
    (and error rows) of notes whose text changed, and `embed` error rows of earlier runs for notes this
    run embedded again. Idempotent, so a crash between the steps is finished by a rerun. Returns the
    counts deleted (stale_rows_deleted, retried_error_rows_deleted)."""
    cols = ["note_id", "text_sha256", "model_id"]
    out, errors = writer.read(cfg.out, cols), writer.read(cfg.errors_path, cols + ["stage", "run_id"])
    deleted = {"stale_rows_deleted": 0, "retried_error_rows_deleted": 0}
    model = F.lit(model_id).alias("model_id")
    if out is not None:
        deleted["stale_rows_deleted"] = writer.delete_matching(
            cfg.out, stale(plan.all_notes, out, model_id).select("*", model)
        )
    if errors is not None:
        writer.delete_matching(cfg.errors_path, stale(plan.all_notes, errors, model_id).select("*", model))
        retried = retried_errors(plan.notes, errors, model_id).select("*", model)
        deleted["retried_error_rows_deleted"] = writer.delete_matching(
            cfg.errors_path, retried, f"t.stage = 'embed' AND t.run_id <> '{plan.run_id}'"
        )
    return deleted
