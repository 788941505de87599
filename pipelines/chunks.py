"""One chunk of a run: embed it in Spark tasks, write its files, commit it to the output and errors
tables under the run's Delta transaction id (app id = run, version = chunk). Two writers: delta-rs
(executors write Parquet parts, the driver commits them) and Spark's own Delta writer (delta-spark).
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import faults
from .artifact import Artifact

if TYPE_CHECKING:
    from .embed_notes import JobConfig


def _log(msg: str) -> None:
    print(f"[embed_notes] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a run: its number, the run's Delta app id, the file-name prefix of this attempt."""

    index: int
    count: int
    run_id: str
    app_id: str
    prefix: str


class Totals:
    """Counts summed over the metadata rows of the chunks this invocation ran."""

    def __init__(self):
        self.notes = self.embedded = self.tokens = self.windows = self.rows = 0
        self.errors, self.warnings, self.devices, self.gpus = Counter(), Counter(), Counter(), Counter()

    def add(self, metas: list[dict]) -> None:
        for m in metas:
            for k in ("notes", "embedded", "tokens", "windows", "rows"):
                setattr(self, k, getattr(self, k) + int(m.get(k) or 0))
            self.errors.update(json.loads(m.get("errors") or "{}"))
            self.warnings.update(json.loads(m.get("warnings") or "{}"))
            if int(m.get("notes") or 0):  # one per batch (a batch's other files carry no counts)
                self.devices[m.get("device") or "unknown"] += 1
                self.gpus.update(g for g in (m.get("gpus") or "").split(",") if g)


def write_delta_rs(spark, part, artifact: Artifact, cfg: "JobConfig", spec, err_schema, ctx: Chunk,
                   counters: dict, totals: Totals, summary: Callable[[], dict], profile=None) -> int | None:
    """One chunk: executors write Parquet parts into both table folders; the driver commits the errors
    table, then the output table, each under the transaction id (run, chunk)."""
    from pipelines.delta_sink import META_SCHEMA, WrittenFile, commit, remove_unreferenced
    from pipelines.tasks import PartTarget, embed_partition

    target = PartTarget(cfg.out, cfg.errors_path, ctx.prefix, ctx.run_id, err_schema)
    task = embed_partition(str(artifact.path), cfg.options, spec, target, counters)
    metas = [r.asDict() for r in part.mapInArrow(task, META_SCHEMA, profile=profile).collect()]
    totals.add(metas)
    info = {**summary(), "chunk": ctx.index}
    mode = "overwrite" if cfg.mode == "overwrite" and ctx.index == 0 else "append"
    faults.point("driver-before-commit")
    errs = [WrittenFile(m["err_path"], m["err_size"], m["err_rows"]) for m in metas if m["err_path"]]
    if errs or mode == "overwrite":
        commit(cfg.errors_path, errs, err_schema, mode, info, (ctx.app_id, ctx.index))
    faults.point("driver-between-commits")
    outs = [WrittenFile(m["path"], m["size"], m["file_rows"], json.loads(m["partition_values"]))
            for m in metas if m["path"]]
    version = commit(cfg.out, outs, spec.schema, mode, info, (ctx.app_id, ctx.index), partition_by=cfg.partition_by)
    faults.point("driver-after-commit")
    if version is None:
        _log(f"chunk {ctx.index}: already committed by another attempt of run {ctx.run_id}; its files are discarded")
    remove_unreferenced(cfg.out, ctx.prefix, {f.path for f in outs} if version is not None else set())
    remove_unreferenced(cfg.errors_path, ctx.prefix, {f.path for f in errs})
    _log(f"chunk {ctx.index + 1}/{ctx.count} committed: {sum(m['notes'] for m in metas)} notes"
         + (f", table version {version}" if version is not None else ""))
    return version


def write_delta_spark(spark, part, artifact: Artifact, cfg: "JobConfig", spec, err_schema, ctx: Chunk,
                      counters: dict, totals: Totals, summary: Callable[[], dict], profile=None) -> int:
    """One chunk through Spark's Delta writer (Databricks, clusters with delta-spark): output rows and
    errors rows come from one pass (persisted), each write idempotent via txnAppId/txnVersion."""
    from pyspark import StorageLevel
    from pyspark.sql.pandas.types import from_arrow_schema

    from pipelines.tasks import combined_schema, embed_rows_and_errors

    before = {k: (dict(c.value) if isinstance(c.value, dict) else c.value) for k, c in counters.items()}
    rows = part.mapInArrow(embed_rows_and_errors(str(artifact.path), cfg.options, spec, err_schema, ctx.run_id, counters),
                           from_arrow_schema(combined_schema(spec.schema, err_schema)), profile=profile)
    rows = rows.persist(StorageLevel.DISK_ONLY)
    rows.count()
    delta = {}
    for k, c in counters.items():
        if isinstance(c.value, dict):
            delta[k] = json.dumps({r: n - before[k].get(r, 0) for r, n in c.value.items() if n - before[k].get(r, 0)})
        else:
            delta[k] = c.value - before[k]
    totals.add([delta])
    mode = "overwrite" if cfg.mode == "overwrite" and ctx.index == 0 else "append"
    info = json.dumps({**summary(), "chunk": ctx.index})
    out_rows, error_rows = split_rows(rows, spec.schema, err_schema)
    for uri, sel, flag in ((cfg.errors_path, error_rows, True), (cfg.out, out_rows, False)):
        parts = [cfg.partition_by] if cfg.partition_by and not flag else []
        (sel.write.format("delta").mode(mode).partitionBy(*parts).option("txnAppId", ctx.app_id).option("txnVersion", ctx.index)
         .option("userMetadata", info).save(uri))
    rows.unpersist()
    return int(spark.sql(f"DESCRIBE HISTORY delta.`{cfg.out}` LIMIT 1").collect()[0]["version"])


def split_rows(rows, schema, err_schema):
    """The combined stream of `tasks.embed_rows_and_errors` as (output rows, errors rows) DataFrames."""
    from pyspark.sql import functions as F

    return tuple(rows.where(F.col("_error") == F.lit(flag)).select(
        *[F.col(("err_" if flag else "") + f.name).alias(f.name) for f in names])
        for flag, names in ((False, schema), (True, err_schema)))
