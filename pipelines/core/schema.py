"""Output table schemas (the README's output-table contract) and the Arrow builders that fill them.

Beyond the contract's columns: `text_sha256` at every granularity, which keeps notes that share an id
apart (each input row is embedded and kept; identical duplicate rows give identical output rows) and
drives `--mode incremental`. Notes that cannot be embedded go to the errors table (`error_schema`):
id, text hash, stage and reason, never the text.

Vectors are written as Arrow list<float32> built from one flat buffer per batch: no per-element Python.
Arrow lists (and Spark's arrays, which map to them) have int32 offsets, so one array holds at most
MAX_LIST_VALUES floats (or bytes, for float16 vectors): a batch whose rows would hold more is built as
several chunks, each under the limit (a 10,000-note batch at token granularity reaches it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clinlong.pipelines.core.engine import NoteResult

GRANULARITIES = ("note", "sentence", "token")
MAX_LIST_VALUES = 2**31 - 1  # values one Arrow list<…> / binary array can hold (int32 offsets)
VECTOR_DTYPES = ("float32", "float16")


def _vector_type(vector_dtype: str = "float32") -> pa.DataType:
    """array<float>, or for float16 a binary of little-endian halves (Spark and Delta have no float16)."""
    if vector_dtype == "float16":
        return pa.binary()
    if vector_dtype != "float32":
        raise ValueError(f"vector dtype must be one of {VECTOR_DTYPES}, got {vector_dtype!r}")
    return pa.list_(pa.field("element", pa.float32()))


def table_schema(granularity: str, id_type: pa.DataType, vector_dtype: str = "float32",
                 partition_by: str = "") -> pa.Schema:
    """The output table's schema; `partition_by` (an input column carried along as a string) comes last."""
    vec = _vector_type(vector_dtype)
    if granularity == "note":
        fields = [("note_id", id_type), ("n_tokens", pa.int32()), ("n_windows", pa.int32()), ("embedding", vec),
                  ("model_id", pa.string()), ("text_sha256", pa.string())]
    elif granularity == "sentence":
        fields = [("note_id", id_type), ("sentence_index", pa.int32()), ("begin", pa.int32()), ("end", pa.int32()),
                  ("embedding", vec), ("model_id", pa.string()), ("text_sha256", pa.string())]
    elif granularity == "token":
        fields = [("note_id", id_type), ("sentence_index", pa.int32()), ("token_index", pa.int32()),
                  ("begin", pa.int32()), ("end", pa.int32()), ("token", pa.string()), ("embedding", vec),
                  ("model_id", pa.string()), ("text_sha256", pa.string())]
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if partition_by:
        if partition_by in {n for n, _ in fields}:
            raise ValueError(f"cannot partition by {partition_by!r}: it is an output column; rename it in the input")
        fields.append((partition_by, pa.string()))
    return pa.schema([pa.field(n, t) for n, t in fields])


def error_schema(id_type: pa.DataType) -> pa.Schema:
    """The errors table: one row per input row that was not embedded. `stage`: read (malformed input
    row), check (unusable id or text), embed (the model step failed on this note alone)."""
    return pa.schema([pa.field("note_id", id_type), pa.field("text_sha256", pa.string()),
                      pa.field("stage", pa.string()), pa.field("reason", pa.string()),
                      pa.field("model_id", pa.string()), pa.field("run_id", pa.string())])


def build_errors(schema: pa.Schema, rows: list[tuple], model_id: str, run_id: str) -> pa.Table:
    """Errors-table rows from (note_id, text_sha256, stage, reason) tuples."""
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.table({"note_id": cols[0], "text_sha256": cols[1], "stage": cols[2], "reason": cols[3],
                     "model_id": [model_id] * len(rows), "run_id": [run_id] * len(rows)}, schema=schema)


@dataclass(frozen=True)
class OutputSpec:
    """What one output row holds: granularity, Arrow schema, model id, vector size and encoding."""

    granularity: str
    schema: pa.Schema
    model_id: str
    dim: int
    token_vector: str = "first"
    vector_dtype: str = "float32"
    partition_by: str = ""  # Delta partition column (not stored in the Parquet files, by Delta's rule)

    @property
    def file_schema(self) -> pa.Schema:
        return self.schema.remove(self.schema.get_field_index(self.partition_by)) if self.partition_by else self.schema


