"""Delta output through delta-rs: executors write right-sized Parquet files into the table folder (local
or an object store), the driver commits them (`deltalake`'s write-transaction API) with statistics in
every add action. No vectors pass through the driver.

Exactly once: each commit carries a Delta transaction identifier (app id = the run, version = the
chunk), read back with `transaction_version` before work starts and checked again right before the
commit; Delta's conflict checker rejects a concurrent commit of the same (app id, version). Files of a
chunk that never got committed are orphans no reader sees; the run removes its own, `vacuum` the rest.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import delta_rs_uri, is_local, join, table_filesystem

# What a task returns to the driver: one row per file it wrote (table "out" or "err") and one of its counts
# (table ""), with the task's partition and clock times.
META_SCHEMA = pa.schema([(n, pa.string()) for n in ("table", "path")] + [("size", pa.int64()), ("file_rows", pa.int64())]
                        + [(n, pa.string()) for n in ("partition_values", "stats")]
                        + [(n, pa.int64()) for n in ("notes", "embedded", "rows", "tokens", "windows")]
                        + [(n, pa.string()) for n in ("errors", "warnings", "device", "gpus")]
                        + [("task", pa.int64()), ("started", pa.float64()), ("finished", pa.float64())])
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


class CommitConflict(Exception):
    """Another writer changed the table in a way this commit cannot be reconciled with."""


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


def open_table(table_uri: str, storage_options: dict | None = None):
    """The delta-rs table at `table_uri`, or None where there is none yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(delta_rs_uri(table_uri), storage_options=storage_options or None)
    except TableNotFoundError:
        return None


def committed_version(table_uri: str, app_id: str, storage_options: dict | None = None) -> int:
    """The last chunk committed under `app_id`, or -1 (also when the table does not exist)."""
    dt = open_table(table_uri, storage_options)
    v = dt.transaction_version(app_id) if dt is not None else None
    return -1 if v is None else int(v)


def commit(table_uri: str, files: list[WrittenFile], schema: pa.Schema, mode: str, info: dict,
           txn: tuple[str, int] | None = None, partition_by: str = "", storage_options: dict | None = None
           ) -> int | None:
    """Commit the written files as one table version; return the version, or None when `txn` shows the
    chunk was already committed (by an earlier attempt of this run). Raises CommitConflict."""
    from deltalake import CommitProperties, Schema, Transaction
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, create_table_with_add_actions

    uri, opts = delta_rs_uri(table_uri), storage_options or None
    now = int(time.time() * 1000)
    adds = [AddAction(f.path, f.size, f.partition_values, now, True, f.stats) for f in files]
    partitioning = [partition_by] if partition_by else None
    props = CommitProperties(custom_metadata={"clinlong": json.dumps(info)},
                             app_transactions=[Transaction(*txn)] if txn else None)
    for attempt in range(2):
        dt = open_table(uri, opts)
        if dt is None:
            try:
                create_table_with_add_actions(uri, Schema.from_arrow(schema), adds, mode="append",
                                              partition_by=partitioning, commit_properties=props,
                                              storage_options=opts)
                return open_table(uri, opts).version()
            except Exception:  # noqa: BLE001 - another writer created it first: commit into it
                if attempt or open_table(uri, opts) is None:
                    raise
                continue
        done = dt.transaction_version(txn[0]) if txn else None
        if txn and done is not None and done >= txn[1]:
            return None
        try:
            dt.create_write_transaction(adds, mode=mode, schema=Schema.from_arrow(schema), partition_by=partitioning,
                                        commit_properties=props)
        except CommitFailedError as e:
            if txn and committed_version(uri, txn[0], opts) >= txn[1]:
                return None  # a concurrent attempt of the same run committed this chunk
            raise CommitConflict(f"another writer changed {table_uri} during this commit ({e}); "
                                 "committed chunks are kept: rerun the same command to finish") from None
        return open_table(uri, opts).version()
    raise AssertionError("unreachable")


def delete_matching(table_uri: str, keys: pa.Table, predicate: str, storage_options: dict | None = None,
                    info: dict | None = None) -> int:
    """Delete the rows of the table that match a row of `keys` under `predicate` (aliases `t` for the
    table, `s` for the keys) in one merge commit; return how many. No commit when `keys` is empty."""
    from deltalake import CommitProperties

    dt = open_table(table_uri, storage_options)
    if dt is None or keys.num_rows == 0:
        return 0
    props = CommitProperties(custom_metadata={"clinlong": json.dumps(info or {})})
    metrics = (dt.merge(source=keys, predicate=predicate, source_alias="s", target_alias="t",
                        commit_properties=props).when_matched_delete().execute())
    return int(metrics.get("num_target_rows_deleted", 0))


def read_table(table_uri: str, columns: list[str] | None = None, storage_options: dict | None = None) -> pa.Table:
    """The table's current rows through `DeltaTable.to_pyarrow_dataset`, which refuses reader features it
    cannot honour (deletion vectors, column mapping) rather than return rows they removed. Files are read
    with pyarrow's native filesystem, not delta-rs' Python bridge, whose threads make short-lived
    processes abort at exit ("terminate called without an active exception", delta-io/delta-rs#2184)."""
    from pyarrow import fs

    dt = open_table(table_uri, storage_options)
    if dt is None:
        raise FileNotFoundError(f"no Delta table at {table_uri}")
    uri = delta_rs_uri(table_uri)
    native, root = (fs.LocalFileSystem(), uri) if is_local(table_uri) else fs.FileSystem.from_uri(uri)
    return dt.to_pyarrow_dataset(filesystem=fs.SubTreeFileSystem(root, native)).to_table(columns=columns)


def existing_table_schema(table_uri: str, storage_options: dict | None = None) -> pa.Schema | None:
    dt = open_table(table_uri, storage_options)
    return None if dt is None else pa.schema(dt.schema().to_arrow())
