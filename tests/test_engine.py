"""The engine in-process: windows stitched from Hugging Face runs, huge notes, bad texts, predict()."""

from __future__ import annotations

import numpy as np
import pytest

from clinlong.pipelines.core.artifact import Artifact, ArtifactError
from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder
from clinlong.pipelines.core.windows import assign_pieces, window_plan
from tests.conftest import hf_reference


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return Artifact.open(tiny_artifact)


def test_long_note_windows_equal_hf_on_the_chosen_window(artifact, tiny_checkpoint):
    from clinlong.export.synthetic_notes import generate_notes

    text = "\n\n".join(n.text for n in generate_notes(12, seed=4))
    max_len, overlap = 1024, 256
    emb = NoteEmbedder(artifact, EmbedOptions(max_length=max_len, window_overlap=overlap, precision="fp32"))
    res = emb.embed([text])[0]
    ids = artifact.tokenizer.encode(text, add_special_tokens=False).ids
    assert res.n_tokens == len(ids) > 3 * max_len
    starts, width = window_plan(len(ids), max_len, overlap)
    assert res.n_windows == len(starts) > 3
    which, pos = assign_pieces(len(ids), starts, width)
    for w, s in enumerate(starts):
        ref = hf_reference(tiny_checkpoint, [0, *ids[s : s + width], 2])[1:-1]
        sel = which == w
        np.testing.assert_allclose(res.piece_vectors[sel], ref[pos[sel]], atol=1e-4)


def test_one_megabyte_note_runs_through_windows(artifact):
    from clinlong.export.synthetic_notes import generate_notes

    notes = generate_notes(400, seed=8)
    text = ""
    while len(text) < 1_000_000:
        text += "\n\n".join(n.text for n in notes)
    text = text[:1_000_000]
    res = NoteEmbedder(artifact).embed([text])[0]
    assert res.skip_reason is None and res.n_windows > 50
    assert res.piece_vectors.shape == (res.n_tokens, artifact.dimension)
    assert np.isfinite(res.piece_vectors).all()
    assert len(res.token_vectors()) == len(res.tokens) and np.isfinite(res.note_vector()).all()


@pytest.mark.parametrize(
    "text,reason",
    [
        (None, "null text"),
        ("", "empty text"),
        (" \n\t ", "whitespace-only text"),
        ("a\x00b", "text contains NUL bytes"),
        (42, "text is int, not a string"),
    ],
)
def test_bad_texts_are_skipped_with_a_reason(artifact, text, reason):
    res = NoteEmbedder(artifact).embed(["Pt. stable.", text])
    assert res[0].skip_reason is None and res[0].n_tokens > 0
    assert res[1].skip_reason == reason and res[1].n_tokens == 0 and res[1].note_vector() is None


def test_case_insensitive_lowercases_before_bpe_and_keeps_offsets(artifact):
    text = "Pt. HAS SOB."
    upper = NoteEmbedder(artifact).embed([text])[0]
    lower = NoteEmbedder(artifact, EmbedOptions(case_sensitive=False)).embed([text])[0]
    same = NoteEmbedder(artifact).embed([text.lower()])[0]
    np.testing.assert_allclose(lower.piece_vectors, same.piece_vectors, atol=1e-6)
    assert not np.allclose(upper.note_vector(), lower.note_vector())
    assert lower.tokens == upper.tokens  # offsets into the original text


