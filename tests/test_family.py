"""The model family through export → artifact → pipeline: DrLongformer (its own file layout), DrBERT-4096
(SentencePiece tokenizer, CamemBERT ids) and Clinical-BigBird (block-sparse attention), against Hugging
Face's own models and tokenizers, from the export's report to the job's Delta table."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from deltalake import DeltaTable
from transformers import AutoTokenizer

from clinlong.export.synthetic_notes import generate_french_notes
from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder
from clinlong.pipelines.core.runtime import Encoder
from tests.conftest import BIGBIRD_SWEEP, PHI_MARKER, family_sequences, hf_reference, write_test_notes
from tests.test_pipeline_parity import ATOL, rows_match_hugging_face

FAMILIES = ("drlongformer", "drbert-4096", "bigbird")
# Lengths run packed together (mixed in rows) against Hugging Face each alone (BigBird's: conftest.BIGBIRD_SWEEP).
SWEEP = (1, 2, 3, 255, 256, 257, 511, 513, 1023, 2000, 4095, 4096)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_report_and_manifest(family, family_model):
    checkpoint, art = family_model(family)
    report = json.loads((art / "parity.json").read_text())
    manifest = json.loads((art / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["min_cosine"] >= 0.99999
    assert all(r["passed"] for r in report["torch"]["results"]) and report["torch"]["results"]
    bigbird = family == "bigbird"
    assert ("BigBirdModel" if bigbird else "LongformerModel") in report["reference"]
    assert manifest["architecture"] == ("BigBirdModel" if bigbird else "LongformerModel")
    assert manifest["max_length"] == 4096 and manifest["dimension"] == 64
    assert manifest["sequence_frame"] == {"start": tok("x")["input_ids"][0], "end": tok("x")["input_ids"][-1]}
    assert manifest["word_marker"] == (None if family == "drlongformer" else "\u2581")
    assert manifest["case_sensitive"] is True
    lengths = {r["length"] for r in report["results"]}
    if bigbird:
        assert {63, 65, 704, 705, 769, 4096} <= lengths  # both sides of the switch, off the block size
        assert manifest["block_sparse"] == {
            "block_size": 64,
            "num_random_blocks": 3,
            "enabled": True,
            "full_attention_up_to": 704,
        }
        assert manifest["sequence_frame"]["start"] != tok.bos_token_id  # [CLS], not <s>
    if family == "drbert-4096":
        assert manifest["special_tokens"]["bos"]["id"] == 5 and manifest["special_tokens"]["pad"]["id"] == 1
    if family == "drlongformer":
        assert not (checkpoint / "vocab.json").exists() and (checkpoint / "model.safetensors").exists()


@pytest.mark.parametrize(
    "family,backend,kernel",
    [
        ("drbert-4096", "onnxruntime", "auto"),
        ("drbert-4096", "torch", "flex"),
        ("drlongformer", "onnxruntime", "auto"),
        ("bigbird", "onnxruntime", "auto"),
        ("bigbird", "torch", "flex"),
        ("bigbird", "torch", "blocks"),
    ],
)
def test_parity_at_every_length_packed_with_mixed_lengths(family, backend, kernel, family_model):
    checkpoint, art = family_model(family)
    lengths = BIGBIRD_SWEEP if family == "bigbird" else SWEEP
    seqs = family_sequences(checkpoint, lengths)
    encoder = Encoder(Artifact.open(art), precision="fp32", backend=backend, kernel=kernel)
    got = encoder([np.asarray(s, np.int64) for s in seqs])  # packed: short sequences share rows
    for n, ids, vecs in zip(lengths, seqs, got):
        ref = hf_reference(checkpoint, ids)
        assert vecs.shape == ref.shape == (n, 64)
        np.testing.assert_allclose(vecs, ref, atol=ATOL, err_msg=f"length {n}")
        cos = (vecs * ref).sum(-1) / np.linalg.norm(vecs, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() >= 0.99999, n


def test_bigbird_block0_bias_is_what_hugging_face_computes(family_model):
    """Without the log(1 + r) bias on block 0 (random blocks are all block 0 in eval mode) a sparse-length
    sequence misses Hugging Face by far more than the tolerance; a full-attention length is unaffected."""
    import torch

    from clinlong.pipelines.core.model import PackedEncoder
    from clinlong.pipelines.core.packing import packed_rows

    checkpoint, art = family_model("bigbird")
    artifact = Artifact.open(art)
    cfg = artifact.encoder_config
    model = PackedEncoder(dataclasses.replace(cfg, attention_window=()))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(artifact.torch_weights_path)))
    for layer in model.encoder.layer:
        layer.attention.self.block0_bias = 0.0
    for n, near in ((700, True), (1500, False)):
        ids = family_sequences(checkpoint, (n,))[0]
        t_ids, t_pos, _ = packed_rows([np.asarray(ids)], [[0]], 0, cfg.pad_token_id)
        with torch.inference_mode():
            out = model.eval()(torch.from_numpy(t_ids), torch.from_numpy(t_pos))[0].numpy()
        diff = np.abs(out - hf_reference(checkpoint, ids)).max()
        assert (diff < 1e-5) if near else (diff > 1e-3), (n, diff)


def test_french_offsets_word_pieces_and_vectors(family_model):
    checkpoint, art = family_model("drbert-4096")
    # U+200B (zero-width space): SentencePiece's normalizer makes it a space, so no piece covers the tokens
    # made of it (first_pieces -1, no vector); the "." after it takes the "▁" piece the space becomes.
    text = "Le patient est arrivé à l'hôpital aujourd'hui.  Il n'a pas de fièvre \u200b.\nÉvolution : favorable."
    res = NoteEmbedder(Artifact.open(art), EmbedOptions(precision="fp32")).embed([text])[0]
    words = [text[b : e + 1] for b, e, _ in res.tokens]
    kept = ["l'hôpital", "aujourd'hui", "n'a", "fièvre", "Évolution"]
    assert kept == [w for w in words if w in kept]
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    enc = tok(text)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])[1:-1]
    assert len(pieces) == res.n_tokens
    for piece, s, e in zip(pieces, res.piece_starts, res.piece_ends):  # offsets point at the piece's own text
        content = piece.replace("\u2581", "")
        if content:
            assert text[s:e] == content, (piece, text[s:e])
    # A word's first piece is the first piece of the tokenizer's own word (its "▁" piece).
    word_ids = enc.word_ids()[1:-1]
    first_of_word = {w: i for i, w in reversed(list(enumerate(word_ids)))}
    first = res.first_pieces()
    assert [words[i] for i in np.flatnonzero(first < 0)] == ["\u200b"]  # -1: no piece covers it
    for (b, _, _), k in zip(res.tokens, first):
        if k >= 0 and (b == 0 or text[b - 1].isspace()):
            assert k == first_of_word[word_ids[k]], text[b : b + 3]
            assert pieces[k].startswith("\u2581")
    ref = hf_reference(checkpoint, enc["input_ids"])[1:-1]
    got, has = res.token_vectors(), first >= 0
    np.testing.assert_allclose(got[has], ref[first[has]], atol=ATOL)
    assert np.isnan(got[~has]).all()  # no vector, never another piece's


def test_case_handling_follows_the_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from clinlong.export.native import tokenizer_traits

    def fast(normalizer):
        t = Tokenizer(models.WordLevel({"[UNK]": 0, "abc": 1}, unk_token="[UNK]"))
        t.normalizer = normalizer
        t.pre_tokenizer = pre_tokenizers.Metaspace()
        return PreTrainedTokenizerFast(tokenizer_object=t)

    assert tokenizer_traits(fast(normalizers.Lowercase())) == {"case_sensitive": False, "word_marker": "\u2581"}
    assert tokenizer_traits(fast(normalizers.NFKC()))["case_sensitive"] is True


@pytest.fixture(scope="module")
def family_notes(tmp_path_factory):
    """The job's test notes (bad rows, duplicate id, planted name; two of the three longest left out to keep
    Hugging Face's per-sentence references short) plus French notes: 13 rows, 11 to embed, 2 to 3,558 pieces."""
    folder = tmp_path_factory.mktemp("family-notes")
    with write_test_notes(folder / "all.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    path = folder / "NOTEEVENTS.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        w.writerow(rows[0])
        w.writerows([int(r[0]), *r[1:]] for k, r in enumerate(rows[1:]) if k not in (3, 6))
        for k, text in enumerate(generate_french_notes(4, seed=9)):
            w.writerow([201 + k, 1, 1, "2101-1-1", "", "", "Nursing/other", "Note", "", "", text])
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,granularity,context",
    [
        ("drbert-4096", "note", "note"),
        ("drbert-4096", "sentence", "note"),
        ("drbert-4096", "token", "sentence"),
        ("bigbird", "note", "note"),
        ("bigbird", "sentence", "sentence"),
        ("bigbird", "token", "note"),
        ("drlongformer", "note", "note"),
        ("drlongformer", "sentence", "note"),
        ("drlongformer", "token", "note"),
        # Clinical-Longformer's other granularity x context pairs (spark-submit runs three in test_pipeline_parity).
        ("longformer", "note", "sentence"),
        ("longformer", "sentence", "note"),
        ("longformer", "token", "sentence"),
    ],
)
def test_job_parity_through_delta(
    family, granularity, context, family_notes, family_model, spark, tmp_path, capsys, request
):
    from clinlong.pipelines.jobs.embed_notes import JobConfig, run

    if family == "longformer":
        checkpoint, art = request.getfixturevalue("tiny_checkpoint"), request.getfixturevalue("tiny_artifact")
    else:
        checkpoint, art = family_model(family)
    out = str(tmp_path / "table")
    options = EmbedOptions(context=context, precision="fp32")
    summary = run(
        JobConfig(
            notes=str(family_notes), model=str(art), out=out, id_type="long", granularity=granularity, options=options
        ),
        spark,
    )
    assert summary["rows_in"] == 13 and summary["embedded"] == 11
    assert PHI_MARKER not in capsys.readouterr().err
    table = DeltaTable(out).to_pyarrow_table().to_pandas()
    assert set(table.model_id) == {Artifact.open(art).model_id}
    assert rows_match_hugging_face(table, family_notes, checkpoint, granularity, context) == 11


