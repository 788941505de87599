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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from clinlong.pipelines.core.engine import SENTENCE_NO_PIECE, TOKEN_NO_PIECE, NoteResult
from clinlong.pipelines.core.options import check_choice

if TYPE_CHECKING:
    from clinlong.pipelines.core.heads import Head

GRANULARITIES = ("note", "sentence", "token")
TASKS = ("embed", "classify", "ner")  # what the job writes: vectors, a fine-tuned sequence head's labels, entities
MAX_LIST_VALUES = 2**31 - 1  # values one Arrow list<…> / binary array can hold (int32 offsets)
VECTOR_DTYPES = ("float32", "float16")


def _vector_type(vector_dtype: str = "float32") -> pa.DataType:
    """array<float>, or for float16 a binary of little-endian halves (Spark and Delta have no float16)."""
    check_choice("vector dtype", vector_dtype, VECTOR_DTYPES)
    if vector_dtype == "float16":
        return pa.binary()
    return pa.list_(pa.field("element", pa.float32()))


def table_schema(
    granularity: str,
    id_type: pa.DataType,
    vector_dtype: str = "float32",
    partition_by: str = "",
    skip_reasons: bool = False,
) -> pa.Schema:
    """The output table's schema; `partition_by` (an input column carried along as a string) comes last;
    `skip_reasons` (the one-liner's `predict`) adds `skip_reason` (string), see build_table."""
    vec = _vector_type(vector_dtype)
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "note":
        fields = [
            ("note_id", id_type),
            ("n_tokens", pa.int32()),
            ("n_windows", pa.int32()),
            ("embedding", vec),
            ("model_id", pa.string()),
            ("text_sha256", pa.string()),
        ]
    elif granularity == "sentence":
        fields = [
            ("note_id", id_type),
            ("sentence_index", pa.int32()),
            ("begin", pa.int32()),
            ("end", pa.int32()),
            ("embedding", vec),
            ("model_id", pa.string()),
            ("text_sha256", pa.string()),
        ]
    elif granularity == "token":
        fields = [
            ("note_id", id_type),
            ("sentence_index", pa.int32()),
            ("token_index", pa.int32()),
            ("begin", pa.int32()),
            ("end", pa.int32()),
            ("token", pa.string()),
            ("embedding", vec),
            ("model_id", pa.string()),
            ("text_sha256", pa.string()),
        ]
    return _schema(fields, skip_reasons, partition_by)


def head_table_schema(task: str, id_type: pa.DataType, partition_by: str = "", skip_reasons: bool = False) -> pa.Schema:
    """The output table of a fine-tuned head (issue 24, point 4); `partition_by` comes last, as for vectors;
    `skip_reasons` (the one-liner's `predict`) adds `skip_reason` (string): an input that was not run gives one
    row, its other columns null, and its reason there.

    classify: one row per note: `label` (the top-scoring label, from the head's id2label), `scores`
        (array<float>: every label's score, softmax or sigmoid, in the order of) `labels` (array<string>: the
        head's labels in id order), `n_windows` (windows the note was run as; their logits pooled by
        --window-pooling), model_id, text_sha256.
    ner: one row per entity chunk: `chunk_index` (0, 1, ... within the note), `begin`/`end` (character offsets
        into the text as stored, end inclusive, as Spark NLP's annotations), `chunk` (the text between them),
        `entity` (the tags' label without B-/I-), `score` (the mean of its tokens' scores), model_id,
        text_sha256. A note with no entity has one row whose chunk_index, begin, end, chunk, entity and score
        are null: it was run (incremental mode finds it), and nothing was found.
    """
    check_choice("task", task, TASKS[1:])
    if task == "classify":
        fields = [
            ("note_id", id_type),
            ("label", pa.string()),
            ("scores", pa.list_(pa.field("element", pa.float32()))),
            ("labels", pa.list_(pa.field("element", pa.string()))),
            ("n_windows", pa.int32()),
            ("model_id", pa.string()),
            ("text_sha256", pa.string()),
        ]
    else:
        fields = [
            ("note_id", id_type),
            ("chunk_index", pa.int32()),
            ("begin", pa.int32()),
            ("end", pa.int32()),
            ("chunk", pa.string()),
            ("entity", pa.string()),
            ("score", pa.float32()),
            ("model_id", pa.string()),
            ("text_sha256", pa.string()),
        ]
    return _schema(fields, skip_reasons, partition_by)


def _schema(fields: list[tuple[str, pa.DataType]], skip_reasons: bool, partition_by: str) -> pa.Schema:
    """A table's columns, then `skip_reason` (predict's tables) and the partition column, which may not shadow an
    output column (ValueError)."""
    if skip_reasons:
        fields.append(("skip_reason", pa.string()))
    if partition_by:
        if partition_by in {n for n, _ in fields}:
            raise ValueError(f"cannot partition by {partition_by!r}: it is an output column; rename it in the input")
        fields.append((partition_by, pa.string()))
    return pa.schema([pa.field(n, t) for n, t in fields])


