"""End-to-end parity: vectors in the Delta table equal Hugging Face LongformerModel's for the same pieces.

The expected values are computed here from the checkpoint's own tokenizer and transformers' model
(LongformerModel, BigBirdModel), with plain loops, independently of the pipeline's engine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable
from transformers import AutoTokenizer

from clinlong.pipelines.core.text import detect_sentences, tokenize
from tests.conftest import PHI_MARKER, ROOT, hf_reference, write_test_notes

ATOL = 1e-4  # the export's tolerance for the tiny size


@functools.cache
def _tokenizer(checkpoint: str):
    return AutoTokenizer.from_pretrained(checkpoint)


def _hf_pieces(checkpoint, text: str, base: int = 0):
    """Content pieces of `text` encoded whole: (vectors, starts, ends) with offsets into the note. A
    SentencePiece piece that begins a word ("▁...") starts at the word, not at the space before it
    (the README's definition)."""
    tok = _tokenizer(str(checkpoint))
    enc = tok(text, return_offsets_mapping=True)
    vecs = hf_reference(checkpoint, enc["input_ids"])[1:-1]
    starts, ends = [], []
    for piece, (s, e) in zip(tok.convert_ids_to_tokens(enc["input_ids"])[1:-1], enc["offset_mapping"][1:-1]):
        if piece.startswith("\u2581"):
            while s < len(text) and text[s].isspace():
                s += 1
            e = max(e, min(s + 1, len(text)))
        starts.append(s + base)
        ends.append(e + base)
    return vecs, starts, ends


def expected(checkpoint, text: str, context: str):
    """note vector, sentence vectors, token vectors (first piece), by definition."""
    sents = detect_sentences(text)
    toks = tokenize(text, sents)
    if context == "note":
        runs = [_hf_pieces(checkpoint, text)]
    else:
        runs = [_hf_pieces(checkpoint, text[b : e + 1], b) for b, e in sents]
    vecs = np.concatenate([r[0] for r in runs])
    starts = sum((r[1] for r in runs), [])
    ends = sum((r[2] for r in runs), [])
    note = vecs.mean(0)
    sent_vecs = [vecs[[i for i, s in enumerate(starts) if b <= s <= e]].mean(0) for b, e in sents]
    tok_vecs = []
    for b, _, _ in toks:
        first = next(i for i, (s, t) in enumerate(zip(starts, ends)) if s <= b < t)
        tok_vecs.append(vecs[first])
    return note, sents, sent_vecs, toks, tok_vecs


def rows_match_hugging_face(table: pd.DataFrame, notes_csv, checkpoint, granularity: str, context: str) -> int:
    """Assert every output row of every usable note equals `expected`'s (offsets, tokens, vectors); return
    how many notes were checked. Rows of notes sharing an id are told apart by text_sha256."""
    notes = pd.read_csv(notes_csv, keep_default_na=False)
    checked = 0
    for _, row in notes.iterrows():
        text = row.TEXT
        if not text.strip():
            continue
        sha = hashlib.sha256(text.encode()).hexdigest()
        rows = table[(table.note_id == row.ROW_ID) & (table.text_sha256 == sha)]
        note, sents, sent_vecs, toks, tok_vecs = expected(checkpoint, text, context)
        if granularity == "note":
            assert len(rows) == 1
            np.testing.assert_allclose(rows.embedding.iloc[0], note, atol=ATOL)
            assert rows.n_tokens.iloc[0] > 0 and rows.n_windows.iloc[0] >= 1
        elif granularity == "sentence":
            got = rows.sort_values("sentence_index")
            assert list(zip(got.begin, got.end)) == sents
            np.testing.assert_allclose(np.stack(got.embedding), np.stack(sent_vecs), atol=ATOL)
        else:
            got = rows.sort_values("token_index")
            assert list(zip(got.begin, got.end)) == [(b, e) for b, e, _ in toks]
            assert list(got.token) == [text[b : e + 1] for b, e, _ in toks]
            assert list(got.sentence_index) == [s for _, _, s in toks]
            np.testing.assert_allclose(np.stack(got.embedding), np.stack(tok_vecs), atol=ATOL)
        checked += 1
    return checked


def _spark_submit(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
    }
    submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    return subprocess.run(
        [
            submit,
            "--master",
            "local[2]",
            "--conf",
            "spark.ui.enabled=false",
            str(ROOT / "pipelines" / "embed_notes.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def notes_csv(tmp_path_factory):
    return write_test_notes(tmp_path_factory.mktemp("notes") / "NOTEEVENTS.csv")


@pytest.mark.slow
@pytest.mark.parametrize("granularity,context", [("note", "note"), ("sentence", "sentence"), ("token", "note")])
def test_spark_submit_parity(granularity, context, notes_csv, tiny_artifact, tiny_checkpoint, tmp_path):
    out = tmp_path / "table"
    proc = _spark_submit(
        "--notes",
        str(notes_csv),
        "--model",
        str(tiny_artifact),
        "--out",
        str(out),
        "--granularity",
        granularity,
        "--context",
        context,
        "--id-type",
        "long",
        "--partitions",
        "2",
        "--precision",
        "fp32",
    )  # the parity contract is fp32's
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PHI_MARKER not in proc.stdout + proc.stderr
    assert "rows in 11, embedded 9, errors 2" in proc.stdout and "errors in " in proc.stdout
    # spark-submit's session logs at WARN, as python -m does: Spark's start-up lines only, not one per task
    info = [line for line in proc.stderr.splitlines() if " INFO " in line]
    assert len(info) < 80 and not any("Finished task" in line for line in info), len(info)
    # the model was loaded into the Python workers while the driver planned; the embedding tasks reused them
    assert "models loaded by the embedding tasks: 0 (the others were preloaded)" in proc.stdout
    table = DeltaTable(str(out)).to_pyarrow_table().to_pandas()
    assert rows_match_hugging_face(table, notes_csv, tiny_checkpoint, granularity, context) == 9
    assert set(table.model_id) == {json.loads((tiny_artifact / "manifest.json").read_text())["model_id"]}
