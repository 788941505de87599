"""Where tables live: the URIs users name (local paths, `file:`, `s3a://`, `s3://`, `abfss://`, `gs://`,
`dbfs:/`, `/Volumes/…`), the form delta-rs takes them in, the storage options it and pyarrow need, and
a filesystem rooted at a table. Needs no Spark; credentials are never logged.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from clinlong.pipelines.core.errors import StorageError  # noqa: F401 - re-exported: defined in core.errors

# Schemes delta-rs (object_store) opens; `s3a`/`s3n` are Hadoop's names for the same S3 buckets.
_DELTA_RS_SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "s3n": "s3",
    "gs": "gs",
    "abfss": "abfss",
    "abfs": "abfs",
    "az": "az",
    "adl": "adl",
    "azure": "azure",
    "r2": "r2",
    "memory": "memory",
}


def scheme(uri: str) -> str:
    """The URI's scheme in lower case ('' for a plain local path, also on Windows drives)."""
    s = urlparse(uri).scheme.lower()
    return "" if len(s) <= 1 else s


def is_local(uri: str) -> bool:
    return scheme(uri) in ("", "file")


def local_path(uri: str) -> str:
    """A local path for `uri` (`file:/x`, `file:///x` or a plain path)."""
    return urlparse(uri).path if scheme(uri) == "file" else uri


def delta_rs_uri(uri: str) -> str:
    """`uri` as delta-rs opens it: local paths plain, `s3a://b/k` as `s3://b/k` (the same bucket).
    Raises StorageError for schemes delta-rs cannot open (dbfs:, hdfs:), naming `--writer delta-spark`."""
    s = scheme(uri)
    if s in ("", "file"):
        return os.path.abspath(local_path(uri))
    if s in _DELTA_RS_SCHEMES:
        return _DELTA_RS_SCHEMES[s] + uri[len(s) :]
    raise StorageError(
        f"delta-rs cannot open {s}: locations such as {uri}; run on a cluster with delta-spark "
        f"and pass --writer delta-spark, or name the table by an s3://, abfss://, gs:// or local path"
    )


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--storage-option KEY=VALUE` strings as delta-rs storage options. They add to (and win over) the
    standard environment variables that delta-rs and pyarrow read in every process by themselves
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP, AZURE_*,
    GOOGLE_*), so secrets set in the executors' environment never travel in task closures."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise StorageError(f"--storage-option takes KEY=VALUE (e.g. AWS_REGION=us-east-1), got {p.split('=')[0]!r}")
        out[key.strip()] = value
    return out


def table_filesystem(uri: str, options: dict[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the table's root in it: the local filesystem for local tables, else
    delta-rs' own object-store handler (the same credentials and endpoint its commits use)."""
    if is_local(uri):
        return pafs.LocalFileSystem(), delta_rs_uri(uri)
    from deltalake.fs import DeltaStorageHandler

    return pafs.PyFileSystem(DeltaStorageHandler(delta_rs_uri(uri), options or {})), ""


def open_table(table_uri: str, storage_options: dict | None = None, version: int | None = None):
    """The delta-rs `DeltaTable` at `table_uri` (at `version` when given), or None where there is no table yet:
    the one place a DeltaTable is built, so every reader, writer and tool opens a table by the same rule
    (`delta_rs_uri`: `s3a://` as `s3://`, local paths absolute) with the same `--storage-option`s. Raises
    StorageError for locations delta-rs cannot open (dbfs:, hdfs:). `delta.sink.open_table` is this function."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(delta_rs_uri(table_uri), version=version, storage_options=storage_options or None)
    except TableNotFoundError:
        return None


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if root else rel