def test_altered_artifact_is_refused(tiny_artifact, tmp_path):
    import shutil

    bad = tmp_path / "art"
    shutil.copytree(tiny_artifact, bad)
    with (bad / "tokenizer.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="sha256"):
        Artifact.open(bad)
    with pytest.raises(ArtifactError, match="python -m clinlong.export"):
        Artifact.open(tmp_path)


def test_verified_files_are_not_hashed_again_until_they_change(tiny_artifact, tmp_path, monkeypatch):
    """A node hashes an artifact file once: the driver and each Python worker skip a file verified since its
    last change (device, inode, size, times); any write, a fresh file or a foreign marker folder means hashing."""
    import shutil
    import tempfile

    from clinlong.pipelines.core import artifact as A

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    names = ["tokenizer.json", "encoder.onnx"]
    hashed = []
    real = A.file_sha256
    monkeypatch.setattr(A, "file_sha256", lambda f: hashed.append(f.name) or real(f))

    A.Artifact.open(art, verify=False).verify(names)  # just copied: too fresh to remember
    assert hashed == names and not list((tmp_path / "tmp").glob("clinlong-verified-*/*"))
    monkeypatch.setattr(A.VerifiedFiles, "SETTLE_NS", 0)
    A.Artifact.open(art, verify=False).verify(names)
    assert hashed == names * 2 and len(list((tmp_path / "tmp").glob("clinlong-verified-*/*"))) == 2
    A.Artifact.open(art, verify=False).verify(names)
    assert hashed == names * 2  # remembered: nothing hashed

    with (art / "tokenizer.json").open("r+b") as f:  # same size, new bytes
        f.write(b"X")
    with pytest.raises(ArtifactError, match="sha256"):
        A.Artifact.open(art, verify=False).verify(names)
    assert hashed[-1] == "tokenizer.json"

    folder = next((tmp_path / "tmp").glob("clinlong-verified-*"))
    folder.chmod(0o777)  # a folder others could write markers into is never trusted
    A.Artifact.open(art, verify=False).verify(["encoder.onnx"])
    assert hashed[-1] == "encoder.onnx"


def test_auto_backend_is_torch_and_reads_the_weights_file(tiny_artifact):
    """auto runs torch where installed, at every precision (its threads follow idle cores); onnxruntime only
    on request, fp32 only. A worker verifies and reads the files of its backend alone."""
    from clinlong.pipelines.core import runtime

    art = Artifact.open(tiny_artifact, verify=False)
    assert [runtime.resolve_backend("auto", p) for p in ("auto", "fp32", "bf16", "fp16")] == ["torch"] * 4
    assert sorted(runtime.model_files(art, "torch")) == ["encoder.safetensors", "tokenizer.json"]
    assert sorted(runtime.model_files(art, "onnxruntime")) == ["encoder.onnx", "tokenizer.json"]
    with pytest.raises(ValueError, match="fp32 only"):
        runtime.resolve_backend("onnxruntime", "bf16")
    # the driver verifies what executors may read: with auto, both (each runs torch where it is installed)
    assert runtime.files_to_verify(art, "auto") == ["encoder.onnx", "encoder.safetensors", "tokenizer.json"]
    assert runtime.files_to_verify(art, "onnxruntime") == ["encoder.onnx", "tokenizer.json"]


def test_base_install_without_torch_runs_onnxruntime(monkeypatch):
    """The base install (no torch extra): auto falls back to ONNX Runtime at fp32; bf16 names the extra."""
    from clinlong.pipelines.core import runtime

    monkeypatch.setattr(runtime, "torch_installed", lambda: False)
    assert runtime.choose_backend("auto", "auto", "cpu") == ("onnxruntime", "fp32")
    with pytest.raises(ValueError, match=r"pip install 'clinlong\[torch\]'"):
        runtime.choose_backend("bf16", "auto", "cpu")


def test_predict_in_process_equals_spark(tiny_artifact, spark):
    from clinlong import pipelines

    p = pipelines.load(str(tiny_artifact))
    texts = ["Pt. is stable. He takes ASA q.d.", "IMPRESSION: No acute process."]
    local = p.predict(texts)
    assert list(local.columns[:7]) == ["note_id", "sentence_index", "token_index", "begin", "end", "token", "embedding"]
    assert local.token.iloc[0] == "Pt." and set(local.note_id) == {0, 1}
    sdf = spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "id long, text string")
    remote = p.predict(sdf, id_col="id").toPandas()
    np.testing.assert_allclose(np.stack(local.embedding), np.stack(remote.embedding), atol=1e-6)
    notes = p.predict(texts[0], output_level="document")
    assert len(notes) == 1 and len(notes.embedding.iloc[0]) == 64
    import pandas as pd

    frame = p.predict(pd.DataFrame({"text": texts}), output_level="sentence")
    assert list(frame.note_id) == [0, 0, 1]


