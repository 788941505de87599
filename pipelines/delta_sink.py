"""Delta output through delta-rs: executors write Parquet files into the table folder, the driver
commits them all in one Delta transaction (`deltalake`'s write-transaction API). No vectors pass
through the driver; a failed run commits nothing, so readers never see a half-written version.
"""
from __future__ import annotations

import json
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

META_SCHEMA = ("path string, size long, rows long, notes long, tokens long, windows long, skipped string, "
               "device string, gpus string")


def write_part(table: pa.Table, table_uri: str) -> tuple[str, int]:
    """Write one Parquet file into the table folder; return its relative path and size."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(table_uri) if "://" in table_uri else (fs.LocalFileSystem(), table_uri)
    filesystem.create_dir(root, recursive=True)
    name = f"part-{uuid.uuid4().hex}.zstd.parquet"
    with filesystem.open_output_stream(f"{root}/{name}") as out:
        pq.write_table(table, out, compression="zstd")
    return name, filesystem.get_file_info(f"{root}/{name}").size


def _stats(rows: int) -> str:
    return json.dumps({"numRecords": rows, "minValues": {}, "maxValues": {}, "nullCount": {}})


def commit(table_uri: str, parts: list[dict], schema: pa.Schema, mode: str, info: dict) -> int:
    """Commit the written files as one table version; return the version."""
    from deltalake import CommitProperties, DeltaTable, Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions
    from deltalake.exceptions import TableNotFoundError

    now = int(time.time() * 1000)
    adds = [AddAction(p["path"], int(p["size"]), {}, now, True, _stats(int(p["rows"]))) for p in parts]
    props = CommitProperties(custom_metadata={"clinlong": json.dumps(info)})
    try:
        dt = DeltaTable(table_uri)
    except TableNotFoundError:
        create_table_with_add_actions(table_uri, Schema.from_arrow(schema), adds, mode="append", commit_properties=props)
        return DeltaTable(table_uri).version()
    dt.create_write_transaction(adds, mode=mode, schema=Schema.from_arrow(schema), commit_properties=props)
    return DeltaTable(table_uri).version()


def existing_table_schema(table_uri: str) -> pa.Schema | None:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return pa.schema(DeltaTable(table_uri).schema().to_arrow())
    except TableNotFoundError:
        return None
