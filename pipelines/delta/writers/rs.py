"""The delta-rs writer, both ends of it: the task function that writes right-sized Parquet files straight
into the output and errors tables' folders (local or an object store, through delta-rs' storage layer) and
returns one metadata row per file (what its Delta add action records: path, size, statistics, partition
values) plus one counts row, and the driver side that commits those files with delta-rs (`delta.sink`).
No vectors pass through the driver.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import DataFrame

from clinlong.pipelines.core import batches, faults
from clinlong.pipelines.core.batches import COUNT_KEYS, TaskCounts
from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.core.errors import OutputError
from clinlong.pipelines.core.head_runs import engine_class
from clinlong.pipelines.core.schema import OutputSpec, build_errors, null_vector_counts
from clinlong.pipelines.core.storage import StorageError, delta_rs_uri, is_local, join, table_filesystem
from clinlong.pipelines.delta.sink import commit, committed_version, delete_matching, existing_table_schema, open_table
from clinlong.pipelines.delta.writers.base import KEY_MATCH, Embedded, Totals, Writer
from clinlong.pipelines.spark.executor import task_embedder
from clinlong.pipelines.spark.jars import is_table_name
from clinlong.pipelines.spark.progress import ProgressReporter
from clinlong.pipelines.spark.sources import read_delta_rs
from clinlong.pipelines.spark.tasks import ArrowFn

log = logging.getLogger("clinlong.job")

# What a task returns to the driver: one row per file it wrote (table "out" or "err") and one of its counts
# (table ""), with the task's partition and clock times.
META_SCHEMA = pa.schema(
    [(n, pa.string()) for n in ("table", "path")]
    + [("size", pa.int64()), ("file_rows", pa.int64())]
    + [(n, pa.string()) for n in ("partition_values", "stats")]
    + [(n, pa.int64()) for n in COUNT_KEYS]
    + [(n, pa.string()) for n in ("errors", "warnings", "device", "gpus")]
    + [("task", pa.int64()), ("started", pa.float64()), ("finished", pa.float64())]
)

STATS_COLUMN = "note_id"  # the column every table is looked up by: its min/max let readers and deletes skip files


def partition_dir(values: dict) -> str:
    """Hive-style folder for partition values (col=value, escaped; null as Hive's default partition)."""
    from urllib.parse import quote

    return "/".join(
        f"{k}={'__HIVE_DEFAULT_PARTITION__' if v is None else quote(str(v), safe=' ')}" for k, v in values.items()
    )


@dataclass(frozen=True)
class WrittenFile:
    """A Parquet file a task wrote into a table folder: what its Delta add action records."""

    path: str  # relative to the table root
    size: int
    stats: str  # Delta's per-file statistics (JSON): numRecords, min/max and null count of note_id
    partition_values: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(json.loads(self.stats)["numRecords"])


@dataclass
class _OpenFile:
    name: str
    stream: object
    writer: pq.ParquetWriter
    rows: int = 0
    nulls: int = 0
    written: int = 0  # bytes
    lo: object = None  # min/max note_id so far
    hi: object = None

    def add(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=table.num_rows)
        self.rows += table.num_rows
        self.written = _tell(self.stream, self.written + table.nbytes)
        ids = table.column(STATS_COLUMN)
        self.nulls += ids.null_count
        if ids.null_count < len(ids):
            lo, hi = (v.as_py() for v in pc.min_max(ids).values())
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)