def test_pretrained_names_resolve_under_clinlong_models(tiny_artifact, tmp_path, monkeypatch):
    import shutil

    from clinlong import pipelines
    from clinlong.pipelines.spark.stages import LongformerEmbeddings

    monkeypatch.setenv("CLINLONG_MODELS", str(tmp_path))
    with pytest.raises(ArtifactError, match="python -m clinlong.export yikuan8/Clinical-Longformer"):
        pipelines.load("en.embed.longformer.clinical")
    shutil.copytree(tiny_artifact, tmp_path / "clinical_longformer_en")
    assert pipelines.load("en.embed.longformer.clinical").artifact.dimension == 64
    stage = LongformerEmbeddings.pretrained("clinical_longformer", "en")
    assert stage.getDimension() == 64


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", None)])
def test_torch_backend_matches_onnx(artifact, precision, tol):
    """The torch runtime (shared export.encoder definition + exported weights) against ONNX Runtime."""
    from clinlong.export.synthetic_notes import generate_notes

    texts = [n.text for n in generate_notes(6, seed=12)]
    ref = NoteEmbedder(artifact, EmbedOptions(precision="fp32")).embed(texts)
    got = NoteEmbedder(artifact, EmbedOptions(precision=precision, backend="torch")).embed(texts)
    for a, b in zip(ref, got):
        if tol is not None:
            np.testing.assert_allclose(b.piece_vectors, a.piece_vectors, atol=tol)
        else:  # bf16: cosine per token against fp32
            cos = (a.piece_vectors * b.piece_vectors).sum(1) / (
                np.linalg.norm(a.piece_vectors, axis=1) * np.linalg.norm(b.piece_vectors, axis=1)
            )
            assert cos.min() >= 0.999, cos.min()


def test_onnxruntime_backend_refuses_reduced_precision(artifact):
    with pytest.raises(ValueError, match="fp32 only"):
        NoteEmbedder(artifact, EmbedOptions(precision="bf16", backend="onnxruntime"))


def test_predict_on_more_texts_than_the_in_process_limit_runs_in_spark(tiny_artifact, spark, monkeypatch):
    """A list longer than IN_PROCESS_LIMIT goes through Spark, as the README says (it used to run
    in-process whatever its length); a Spark DataFrame needs an id column (row positions from
    monotonically_increasing_id change when Spark re-evaluates)."""
    from clinlong import pipelines
    from clinlong.pipelines.spark.light import IN_PROCESS_LIMIT, EmbeddingsPipeline

    p = pipelines.load(str(tiny_artifact))
    texts = [f"Note {i}. Pt. stable." for i in range(IN_PROCESS_LIMIT + 1)]
    few = p.predict(texts[:3], output_level="document")

    def in_process(*a, **k):
        raise AssertionError("ran in-process")

    monkeypatch.setattr(EmbeddingsPipeline, "_in_process", in_process)
    many = p.predict(texts, output_level="document").sort_values("note_id")
    assert many.note_id.tolist() == list(range(len(texts)))
    np.testing.assert_allclose(np.stack(many.embedding[:3]), np.stack(few.embedding), atol=1e-6)
    with pytest.raises(ValueError, match="id_col"):
        p.predict(spark.createDataFrame([("a",)], "text string"))


def test_predict_on_many_texts_shows_a_progress_bar(tiny_artifact, capsys):
    from clinlong import pipelines

    out = pipelines.load(str(tiny_artifact)).predict(
        [f"Note {i}. Pt. stable." for i in range(40)], output_level="document"
    )
    assert len(out) == 40
    err = capsys.readouterr().err
    assert "[predict]" in err and "40/40" in err and "notes/s" in err and "Pt. stable" not in err


def test_span_means_of_a_long_note_need_no_float64_copy_of_its_pieces():
    """Sentence (and token-mean) vectors of a long note: equal to plain means, computed without a float64
    cumulative sum of every piece vector (which took ~1.5 GB for a 1M-character base-size note)."""
    import tracemalloc

    from clinlong.pipelines.core.engine import NoteResult

    rng = np.random.default_rng(0)
    n, dim = 200_000, 64
    r = NoteResult(
        None,
        "x",
        piece_starts=np.arange(n) * 4,
        piece_ends=np.arange(n) * 4 + 3,
        piece_vectors=rng.standard_normal((n, dim)).astype(np.float32),
    )
    cuts = np.sort(rng.choice(np.arange(1, n), 499, replace=False)) * 4
    begins = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts - 2, [n * 4 - 1]])
    r.sentences = list(zip(begins.tolist(), ends.tolist())) + [(n * 4 + 10, n * 4 + 20)]  # one span with no piece
    tracemalloc.start()
    got = r.sentence_vectors()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < r.piece_vectors.nbytes / 4, peak  # the old cumulative sum alone was 2x the pieces
    pieces = np.searchsorted(r.piece_starts, begins)
    want = [r.piece_vectors[a:b].mean(axis=0) for a, b in zip(pieces, np.append(pieces[1:], n))]
    np.testing.assert_allclose(got[:-1], np.stack(want), atol=1e-5)
    assert np.isnan(got[-1]).all() and r.sentences_without_piece().tolist() == [False] * 500 + [True]  # no vector


