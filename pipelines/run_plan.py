"""What a run is and which notes it owes: the run id behind Delta's transaction identifiers, the
chunk each note belongs to, and for `--mode incremental` the notes still to embed and the rows that
a changed text has made stale. Pure planning over Spark DataFrames; nothing here writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

RESULT_OPTIONS = ("context", "max_length", "case_sensitive", "window_overlap", "token_vector", "precision",
                  "max_chars")  # options that change the output; batch sizes and devices do not


def input_fingerprint(source: str) -> list:
    """Names, sizes and modification times of the input's files (a table name stands for itself), so a
    rerun over the same input is the same run and a changed input is a new one."""
    from pyarrow import fs

    if "://" in source:
        filesystem, root = fs.FileSystem.from_uri(source)
    elif os.path.exists(source):
        filesystem, root = fs.LocalFileSystem(), os.path.abspath(source)
    else:
        return [source]
    info = filesystem.get_file_info(root)
    infos = [info] if info.type == fs.FileType.File else filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    return sorted([i.path[len(root):], i.size, i.mtime_ns] for i in infos if i.type == fs.FileType.File)


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


def done_keys(tables: list[DataFrame | None], model_id: str) -> DataFrame | None:
    """(note_id, text_sha256) already embedded or recorded as errors for `model_id`."""
    keys = [t.where(F.col("model_id") == model_id).select("note_id", "text_sha256") for t in tables if t is not None]
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


def stale(notes: DataFrame, table: DataFrame, model_id: str) -> list[tuple]:
    """(note_id, text_sha256) rows of `table` for `model_id` whose note is in the input with another
    text: the old version of a changed note, to delete once the new one is committed."""
    current = notes.select("note_id", text_hash().alias("_sha")).distinct()
    ids = current.select("note_id").distinct()
    rows = table.where(F.col("model_id") == model_id).select("note_id", "text_sha256").distinct()
    rows = rows.join(ids, "note_id", "left_semi")
    rows = rows.join(current, _null_safe(current, rows, "_sha"), "left_anti")
    return [(r["note_id"], r["text_sha256"]) for r in rows.collect()]


def delete_predicates(keys: list[tuple], model_id: str, per: int = 200) -> list[str]:
    """SQL predicates (delta-rs `delete`) matching exactly these (note_id, text_sha256) pairs, `per` a time."""
    def lit(v) -> str:
        if v is None:
            return "NULL"
        return str(int(v)) if isinstance(v, int) else "'" + str(v).replace("'", "''") + "'"

    def pair(k) -> str:
        nid = "note_id IS NULL" if k[0] is None else f"note_id = {lit(k[0])}"
        sha = "text_sha256 IS NULL" if k[1] is None else f"text_sha256 = {lit(k[1])}"
        return f"({nid} AND {sha})"

    model = f"model_id = {lit(model_id)}"
    return [f"{model} AND ({' OR '.join(pair(k) for k in keys[i:i + per])})" for i in range(0, len(keys), per)]
