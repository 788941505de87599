"""Spark NLP's annotation schema (`sparknlp.annotation.Annotation.arrayType()`), built without its JVM.

Columns produced by our stages have exactly this type and Spark NLP's annotator type names and column
metadata, so a cluster with Spark NLP can consume them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.sql import types as T

from clinlong.pipelines.core.schema import MAX_LIST_VALUES

DOCUMENT, TOKEN, WORD_EMBEDDINGS, SENTENCE_EMBEDDINGS = "document", "token", "word_embeddings", "sentence_embeddings"
CATEGORY, NAMED_ENTITY, CHUNK = "category", "named_entity", "chunk"  # heads (issue 24) and NerConverter

ANNOTATION = T.StructType(
    [
        T.StructField("annotatorType", T.StringType(), False),
        T.StructField("begin", T.IntegerType(), False),
        T.StructField("end", T.IntegerType(), False),
        T.StructField("result", T.StringType(), False),
        T.StructField("metadata", T.MapType(T.StringType(), T.StringType(), True), False),
        T.StructField("embeddings", T.ArrayType(T.FloatType(), True), False),
    ]
)
ANNOTATIONS = T.ArrayType(ANNOTATION, True)

_ARROW_ANNOTATION = pa.struct(
    [
        pa.field("annotatorType", pa.string()),
        pa.field("begin", pa.int32()),
        pa.field("end", pa.int32()),
        pa.field("result", pa.string()),
        pa.field("metadata", pa.map_(pa.string(), pa.string())),
        pa.field("embeddings", pa.list_(pa.float32())),
    ]
)
ARROW_ANNOTATIONS = pa.list_(_ARROW_ANNOTATION)


def column_metadata(annotator_type: str, dimension: int | None = None, ref: str | None = None) -> dict:
    """Spark NLP's column metadata: annotatorType, and for embeddings the dimension and storage ref."""
    meta: dict = {"annotatorType": annotator_type}
    if dimension is not None:
        meta["dimension"] = int(dimension)
    if ref is not None:
        meta["ref"] = ref
    return meta


def annotations_array(rows: list[list[tuple]], vectors: np.ndarray | None = None, dim: int = 0) -> pa.Array:
    """Arrow annotation arrays, one list per row.

    Each annotation is (annotatorType, begin, end, result, metadata dict). With `vectors` (one row
    per annotation, in order) the embeddings field is filled from that buffer without per-value Python;
    a row holding NaN (no vector) gives an empty `embeddings` array, never a made-up vector.
    """
    flat = [a for row in rows for a in row]
    n = len(flat)
    if n * dim > MAX_LIST_VALUES:
        raise OverflowError(f"{n} annotations of {dim} values overflow one Arrow array's int32 offsets")
    if vectors is None:
        emb = pa.array([[]] * n, pa.list_(pa.float32()))
    else:
        mat = np.ascontiguousarray(vectors, np.float32).reshape(n, dim)
        null = np.isnan(mat).any(axis=1)
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(np.where(null, 0, dim), out=offsets[1:])
        emb = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array((mat[~null] if null.any() else mat).reshape(-1)), type=pa.list_(pa.float32())
        )
    structs = pa.StructArray.from_arrays(
        [
            pa.array([a[0] for a in flat], pa.string()),
            pa.array([a[1] for a in flat], pa.int32()),
            pa.array([a[2] for a in flat], pa.int32()),
            pa.array([a[3] for a in flat], pa.string()),
            pa.array([list(a[4].items()) for a in flat], pa.map_(pa.string(), pa.string())),
            emb,
        ],
        fields=list(_ARROW_ANNOTATION),
    )
    row_offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(r) for r in rows], out=row_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(row_offsets), structs)