def test_bigbird_stage_registry_and_one_liner(family_model, spark, tmp_path, monkeypatch):
    from pyspark.ml import Pipeline

    from clinlong.pipelines import BigBirdEmbeddings, DocumentAssembler, LongformerEmbeddings, Tokenizer, load

    _, art = family_model("bigbird")
    with pytest.raises(ValueError, match="holds a big_bird model; LongformerEmbeddings .* use BigBirdEmbeddings"):
        LongformerEmbeddings().setModelPath(str(art))
    text = " ".join(generate_french_notes(3, seed=4))  # past 704 pieces: block-sparse
    df = spark.createDataFrame([(1, text), (2, "Sinus rhythm.")], "id long, text string")
    stage = (
        BigBirdEmbeddings()
        .setModelPath(str(art))
        .setInputCols(["document", "token"])
        .setOutputCol("emb")
        .setPrecision("fp32")
    )
    pipe = Pipeline(
        stages=[
            DocumentAssembler().setInputCol("text").setOutputCol("document"),
            Tokenizer().setInputCols(["document"]).setOutputCol("token"),
            stage,
        ]
    )
    rows = {r["id"]: r for r in pipe.fit(df).transform(df).collect()}
    engine = NoteEmbedder(Artifact.open(art), EmbedOptions(precision="fp32"))
    for i, t in ((1, text), (2, "Sinus rhythm.")):
        res = engine.embed([t])[0]
        assert res.n_tokens > (705 if i == 1 else 0)
        np.testing.assert_allclose(np.array([a["embeddings"] for a in rows[i]["emb"]]), res.token_vectors(), atol=1e-5)
    stage.write().overwrite().save(str(tmp_path / "stage"))
    assert type(BigBirdEmbeddings.load(str(tmp_path / "stage"))).__name__ == "BigBirdEmbeddings"
    # nlu-style names: the registered artifact under $CLINLONG_MODELS.
    monkeypatch.setenv("CLINLONG_MODELS", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "clinical_bigbird_en").symlink_to(art)
    got = load("en.embed.bigbird.clinical", precision="fp32").predict("Sinus rhythm.", output_level="document")
    np.testing.assert_allclose(got.embedding.iloc[0], engine.embed(["Sinus rhythm."])[0].note_vector(), atol=1e-5)
    assert BigBirdEmbeddings.pretrained().getOrDefault("modelPath") == str(art.resolve())