class RollingWriter:
    """Parquet files of about `target_bytes` for one table (and partition), written by one task.

    Rows are buffered up to half the target and written as one row group; a file that has reached the
    target is closed when the next row group arrives, and the task's last rows go into the open file,
    so every file but a small task's only one is between half and twice the target. Each file is
    written under a temporary name and renamed on local disks (one PUT is atomic on object stores)."""

    def __init__(
        self,
        table_uri: str,
        schema: pa.Schema,
        target_bytes: int,
        prefix: str = "",
        partition: dict | None = None,
        storage_options: dict | None = None,
    ):
        self.fs, root = table_filesystem(table_uri, storage_options)
        self.local = is_local(table_uri)
        self.sub = partition_dir(partition) if partition else ""
        self.root = join(root, self.sub) if self.sub else root
        self.schema, self.target, self.prefix, self.partition = schema, target_bytes, prefix, partition or {}
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.files: list[WrittenFile] = []
        self._open: _OpenFile | None = None

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.buffer.append(table)
            self.buffered += table.nbytes
            if self.buffered >= self.target / 2:
                self._flush()

    def close(self) -> list[WrittenFile]:
        """Write what is buffered into the open file, close it, and return every file written."""
        if self.buffer:
            self._flush(final=True)
        self._close_file()
        return self.files

    def _flush(self, final: bool = False) -> None:
        if self._open is not None and self._open.written >= self.target and not final:
            self._close_file()
        if self._open is None:
            if self.root:
                self.fs.create_dir(self.root, recursive=True)
            name = f"part-{self.prefix + '-' if self.prefix else ''}{uuid.uuid4().hex}.zstd.parquet"
            stream = self.fs.open_output_stream(join(self.root, name + (".tmp" if self.local else "")))
            self._open = _OpenFile(name, stream, pq.ParquetWriter(stream, self.schema, compression="zstd"))
        self._open.add(pa.concat_tables(self.buffer))
        self.buffer, self.buffered = [], 0

    def _close_file(self) -> None:
        f, self._open = self._open, None
        if f is None:
            return
        f.writer.close()
        f.stream.close()
        final = join(self.root, f.name)
        if self.local:
            self.fs.move(final + ".tmp", final)
        size = self.fs.get_file_info(final).size
        self.files.append(
            WrittenFile(
                f"{self.sub}/{f.name}" if self.sub else f.name,
                size,
                _stats(f.rows, f.lo, f.hi, f.nulls),
                self.partition,
            )
        )


def _tell(stream, estimate: int) -> int:
    """Bytes written to `stream` so far (an estimate where the stream cannot tell)."""
    try:
        return int(stream.tell())
    except Exception:  # noqa: BLE001 - some object-store streams do not track their position
        return estimate


def _stats(rows: int, lo=None, hi=None, nulls: int = 0) -> str:
    """Delta add-action statistics: numRecords, and min/max/null count of note_id (exact, untruncated)."""
    have = lo is not None
    return json.dumps(
        {
            "numRecords": rows,
            "minValues": {STATS_COLUMN: lo} if have else {},
            "maxValues": {STATS_COLUMN: hi} if have else {},
            "nullCount": {STATS_COLUMN: nulls},
        }
    )


def remove_unreferenced(table_uri: str, prefix: str, keep: set[str], storage_options: dict | None = None) -> int:
    """Delete this run's files named `part-{prefix}-*` that are not in `keep` (leftovers of failed task
    attempts or of a chunk another process committed); return how many. Only files the caller's own
    driver attempt wrote should match `prefix`."""
    from pyarrow import fs

    filesystem, root = table_filesystem(table_uri, storage_options)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True, recursive=True))
    except FileNotFoundError:
        return 0
    gone = 0
    for info in infos:
        rel = info.path[len(root.rstrip("/")) + 1 :] if root else info.path
        if info.type == fs.FileType.File and info.base_name.startswith(f"part-{prefix}-") and rel not in keep:
            filesystem.delete_file(info.path)
            gone += 1
    return gone


@dataclass(frozen=True)
class PartTarget:
    """Where a task writes: the output and errors tables, file-name prefix (run, chunk, driver attempt),
    the file size to aim for, delta-rs storage options, and where progress goes."""

    table_uri: str
    errors_uri: str
    prefix: str
    run_id: str
    error_schema: pa.Schema
    target_bytes: int = 256 << 20
    storage_options: dict = field(default_factory=dict)
    chunk: int = 0
    progress: tuple | None = None  # the driver's JobProgress address


