"""Delta output through delta-rs: executors write Parquet files into the table folder, the driver
commits them (`deltalake`'s write-transaction API). No vectors pass through the driver.

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
import pyarrow.parquet as pq

META_SCHEMA = ("path string, size long, file_rows long, partition_values string, err_path string, err_size long, "
               "err_rows long, rows long, notes long, embedded long, tokens long, windows long, errors string, "
               "warnings string, device string, gpus string")


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
    rows: int
    partition_values: dict = field(default_factory=dict)


class CommitConflict(Exception):
    """Another writer changed the table in a way this commit cannot be reconciled with."""


def _fs(table_uri: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(table_uri) if "://" in table_uri else (fs.LocalFileSystem(), table_uri)


def write_part(table: pa.Table, table_uri: str, prefix: str = "", partition: dict | None = None) -> tuple[str, int]:
    """Write one Parquet file into the table folder (or its partition's folder); return its relative path
    and size. The file is written under a temporary name and renamed, so a killed task never leaves a
    half-written file under a final name."""
    filesystem, root = _fs(table_uri)
    sub = partition_dir(partition) if partition else ""
    if sub:
        root = f"{root}/{sub}"
    filesystem.create_dir(root, recursive=True)
    name = f"part-{prefix + '-' if prefix else ''}{uuid.uuid4().hex}.zstd.parquet"
    local = type(filesystem).__name__ == "LocalFileSystem"
    target = f"{root}/{name}.tmp" if local else f"{root}/{name}"  # object stores: one PUT is atomic
    with filesystem.open_output_stream(target) as out:
        pq.write_table(table, out, compression="zstd")
    if local:
        filesystem.move(target, f"{root}/{name}")
    return (f"{sub}/{name}" if sub else name), filesystem.get_file_info(f"{root}/{name}").size


def remove_unreferenced(table_uri: str, prefix: str, keep: set[str]) -> int:
    """Delete this run's files named `part-{prefix}-*` that are not in `keep` (leftovers of failed task
    attempts or of a chunk another process committed); return how many. Only files the caller's own
    driver attempt wrote should match `prefix`."""
    from pyarrow import fs

    filesystem, root = _fs(table_uri)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True, recursive=True))
    except FileNotFoundError:
        return 0
    gone = 0
    for info in infos:
        rel = info.path[len(root.rstrip("/")) + 1:]
        if info.type == fs.FileType.File and info.base_name.startswith(f"part-{prefix}-") and rel not in keep:
            filesystem.delete_file(info.path)
            gone += 1
    return gone


def _stats(rows: int) -> str:
    return json.dumps({"numRecords": rows, "minValues": {}, "maxValues": {}, "nullCount": {}})


def committed_version(table_uri: str, app_id: str) -> int:
    """The last chunk committed under `app_id`, or -1 (also when the table does not exist)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        v = DeltaTable(table_uri).transaction_version(app_id)
    except TableNotFoundError:
        return -1
    return -1 if v is None else int(v)


def commit(table_uri: str, files: list[WrittenFile], schema: pa.Schema, mode: str, info: dict,
           txn: tuple[str, int] | None = None, partition_by: str = "") -> int | None:
    """Commit the written files as one table version; return the version, or None when `txn` shows the
    chunk was already committed (by an earlier attempt of this run). Raises CommitConflict."""
    from deltalake import CommitProperties, DeltaTable, Schema, Transaction
    from deltalake.exceptions import CommitFailedError, TableNotFoundError
    from deltalake.transaction import AddAction, create_table_with_add_actions

    now = int(time.time() * 1000)
    adds = [AddAction(f.path, f.size, f.partition_values, now, True, _stats(f.rows)) for f in files]
    partitioning = [partition_by] if partition_by else None
    props = CommitProperties(custom_metadata={"clinlong": json.dumps(info)},
                             app_transactions=[Transaction(*txn)] if txn else None)
    for attempt in range(2):
        try:
            dt = DeltaTable(table_uri)
        except TableNotFoundError:
            try:
                create_table_with_add_actions(table_uri, Schema.from_arrow(schema), adds, mode="append",
                                              partition_by=partitioning, commit_properties=props)
                return DeltaTable(table_uri).version()
            except Exception:  # noqa: BLE001 - another writer created it first: commit into it
                if attempt or not DeltaTable.is_deltatable(table_uri):
                    raise
                continue
        done = dt.transaction_version(txn[0]) if txn else None
        if txn and done is not None and done >= txn[1]:
            return None
        try:
            dt.create_write_transaction(adds, mode=mode, schema=Schema.from_arrow(schema), partition_by=partitioning,
                                        commit_properties=props)
        except CommitFailedError as e:
            if txn and committed_version(table_uri, txn[0]) >= txn[1]:
                return None  # a concurrent attempt of the same run committed this chunk
            raise CommitConflict(f"another writer changed {table_uri} during this commit ({e}); "
                                 "committed chunks are kept: rerun the same command to finish") from None
        return DeltaTable(table_uri).version()
    raise AssertionError("unreachable")


def existing_table_schema(table_uri: str) -> pa.Schema | None:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return pa.schema(DeltaTable(table_uri).schema().to_arrow())
    except TableNotFoundError:
        return None
