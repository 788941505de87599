"""`python -m clinlong.pipelines.neighbours` on tables of every vector dtype and granularity: the ranking
equals cosine computed here with numpy, float16 tables read as float16 halves, non-note tables refused in one
line. Tables are written with delta-rs from the output schema (no Spark)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from clinlong.pipelines.core.schema import _vectors, table_schema
from clinlong.pipelines.jobs.neighbours import main, nearest

DIM = 8


def write(path, granularity: str, vectors: np.ndarray, vector_dtype: str = "float32") -> str:
    schema = table_schema(granularity, pa.int64(), vector_dtype)
    n = len(vectors)
    cols = {
        "note_id": pa.array(np.arange(1, n + 1), pa.int64()),
        "embedding": _vectors([vectors], DIM, vector_dtype),
        "model_id": pa.array(["m@1"] * n),
        "text_sha256": pa.array(["0" * 64] * n),
    }
    for name in ("n_tokens", "n_windows", "sentence_index", "token_index", "begin", "end"):
        cols[name] = pa.array([0] * n, pa.int32())
    cols["token"] = pa.array(["x"] * n)
    write_deltalake(str(path), pa.table({f.name: cols[f.name] for f in schema}, schema=schema))
    return str(path)


@pytest.fixture(scope="module")
def vectors():
    v = np.random.default_rng(0).normal(size=(12, DIM)).astype(np.float32)
    v[5] = np.nan  # a note without a vector (null): never a neighbour, never a query
    return v


def cosine_ranking(v: np.ndarray, query: int, k: int) -> list[tuple[int, float]]:
    ok = ~np.isnan(v).any(axis=1)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    sims = {i + 1: float(u[i] @ u[query - 1]) for i in range(len(v)) if ok[i] and i + 1 != query}
    return sorted(sims.items(), key=lambda kv: -kv[1])[:k]


@pytest.mark.parametrize("vector_dtype,atol", [("float32", 1e-6), ("float16", 2e-3)])
def test_nearest_reads_every_vector_dtype(tmp_path, vectors, vector_dtype, atol):
    table = write(tmp_path / "t", "note", vectors, vector_dtype)
    want = cosine_ranking(vectors.astype(np.float16).astype(np.float32) if vector_dtype == "float16" else vectors, 3, 4)
    got = nearest(table, 3, k=4)
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=atol)


def test_cli_float16_and_refusals_are_one_line(tmp_path, vectors, capsys):
    note16 = write(tmp_path / "n16", "note", vectors, "float16")
    assert main([note16, "--note-id", "3", "--k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("nearest notes to note 3") and len(out) == 3
    for granularity in ("sentence", "token"):
        table = write(tmp_path / granularity, granularity, vectors)
        assert main([table, "--note-id", "3"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is a {granularity}-granularity table" in err[0], err
    for argv in (
        [note16, "--note-id", "6"],
        [note16, "--note-id", "99"],
        [str(tmp_path / "none"), "--note-id", "1"],
        [note16, "--note-id", "1", "--storage-option", "novalue"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