def embed_partition(artifact_path: str, options: EmbedOptions, spec: OutputSpec, target: PartTarget) -> ArrowFn:
    """For delta-rs: the task writes its output and errors rows into files of about the target size
    (one rolling writer per table and partition value) and returns one metadata row per file written
    (its Delta add action's fields) plus one row of the task's counts, for the driver's commit."""

    def run(rows: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        started = time.time()
        progress = ProgressReporter(target.progress, target.chunk)

        def writer(uri: str, schema: pa.Schema, values: dict | None = None) -> RollingWriter:
            return RollingWriter(uri, schema, target.target_bytes, target.prefix, values, target.storage_options)

        outs: dict[str, RollingWriter] = {}
        errs = writer(target.errors_uri, target.error_schema)
        counts = TaskCounts()
        with task_embedder(artifact_path, options, engine_class(spec.task)) as (emb, loaded):
            counts.n["model_loads"] += loaded
            for b in batches.embed_batches(emb, rows):
                written = 0
                for values, table in batches.tables(spec, b):
                    key = json.dumps(values, sort_keys=True)
                    if key not in outs:
                        outs[key] = writer(target.table_uri, spec.file_schema, values or None)
                    outs[key].write(table)
                    written += table.num_rows
                    b.warnings.update(null_vector_counts(table, spec.granularity))  # spans no piece covers
                errors = b.error_rows()
                if errors:
                    errs.write(build_errors(target.error_schema, errors, spec.model_id, target.run_id))
                c = batches.counts(b, written)
                counts.add(c)
                progress.add(c["notes"], c["tokens"])
        files = [("out", f) for w in outs.values() for f in w.close()] + [("err", f) for f in errs.close()]
        faults.point("task-after-part")
        progress.send()
        ctx = TaskContext.get()
        task = {"task": ctx.partitionId() if ctx else 0, "started": started, "finished": time.time()}
        metas = [
            {
                "table": t,
                "path": f.path,
                "size": f.size,
                "file_rows": f.rows,
                "stats": f.stats,
                "partition_values": json.dumps(f.partition_values),
                **task,
            }
            for t, f in files
        ]
        metas.append({"table": "", **counts.as_row(), **batches.where(emb), **task})
        yield pa.RecordBatch.from_pylist(metas, schema=META_SCHEMA)

    return run


class DeltaRsWriter(Writer):
    name = "delta-rs"

    def __init__(self, *args):
        super().__init__(*args)
        for uri in (self.cfg.out, self.cfg.errors_path):
            if is_table_name(uri):
                raise OutputError(
                    f"{uri} names a catalog table, which delta-rs cannot write: use --writer delta-spark "
                    "(python -m adds its JARs) or a path"
                )
            try:
                delta_rs_uri(uri)
            except StorageError as e:
                raise OutputError(str(e)) from None

    def committed_version(self, uri: str, app_id: str) -> int:
        return committed_version(uri, app_id, self.options)

    def version(self, uri: str) -> int | None:
        dt = open_table(uri, self.options)
        return None if dt is None else dt.version()

    def read(self, uri: str, columns: list[str]) -> DataFrame | None:
        return None if self.version(uri) is None else read_delta_rs(self.spark, uri, self.options, columns)

    def existing_schema(self, uri: str) -> pa.Schema | None:
        return existing_table_schema(uri, self.options)

    def embed_chunk(self, part, ctx, profile=None, progress=None) -> Embedded:
        from pyspark.sql.pandas.types import from_arrow_schema

        cfg = self.cfg
        target = PartTarget(
            cfg.out,
            cfg.errors_path,
            ctx.prefix,
            ctx.run_id,
            self.err_schema,
            int(cfg.target_file_mb * (1 << 20)),
            self.options,
            ctx.index,
            progress,
        )
        task = embed_partition(self.artifact_path, cfg.options, self.spec, target)
        metas = [r.asDict() for r in part.mapInArrow(task, from_arrow_schema(META_SCHEMA), profile=profile).collect()]
        files = {
            t: [
                WrittenFile(m["path"], m["size"], m["stats"], json.loads(m["partition_values"]))
                for m in metas
                if m["table"] == t
            ]
            for t in ("out", "err")
        }
        return Embedded(ctx, Totals.of([m for m in metas if not m["table"]]), files)

    def commit_chunk(self, chunk: Embedded, info: dict) -> int | None:
        cfg, ctx, files = self.cfg, chunk.ctx, chunk.payload
        mode, txn = self._mode(ctx), (ctx.app_id, ctx.index)
        faults.point("driver-before-commit")
        if files["err"] or mode == "overwrite":
            commit(cfg.errors_path, files["err"], self.err_schema, mode, info, txn, storage_options=self.options)
        faults.point("driver-between-commits")
        version = commit(
            cfg.out,
            files["out"],
            self.spec.schema,
            mode,
            info,
            txn,
            partition_by=cfg.partition_by,
            storage_options=self.options,
        )
        faults.point("driver-after-commit")
        if version is None:
            log.info(
                "chunk %d: already committed by another attempt of run %s; its files are discarded",
                ctx.index,
                ctx.run_id,
            )
        remove_unreferenced(
            cfg.out, ctx.prefix, {f.path for f in files["out"]} if version is not None else set(), self.options
        )
        remove_unreferenced(cfg.errors_path, ctx.prefix, {f.path for f in files["err"]}, self.options)
        log.info(
            "chunk %d/%d committed: %d notes in %d task(s), %d output file(s)%s",
            ctx.index + 1,
            ctx.count,
            chunk.totals.notes,
            chunk.totals.tasks,
            len(files["out"]),
            f", table version {version}" if version is not None else "",
        )
        return version

    def delete_matching(self, uri, keys, condition=""):
        predicate = KEY_MATCH + (f" AND {condition}" if condition else "")
        return delete_matching(uri, keys.toArrow(), predicate, self.options, {"operation": "clinlong delete"})