def test_first_piece_is_the_first_that_contains_the_character():
    """Pieces sharing a start (a SentencePiece "▁" moved to its word before the word's piece, a multi-byte
    character's byte pieces): a token's first piece is the first of them that contains its first character,
    never a piece that ends before it (which gave "." of "5." no piece) nor the next piece; -1 where no
    piece covers the token (no vector)."""
    from clinlong.pipelines.core.engine import NoteResult

    text = "5. \u00e9 \u200b"  # "▁"(0,1) "5."(0,2), three byte pieces of "é" (3,4); nothing covers U+200B
    r = NoteResult(
        None,
        "x",
        piece_starts=np.array([0, 0, 3, 3, 3]),
        piece_ends=np.array([1, 2, 4, 4, 4]),
        piece_vectors=np.arange(5 * 4, dtype=np.float32).reshape(5, 4),
        text=text,
    )
    r.tokens = [(0, 0, 0), (1, 1, 0), (3, 3, 0), (5, 5, 0)]
    assert r.first_pieces().tolist() == [0, 1, 2, -1]
    got = r.token_vectors()
    np.testing.assert_array_equal(got[:3], r.piece_vectors[[0, 1, 2]])
    assert np.isnan(got[3]).all() and r.tokens_without_piece().tolist() == [False, False, False, True]


def test_batches_past_int32_list_offsets_are_built_in_chunks(tiny_artifact, monkeypatch):
    """Arrow lists (and Spark arrays) have int32 offsets: 3M token rows x 768 floats in one array wrapped
    to a negative offset. Batches whose vectors exceed the limit now come out in chunks under it, and the
    stages split an Arrow batch until its annotations fit."""
    import pyarrow as pa

    import clinlong.pipelines.core.schema as schema
    import clinlong.pipelines.spark.annotation as annotation
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.spark.stages._base import map_batch

    art = Artifact.open(tiny_artifact)
    emb = NoteEmbedder(art, EmbedOptions())
    texts = [f"Pt. {i} is stable. Continue ASA q.d. and follow up in clinic." for i in range(12)]
    results = emb.embed(texts)
    spec = schema.OutputSpec("token", schema.table_schema("token", pa.int64()), art.model_id, art.dimension)
    whole = schema.build_table(spec, list(range(12)), texts, results)
    limit = 40 * art.dimension  # a 40-row limit stands in for 2**31 values
    monkeypatch.setattr(schema, "MAX_LIST_VALUES", limit)
    monkeypatch.setattr(annotation, "MAX_LIST_VALUES", limit)
    with pytest.raises(OverflowError):
        schema._vectors([np.zeros((41, art.dimension), np.float32)], art.dimension)
    chunked = schema.build_table(spec, list(range(12)), texts, results)
    assert chunked.equals(whole) and chunked.column("embedding").num_chunks > 1
    assert all(len(c.values) <= limit for c in chunked.column("embedding").chunks)

    rows = [[("word_embeddings", 0, 1, "x", {})] * 15 for _ in range(8)]  # 120 annotations in 8 rows

    def fn(batch):
        ids = batch.column("id").to_pylist()
        return annotation.annotations_array(
            [rows[i] for i in ids], np.ones((15 * len(ids), art.dimension)), art.dimension
        )

    parts = list(map_batch(pa.record_batch({"id": list(range(8))}), fn, ["id"], "emb"))
    assert [p.num_rows for p in parts] == [2, 2, 2, 2]
    assert [i for p in parts for i in p.column("id").to_pylist()] == list(range(8))


def test_model_cache_follows_the_artifact_not_its_path(tiny_checkpoint, tiny_artifact, tmp_path):
    """An artifact re-exported in place (export --overwrite) is a new model for a long-lived worker: the
    process's one model cache is keyed by model_id (it used to be keyed by path, so the old weights kept
    serving rows labelled with the new model_id)."""
    import shutil

    from clinlong.export.__main__ import run as export
    from clinlong.export.synthetic import write_synthetic_checkpoint
    from clinlong.pipelines.core.batches import embedder

    path = tmp_path / "model"
    shutil.copytree(tiny_artifact, path)
    first = embedder(str(path), EmbedOptions())
    before = first.embed(["Pt. is stable."])[0].note_vector()
    other = write_synthetic_checkpoint(tmp_path / "ck2", "tiny", seed=1)
    export([str(other), str(path), "--overwrite", "--name", "tiny-clinical-longformer"])
    second = embedder(str(path), EmbedOptions())
    assert second is not first and second.artifact.model_id != first.artifact.model_id
    after = second.embed(["Pt. is stable."])[0].note_vector()
    assert not np.allclose(before, after)
    assert embedder(str(path), EmbedOptions()) is second  # and cached again