def error_schema(id_type: pa.DataType) -> pa.Schema:
    """The errors table: one row per input row that was not embedded. `stage`: read (malformed input
    row), check (unusable id or text), embed (the model step failed on this note alone)."""
    return pa.schema(
        [
            pa.field("note_id", id_type),
            pa.field("text_sha256", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("reason", pa.string()),
            pa.field("model_id", pa.string()),
            pa.field("run_id", pa.string()),
        ]
    )


def build_errors(schema: pa.Schema, rows: list[tuple], model_id: str, run_id: str) -> pa.Table:
    """Errors-table rows from (note_id, text_sha256, stage, reason) tuples."""
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.table(
        {
            "note_id": cols[0],
            "text_sha256": cols[1],
            "stage": cols[2],
            "reason": cols[3],
            "model_id": [model_id] * len(rows),
            "run_id": [run_id] * len(rows),
        },
        schema=schema,
    )


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
    task: str = "embed"  # TASKS: vectors, or a fine-tuned head's output (head_table_schema)
    head: "Head | None" = None  # the artifact's head (classify, ner)
    window_pooling: str = "mean"  # classify: how a long note's windows' logits are combined (heads.pool_windows)

    @property
    def skip_reasons(self) -> bool:
        """True for `predict`'s tables: one row per unusable input and a `skip_reason` column."""
        return "skip_reason" in self.schema.names

    @property
    def file_schema(self) -> pa.Schema:
        return self.schema.remove(self.schema.get_field_index(self.partition_by)) if self.partition_by else self.schema


def _vectors(blocks: list[np.ndarray], dim: int, vector_dtype: str = "float32") -> pa.Array:
    """One vector per row of the stacked blocks; a row holding NaN (no vector: see engine.NoteResult) is null."""
    rows = (
        np.concatenate(blocks).astype(np.float32, copy=False).reshape(-1, dim)
        if blocks and dim
        else np.zeros((0, max(dim, 1)), np.float32)
    )
    null = np.isnan(rows).any(axis=1)
    flat = rows[~null].reshape(-1) if null.any() else rows.reshape(-1)
    n = len(rows)
    if len(flat) * (2 if vector_dtype == "float16" else 1) > MAX_LIST_VALUES:
        raise OverflowError(f"{n} vectors of {dim} overflow one Arrow array's int32 offsets; build them in chunks")
    width = dim * (2 if vector_dtype == "float16" else 1)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.where(null, 0, width), out=offsets[1:])
    if vector_dtype == "float16":
        validity = None if not null.any() else pa.py_buffer(np.packbits(~null, bitorder="little").tobytes())
        data = flat.astype("<f2").tobytes()
        return pa.Array.from_buffers(
            pa.binary(), n, [validity, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)], null_count=int(null.sum())
        )
    mask = pa.array(null) if null.any() else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=_vector_type(), mask=mask)


def read_vectors(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The other end of `_vectors`: an `embedding` column of either vector dtype (array<float>, or binary of
    little-endian float16 halves) as (vectors float32 (n_valid, dim), valid bool (n,)); null rows are left out.
    Raises ValueError for a column of another type or vectors of unequal length."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    present = column.filter(pa.array(valid))
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        rows = [np.frombuffer(b, "<f2") for b in present.to_pylist()]
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        rows = [np.asarray(v, np.float32) for v in present.to_numpy(zero_copy_only=False)]
    else:
        raise ValueError(f"an embedding column of type {column.type} is neither array<float> nor float16 binary")
    if len({len(r) for r in rows}) > 1:
        raise ValueError("the embedding column holds vectors of different lengths")
    return (np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)), valid