def _vectors(blocks: list[np.ndarray], dim: int, vector_dtype: str = "float32") -> pa.Array:
    flat = np.concatenate(blocks).astype(np.float32, copy=False).reshape(-1) if blocks else np.zeros(0, np.float32)
    n = len(flat) // dim if dim else 0
    if len(flat) * (2 if vector_dtype == "float16" else 1) > MAX_LIST_VALUES:
        raise OverflowError(f"{n} vectors of {dim} overflow one Arrow array's int32 offsets; build them in chunks")
    if vector_dtype == "float16":
        data = flat.astype("<f2").tobytes()
        offsets = np.arange(0, (n + 1) * dim * 2, dim * 2, dtype=np.int32)
        return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    offsets = np.arange(0, (n + 1) * dim, dim, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=_vector_type())


def build_table(spec: OutputSpec, ids: list, texts: list, results: list[NoteResult]) -> pa.Table:
    """Rows of one Arrow batch of notes at the requested granularity (embedded notes only: the others
    go to the errors table), in chunks that each hold at most MAX_LIST_VALUES vector values."""
    chunks = _value_chunks(spec, results)
    if len(chunks) == 1:
        return _build(spec, ids, texts, results)
    return pa.concat_tables([_build(spec, ids[a:b], texts[a:b], results[a:b]) for a, b in chunks])


def _value_chunks(spec: OutputSpec, results: list[NoteResult]) -> list[tuple[int, int]]:
    """[a, b) ranges of notes whose rows hold at most MAX_LIST_VALUES vector values each."""
    per_row = spec.dim * (2 if spec.vector_dtype == "float16" else 1)
    chunks, start, total = [], 0, 0
    for i, r in enumerate(results):
        if r.skip_reason is not None:
            continue
        rows = 1 if spec.granularity == "note" else len(r.sentences if spec.granularity == "sentence" else r.tokens)
        if total and total + rows * per_row > MAX_LIST_VALUES:
            chunks.append((start, i))
            start, total = i, 0
        total += rows * per_row
    return chunks + [(start, len(results))]


def _build(spec: OutputSpec, ids: list, texts: list, results: list[NoteResult]) -> pa.Table:
    granularity, model_id, dim, schema = spec.granularity, spec.model_id, spec.dim, spec.file_schema
    if granularity == "note":
        keep = [(i, r) for i, r in zip(ids, results) if r.skip_reason is None]
        cols = {
            "note_id": [i for i, _ in keep],
            "n_tokens": [r.n_tokens for _, r in keep],
            "n_windows": [r.n_windows for _, r in keep],
            "embedding": _vectors([r.note_vector()[None] for _, r in keep], dim, spec.vector_dtype),
            "model_id": [model_id] * len(keep),
            "text_sha256": [r.text_sha256 for _, r in keep],
        }
        return pa.table(cols, schema=schema)
    note_ids, sent_idx, begins, ends, blocks, tok_idx, tokens, shas = [], [], [], [], [], [], [], []
    for nid, text, r in zip(ids, texts, results):
        if r.skip_reason is not None:
            continue
        if granularity == "sentence":
            spans = r.sentences
            note_ids += [nid] * len(spans)
            shas += [r.text_sha256] * len(spans)
            sent_idx += range(len(spans))
            begins += [b for b, _ in spans]
            ends += [e for _, e in spans]
            blocks.append(r.sentence_vectors())
        else:
            toks = r.tokens
            note_ids += [nid] * len(toks)
            shas += [r.text_sha256] * len(toks)
            sent_idx += [s for _, _, s in toks]
            tok_idx += range(len(toks))
            begins += [b for b, _, _ in toks]
            ends += [e for _, e, _ in toks]
            tokens += [text[b:e + 1] for b, e, _ in toks]
            blocks.append(r.token_vectors(spec.token_vector))
    cols = {"note_id": note_ids, "sentence_index": sent_idx}
    if granularity == "token":
        cols["token_index"] = tok_idx
    cols.update(begin=begins, end=ends)
    if granularity == "token":
        cols["token"] = tokens
    cols["embedding"] = _vectors([b for b in blocks if len(b)], dim, vector_dtype=spec.vector_dtype)
    cols["model_id"] = [model_id] * len(note_ids)
    cols["text_sha256"] = shas
    return pa.table(cols, schema=schema)