def test_refusals_name_the_fix(family_model, tmp_path, capsys):
    import shutil

    from clinlong.export.__main__ import main

    for family, needle in (
        ("bigbird", "Spark NLP has no annotator that imports a big_bird model"),
        ("drbert-4096", "this checkpoint's is Unigram: use --format native"),
    ):
        checkpoint, _ = family_model(family)
        assert main([str(checkpoint), str(tmp_path / family), "--format", "sparknlp"]) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / family).exists()
    # A SentencePiece model file alone (no tokenizer.json): converted by transformers, or a one-line error.
    checkpoint, _ = family_model("drbert-4096")
    spm_only = tmp_path / "spm-only"
    shutil.copytree(checkpoint, spm_only)
    (spm_only / "tokenizer.json").unlink()
    (spm_only / "sentencepiece.bpe.model").write_bytes(b"not a sentencepiece model")
    assert main([str(spm_only), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the tokenizer files in") and "sentencepiece" in err


def test_synthetic_command_writes_each_layout(tmp_path):
    from transformers import AutoConfig

    from clinlong.export.synthetic import main

    assert main([str(tmp_path / "bb"), "--family", "bigbird"]) == 0
    cfg = AutoConfig.from_pretrained(str(tmp_path / "bb"))
    assert cfg.model_type == "big_bird" and cfg.architectures == ["BigBirdForMaskedLM"] and cfg.block_size == 64
    assert sorted(p.name for p in (tmp_path / "bb").iterdir()) == [
        "config.json",
        "pytorch_model.bin",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