def build_table(spec: OutputSpec, ids: list, texts: list, results: list[NoteResult]) -> pa.Table:
    """Rows of one Arrow batch of notes at the requested granularity, in chunks that each hold at most
    MAX_LIST_VALUES vector values. Notes that are not embedded give no row (they go to the errors table),
    except with `spec.skip_reasons` (`predict`): there each gives one row, its vector and per-span columns
    null and its reason in `skip_reason`, in input order. A token or sentence that no piece covers has a
    null vector (and, with `skip_reasons`, engine.TOKEN_NO_PIECE or SENTENCE_NO_PIECE)."""
    if spec.task != "embed":
        return _build_head(spec, ids, texts, results)
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
    reasons = spec.skip_reasons
    nan = np.full((1, dim), np.nan, np.float32)
    if granularity == "note":
        keep = [(i, r) for i, r in zip(ids, results) if reasons or r.skip_reason is None]
        cols = {
            "note_id": [i for i, _ in keep],
            "n_tokens": [r.n_tokens if r.skip_reason is None else None for _, r in keep],
            "n_windows": [r.n_windows if r.skip_reason is None else None for _, r in keep],
            "embedding": _vectors(
                [r.note_vector()[None] if r.skip_reason is None else nan for _, r in keep], dim, spec.vector_dtype
            ),
            "model_id": [model_id] * len(keep),
            "text_sha256": [r.text_sha256 for _, r in keep],
        }
        if reasons:
            cols["skip_reason"] = [r.skip_reason for _, r in keep]
        return pa.table(cols, schema=schema)
    note_ids, sent_idx, begins, ends, blocks, tok_idx, tokens, shas, why = [], [], [], [], [], [], [], [], []
    for nid, text, r in zip(ids, texts, results):
        if r.skip_reason is not None:
            if reasons:  # one row: the input, its reason, no vector
                note_ids.append(nid), shas.append(r.text_sha256), why.append(r.skip_reason)
                sent_idx.append(None), tok_idx.append(None), begins.append(None), ends.append(None)
                tokens.append(None), blocks.append(nan)
            continue
        if granularity == "sentence":
            spans = r.sentences
            note_ids += [nid] * len(spans)
            shas += [r.text_sha256] * len(spans)
            sent_idx += range(len(spans))
            begins += [b for b, _ in spans]
            ends += [e for _, e in spans]
            vecs = r.sentence_vectors()
            why += [SENTENCE_NO_PIECE if m else None for m in np.isnan(vecs).any(axis=1)]
        else:
            toks = r.tokens
            note_ids += [nid] * len(toks)
            shas += [r.text_sha256] * len(toks)
            sent_idx += [s for _, _, s in toks]
            tok_idx += range(len(toks))
            begins += [b for b, _, _ in toks]
            ends += [e for _, e, _ in toks]
            tokens += [text[b : e + 1] for b, e, _ in toks]
            vecs = r.token_vectors(spec.token_vector)
            why += [TOKEN_NO_PIECE if m else None for m in np.isnan(vecs).any(axis=1)]
        blocks.append(vecs)
    cols = {"note_id": note_ids, "sentence_index": sent_idx}
    if granularity == "token":
        cols["token_index"] = tok_idx
    cols.update(begin=begins, end=ends)
    if granularity == "token":
        cols["token"] = tokens
    cols["embedding"] = _vectors([b for b in blocks if len(b)], dim, vector_dtype=spec.vector_dtype)
    cols["model_id"] = [model_id] * len(note_ids)
    cols["text_sha256"] = shas
    if reasons:
        cols["skip_reason"] = why
    return pa.table(cols, schema=schema)


def _build_head(spec: OutputSpec, ids: list, texts: list, results: list[NoteResult]) -> pa.Table:
    """Rows of a fine-tuned head's table (head_table_schema) for one batch; notes that were not run give no row
    (they go to the errors table)."""
    from clinlong.pipelines.core.head_runs import note_entities, note_scores

    schema, head, reasons = spec.file_schema, spec.head, spec.skip_reasons
    cols: dict[str, list] = {n: [] for n in schema.names}

    def row(nid, r: NoteResult, **values) -> None:
        for name in schema.names:
            cols[name].append(values.get(name))
        cols["note_id"][-1], cols["model_id"][-1], cols["text_sha256"][-1] = nid, spec.model_id, r.text_sha256
        if reasons:
            cols["skip_reason"][-1] = r.skip_reason

    for nid, text, r in zip(ids, texts, results):
        if r.skip_reason is not None:
            if reasons:  # predict: one row, the input and its reason
                row(nid, r)
            continue
        if spec.task == "classify":
            label, scores = note_scores(r, head, spec.window_pooling)
            row(nid, r, label=label, scores=scores.tolist(), labels=list(head.labels), n_windows=r.n_windows)
            continue
        found = note_entities(r, head)
        for k, (b, e, entity, score) in enumerate(found):
            row(nid, r, chunk_index=k, begin=b, end=e, chunk=text[b : e + 1], entity=entity, score=score)
        if not found:  # run, nothing found: one row with the note's keys (incremental mode finds it done)
            row(nid, r)
    return pa.table(cols, schema=schema)


def null_vector_counts(table: pa.Table, granularity: str) -> dict[str, int]:
    """Rows of an output table whose vector is null, by reason (engine.TOKEN_NO_PIECE, SENTENCE_NO_PIECE):
    the summary's warnings (none for a head's table: it holds no vectors)."""
    if granularity == "note" or not table.num_rows or "embedding" not in table.schema.names:
        return {}
    n = table.column("embedding").null_count
    return {f"null vector: {TOKEN_NO_PIECE if granularity == 'token' else SENTENCE_NO_PIECE}": n} if n else {}
