"""Delta output through delta-rs: executors write right-sized Parquet files into the table folder
(pipelines.delta.writers.rs), the driver commits them (`deltalake`'s write-transaction API) with statistics in
every add action; merge deletes and faithful reads. No vectors pass through the driver.

Exactly once: each commit carries a Delta transaction identifier (app id = the run, version = the
chunk), read back with `transaction_version` before work starts and checked again right before the
commit; Delta's conflict checker rejects a concurrent commit of the same (app id, version). Files of a
chunk that never got committed are orphans no reader sees; the run removes its own, `vacuum` the rest.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from clinlong.pipelines.core.errors import CommitConflict  # noqa: F401 - re-exported: defined in core.errors
from clinlong.pipelines.core.storage import delta_rs_uri, is_local, open_table

__all__ = [
    "CommitConflict",
    "commit",
    "committed_version",
    "delete_matching",
    "existing_table_schema",
    "open_table",
    "read_table",
]  # open_table: the one place a DeltaTable is built (core.storage, no Spark: sources use it too)


def committed_version(table_uri: str, app_id: str, storage_options: dict | None = None) -> int:
    """The last chunk committed under `app_id`, or -1 (also when the table does not exist)."""
    dt = open_table(table_uri, storage_options)
    v = dt.transaction_version(app_id) if dt is not None else None
    return -1 if v is None else int(v)


def commit(
    table_uri: str,
    files: list,
    schema: pa.Schema,
    mode: str,
    info: dict,
    txn: tuple[str, int] | None = None,
    partition_by: str = "",
    storage_options: dict | None = None,
) -> int | None:
    """Commit the written files (`writers.rs.WrittenFile`: path, size, stats, partition values) as one table
    version; return the version, or None when `txn` shows the
    chunk was already committed (by an earlier attempt of this run). Raises CommitConflict."""
    from deltalake import CommitProperties, Schema, Transaction
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, create_table_with_add_actions

    uri, opts = delta_rs_uri(table_uri), storage_options or None
    now = int(time.time() * 1000)
    adds = [AddAction(f.path, f.size, f.partition_values, now, True, f.stats) for f in files]
    partitioning = [partition_by] if partition_by else None
    props = CommitProperties(
        custom_metadata={"clinlong": json.dumps(info)}, app_transactions=[Transaction(*txn)] if txn else None
    )
    for attempt in range(2):
        dt = open_table(uri, opts)
        if dt is None:
            try:
                create_table_with_add_actions(
                    uri,
                    Schema.from_arrow(schema),
                    adds,
                    mode="append",
                    partition_by=partitioning,
                    commit_properties=props,
                    storage_options=opts,
                )
                return open_table(uri, opts).version()
            except Exception:  # noqa: BLE001 - another writer created it first: commit into it
                if attempt or open_table(uri, opts) is None:
                    raise
                continue
        done = dt.transaction_version(txn[0]) if txn else None
        if txn and done is not None and done >= txn[1]:
            return None
        try:
            dt.create_write_transaction(
                adds, mode=mode, schema=Schema.from_arrow(schema), partition_by=partitioning, commit_properties=props
            )
        except CommitFailedError as e:
            if txn and committed_version(uri, txn[0], opts) >= txn[1]:
                return None  # a concurrent attempt of the same run committed this chunk
            raise CommitConflict(
                f"another writer changed {table_uri} during this commit ({e}); "
                "committed chunks are kept: rerun the same command to finish"
            ) from None
        return open_table(uri, opts).version()
    raise AssertionError("unreachable")


def delete_matching(
    table_uri: str, keys: pa.Table, predicate: str, storage_options: dict | None = None, info: dict | None = None
) -> int:
    """Delete the rows of the table that match a row of `keys` under `predicate` (aliases `t` for the
    table, `s` for the keys) in one merge commit; return how many. No commit when `keys` is empty."""
    from deltalake import CommitProperties

    dt = open_table(table_uri, storage_options)
    if dt is None or keys.num_rows == 0:
        return 0
    props = CommitProperties(custom_metadata={"clinlong": json.dumps(info or {})})
    metrics = (
        dt.merge(source=keys, predicate=predicate, source_alias="s", target_alias="t", commit_properties=props)
        .when_matched_delete()
        .execute()
    )
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
