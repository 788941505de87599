"""Parquet files written by Spark tasks straight into a Delta table's folder (local or an object store,
through delta-rs' storage layer): right-sized by a rolling writer, each described by what its Delta add
action records (path, size, statistics, partition values). Committing them is the Delta layer's work
(pipelines.delta.sink); this module needs neither Spark nor a Delta log.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clinlong.pipelines.core.storage import is_local, join, table_filesystem

STATS_COLUMN = "note_id"  # the column every table is looked up by: its min/max let readers and deletes skip files


def partition_dir(values: dict) -> str:
    """Hive-style folder for partition values (col=value, escaped; null as Hive's default partition)."""
    from urllib.parse import quote

    return "/".join(f"{k}={'__HIVE_DEFAULT_PARTITION__' if v is None else quote(str(v), safe=' ')}"
                    for k, v in values.items())


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

    def __init__(self, table_uri: str, schema: pa.Schema, target_bytes: int, prefix: str = "",
                 partition: dict | None = None, storage_options: dict | None = None):
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
        self.files.append(WrittenFile(f"{self.sub}/{f.name}" if self.sub else f.name, size,
                                      _stats(f.rows, f.lo, f.hi, f.nulls), self.partition))


def _tell(stream, estimate: int) -> int:
    """Bytes written to `stream` so far (an estimate where the stream cannot tell)."""
    try:
        return int(stream.tell())
    except Exception:  # noqa: BLE001 - some object-store streams do not track their position
        return estimate


def _stats(rows: int, lo=None, hi=None, nulls: int = 0) -> str:
    """Delta add-action statistics: numRecords, and min/max/null count of note_id (exact, untruncated)."""
    have = lo is not None
    return json.dumps({"numRecords": rows, "minValues": {STATS_COLUMN: lo} if have else {},
                       "maxValues": {STATS_COLUMN: hi} if have else {}, "nullCount": {STATS_COLUMN: nulls}})


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
        rel = info.path[len(root.rstrip("/")) + 1:] if root else info.path
        if info.type == fs.FileType.File and info.base_name.startswith(f"part-{prefix}-") and rel not in keep:
            filesystem.delete_file(info.path)
            gone += 1
    return gone
