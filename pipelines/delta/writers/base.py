"""What every writer shares: the `Writer` interface the job drives, a run's `Chunk`, the chunk totals a
writer returns, and the checks made before any work (a foreign folder, another schema, another model).

The two writers (`rs.DeltaRsWriter`, `spark.DeltaSparkWriter`) each hold both ends of their format: what
their Spark tasks emit and how the driver turns it into a Delta commit.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from clinlong.pipelines.core.batches import COUNT_KEYS
from clinlong.pipelines.core.config import JobConfig
from clinlong.pipelines.core.errors import OutputError
from clinlong.pipelines.core.schema import OutputSpec
from clinlong.pipelines.core.storage import is_local, local_path

# Rows of `keys` (aliased s) that the table's rows (t) are deleted by: the same note, text and model.
KEY_MATCH = "t.note_id = s.note_id AND t.text_sha256 = s.text_sha256 AND t.model_id = s.model_id"


@dataclass(frozen=True)
class Chunk:
    """One chunk of a run: its number, the run's Delta app id, the file-name prefix of this attempt."""

    index: int
    count: int
    run_id: str
    app_id: str
    prefix: str


class Totals:
    """Counts summed over the tasks' counts rows of the chunks this invocation committed."""

    def __init__(self):
        self.notes = self.embedded = self.tokens = self.windows = self.rows = self.model_loads = self.tasks = 0
        self.errors, self.warnings, self.devices, self.gpus = Counter(), Counter(), Counter(), Counter()

    def add(self, counts: list[dict]) -> None:
        for m in counts:
            for k in COUNT_KEYS:
                setattr(self, k, getattr(self, k) + int(m.get(k) or 0))
            self.errors.update(_as_dict(m.get("errors")))
            self.warnings.update(_as_dict(m.get("warnings")))
            self.tasks += 1
            self.devices[m.get("device") or "unknown"] += 1
            self.gpus.update(g for g in (m.get("gpus") or "").split(",") if g)

    def merge(self, other: "Totals") -> None:
        for k in (*COUNT_KEYS, "tasks"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k in ("errors", "warnings", "devices", "gpus"):
            getattr(self, k).update(getattr(other, k))

    @classmethod
    def of(cls, counts: list[dict]) -> "Totals":
        """The totals of the tasks' counts rows (one per task, or per batch for delta-spark)."""
        t = cls()
        t.add(counts)
        return t

    def __add__(self, other: "Totals") -> "Totals":
        t = Totals()
        t.merge(self)
        t.merge(other)
        return t


@dataclass
class Embedded:
    """A chunk its tasks have embedded and written, not yet committed: its totals (for the commit info and
    the run's summary) and what the writer commits (files for delta-rs, persisted rows for delta-spark)."""

    ctx: Chunk
    totals: Totals
    payload: object


def _as_dict(v) -> dict:
    return v if isinstance(v, dict) else json.loads(v or "{}")


class Writer:
    """What the job needs of a Delta writer: resume checks, reads, chunk commits, deletes."""

    name = ""

    def __init__(
        self, spark: SparkSession, cfg: JobConfig, artifact_path: str, spec: OutputSpec, err_schema: pa.Schema
    ):
        self.spark, self.cfg, self.artifact_path = spark, cfg, artifact_path
        self.spec, self.err_schema = spec, err_schema
        self.options = cfg.storage_options

    def committed_version(self, uri: str, app_id: str) -> int:
        """The last chunk committed to `uri` under `app_id`, or -1."""
        raise NotImplementedError

    def version(self, uri: str) -> int | None:
        """The table's current version, or None when there is no table."""
        raise NotImplementedError

    def read(self, uri: str, columns: list[str]) -> DataFrame | None:
        """The table's current rows (these columns), or None when there is no table."""
        raise NotImplementedError

    def existing_schema(self, uri: str) -> pa.Schema | None:
        raise NotImplementedError

    def embed_chunk(self, part: DataFrame, ctx: Chunk, profile=None, progress: tuple | None = None) -> Embedded:
        """Run the chunk's tasks (`profile`: their ResourceProfile; `progress`: the driver's JobProgress
        address); return what they embedded and its totals. Nothing is committed yet."""
        raise NotImplementedError

    def commit_chunk(self, chunk: Embedded, info: dict) -> int | None:
        """Commit an embedded chunk, errors table first, under the run's transaction id, with `info` (the run's
        summary so far) in the commit info; return the output table's version, or None where an earlier
        attempt of the run had committed the chunk. Raises CommitConflict."""
        raise NotImplementedError

    def delete_matching(self, uri: str, keys: DataFrame, condition: str = "") -> int:
        """Delete the rows of `uri` matching (note_id, text_sha256, model_id) of `keys` [and `condition`
        on the table's row `t`] in one commit; return how many."""
        raise NotImplementedError

    def check_outputs(self) -> None:
        """Refuse before any work: a non-Delta folder as output, or a table of another schema to append to."""
        for uri, want in ((self.cfg.out, self.spec.schema), (self.cfg.errors_path, self.err_schema)):
            if is_local(uri):
                path = local_path(uri)
                foreign = (
                    not os.path.isdir(os.path.join(path, "_delta_log"))
                    and os.path.isdir(path)
                    and any(not (e.name.startswith("part-") and ".zstd.parquet" in e.name) for e in os.scandir(path))
                )
                if foreign:  # (uncommitted parts of a killed first chunk are ours: the folder is a table in the making)
                    raise OutputError(
                        f"{uri} is a non-empty folder but not a Delta table; choose another --out/--errors-out"
                    )
            existing = self.existing_schema(uri)
            if existing is not None and self.cfg.mode != "overwrite" and existing != want:
                raise OutputError(f"{uri} holds a table with another schema; use --mode overwrite or another --out")
            if existing is not None and self.cfg.mode != "overwrite":
                self._check_one_model(uri)

    def _check_one_model(self, uri: str) -> None:
        """A table holds one model's rows: appending or incrementally adding another model's (a changed
        checkpoint, another family) would leave a note with rows of two models. Refused in one line; --mode
        overwrite replaces the table. (Re-exporting an unchanged checkpoint keeps its model_id.)"""
        from pyspark.sql import functions as F

        rows = self.read(uri, ["model_id"])
        other = rows.where(F.col("model_id") != self.spec.model_id).limit(1).collect() if rows is not None else []
        if other:
            raise OutputError(
                f"{uri} holds rows of model {other[0].model_id}, not of this run's model "
                f"{self.spec.model_id}; a table holds one model's vectors: use --mode overwrite to "
                "replace them, or another --out/--errors-out"
            )

    def _mode(self, ctx: Chunk) -> str:
        return "overwrite" if self.cfg.mode == "overwrite" and ctx.index == 0 else "append"
