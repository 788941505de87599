"""Longformer's global attention (issue 24, point 1): the packed encoder against Hugging Face's
`LongformerModel(global_attention_mask=...)` at fp32, every length from 1 to 4,096 packed with mixed
lengths, with 0, 1 and many global tokens per sequence, on both CPU kernels; the log-sum-exp merge that
keeps the windowed kernel; `--global-attention cls` through the engine, the one-liner and the job's
command line; refusals in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder
from clinlong.pipelines.core.model import EncoderConfig, PackedEncoder, _merge, global_positions_of
from clinlong.pipelines.core.runtime import Encoder

ATOL = 1e-4  # fp32 against Hugging Face (the bound)
# Lengths on both sides of the tiny model's one-sided windows (256 and 128 tokens) and blocks, and its max.
SWEEP = (1, 2, 3, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 2000, 4095, 4096)
MODES = ("none", "cls", "many")
MAX_DIFF: dict = {}  # (kernel, mode) -> the largest |ours - Hugging Face| seen, printed at the end


def _globals(n: int, mode: str) -> np.ndarray:
    """Global token offsets of a sequence of n tokens: none; <s>; or many (<s>, window edges, the middle,
    the last token, every 97th token), some inside each other's windows, some far apart."""
    if mode == "none":
        return np.zeros(0, np.int64)
    if mode == "cls":
        return np.zeros(1, np.int64)
    picks = {0, n // 2, n - 1, 127, 128, 129, 256, 257, 1000, *range(5, n, 97)}
    return np.asarray(sorted(p for p in picks if 0 <= p < n), np.int64)


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import LongformerModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return LongformerModel.from_pretrained(str(tiny_checkpoint), add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def sequences(tiny_checkpoint):
    """Framed ids <s> ... </s> of every length in SWEEP (random body ids, fixed seed)."""
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    rng = np.random.default_rng(24)
    return [
        np.asarray([0] if n == 1 else [0, *rng.integers(4, cfg["vocab_size"] - 1, n - 2), 2], np.int64) for n in SWEEP
    ]


_REFERENCES: dict = {}


def _hf(hf_model, ids: np.ndarray, glob: np.ndarray) -> np.ndarray:
    """Hugging Face's last_hidden_state for one sequence alone with this global mask (cached)."""
    key = (ids.tobytes(), glob.tobytes())
    if key not in _REFERENCES:
        mask = torch.zeros(1, len(ids), dtype=torch.int64)
        mask[0, torch.from_numpy(glob)] = 1
        t = torch.from_numpy(ids)[None]
        with torch.no_grad():
            _REFERENCES[key] = (
                hf_model(t, attention_mask=torch.ones_like(t), global_attention_mask=mask).last_hidden_state[0].numpy()
            )
    return _REFERENCES[key]


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return Artifact.open(tiny_artifact)


@pytest.mark.parametrize("kernel", ["blocks", "flex"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_global_attention_equals_hugging_face(kernel, mode, artifact, sequences, hf_model):
    """Every length, packed with mixed lengths (rows of 4,096 tokens share short sequences), through the
    torch runtime (its Encoder), against each sequence run alone by Hugging Face."""
    encoder = Encoder(artifact, token_budget=4096, batch_size=64, precision="fp32", backend="torch", kernel=kernel)
    globs = [_globals(len(s), mode) for s in sequences]
    got = encoder(sequences, globs)
    worst = 0.0
    for ids, glob, vecs in zip(sequences, globs, got):
        ref = _hf(hf_model, ids, glob)
        assert vecs.shape == ref.shape
        diff = float(np.abs(vecs - ref).max())
        worst = max(worst, diff)
        assert diff <= ATOL, f"length {len(ids)}, {len(glob)} global tokens: max |diff| {diff:.2e}"
    MAX_DIFF[(kernel, mode)] = worst


def test_global_tokens_change_the_output(artifact, sequences, hf_model):
    """The check has teeth: the `*_global` weights are random and distinct, so global attention on <s>
    moves every token's vector away from local-only attention."""
    encoder = Encoder(artifact, precision="fp32", backend="torch")
    seq = sequences[SWEEP.index(513)]
    local, cls = encoder([seq])[0], encoder([seq], [np.zeros(1, np.int64)])[0]
    assert np.abs(local - cls).max() > 1e-2
    np.testing.assert_allclose(cls, _hf(hf_model, seq, np.zeros(1, np.int64)), atol=ATOL)


def test_cls_option_is_global_attention_on_each_sequences_first_token(artifact, sequences):
    cls = Encoder(artifact, precision="fp32", backend="torch", global_attention="cls")
    explicit = Encoder(artifact, precision="fp32", backend="torch")
    seqs = sequences[:10]
    for a, b in zip(cls(seqs), explicit(seqs, [np.zeros(1, np.int64)] * len(seqs))):
        np.testing.assert_array_equal(a, b)


def test_log_sum_exp_merge_is_attention_over_the_union():
    """Attention over disjoint key sets merged by log-sum-exp equals attention over their union."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=g) for _ in range(3))
    split = 4

    def attend(keys, values):
        scores = q @ keys.transpose(-1, -2)
        return torch.softmax(scores, -1) @ values, torch.logsumexp(scores, -1)

    a, lse_a = attend(k[..., :split, :], v[..., :split, :])
    b, lse_b = attend(k[..., split:, :], v[..., split:, :])
    whole, _ = attend(k, v)
    torch.testing.assert_close(_merge(a, lse_a, b, lse_b), whole, atol=1e-6, rtol=1e-6)


def test_global_positions_of_a_mask():
    mask = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert global_positions_of(mask).tolist() == [[0, 3], [-1, -1], [1, -1]]
    assert global_positions_of(torch.zeros(2, 3)).tolist() == [[-1], [-1]]


def test_global_attention_cls_through_the_engine_equals_hugging_face_per_window(artifact, hf_model):
    """A long note in windows: every window runs with global attention on its own <s>."""
    from clinlong.export.synthetic_notes import generate_notes
    from clinlong.pipelines.core.windows import assign_pieces, window_plan

    text = "\n\n".join(n.text for n in generate_notes(6, seed=4))
    max_len, overlap = 1024, 256
    opts = EmbedOptions(
        max_length=max_len, window_overlap=overlap, precision="fp32", backend="torch", global_attention="cls"
    )
    res = NoteEmbedder(artifact, opts).embed([text])[0]
    ids = artifact.tokenizer.encode(text, add_special_tokens=False).ids
    starts, width = window_plan(len(ids), max_len, overlap)
    assert res.n_windows == len(starts) > 1
    which, pos = assign_pieces(len(ids), starts, width)
    for w, s in enumerate(starts):
        ref = _hf(hf_model, np.asarray([0, *ids[s : s + width], 2], np.int64), np.zeros(1, np.int64))[1:-1]
        sel = which == w
        np.testing.assert_allclose(res.piece_vectors[sel], ref[pos[sel]], atol=ATOL)


def test_one_liner_takes_the_option_and_it_changes_the_vectors(tiny_artifact):
    from clinlong.export.synthetic_notes import generate_notes
    from clinlong.pipelines import load

    text = ["\n\n".join(n.text for n in generate_notes(3, seed=4))]  # past <s>'s window: its tokens gain it
    local = load(str(tiny_artifact), precision="fp32", backend="torch").predict(text)
    cls = load(str(tiny_artifact), precision="fp32", backend="torch", global_attention="cls").predict(text)
    col = next(c for c in local.columns if "embed" in c or "vector" in c)
    a, b = np.stack(local[col].to_list()), np.stack(cls[col].to_list())
    # (random tiny weights: a token far from <s> gains one key among ~257 near-uniform ones, ~3.6e-4 here)
    assert a.shape == b.shape and np.abs(a - b).max() > 2e-4


def test_job_command_line_has_the_option():
    from clinlong.pipelines.jobs.embed_notes import build_parser, config_from_args

    base = ["--notes", "n.csv", "--model", "m", "--out", "o"]
    assert config_from_args(build_parser().parse_args(base)).options.global_attention == "none"
    cfg = config_from_args(build_parser().parse_args([*base, "--global-attention", "cls"]))
    assert cfg.options.global_attention == "cls"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--global-attention", "all"])


def test_job_runs_global_attention_through_delta(tiny_artifact, artifact, spark, tmp_path):
    """The job with --global-attention cls writes the vectors the engine computes with it (which equal
    Hugging Face's per window, above), not the local-only ones."""
    import pandas as pd
    from deltalake import DeltaTable

    from clinlong.pipelines.jobs.embed_notes import JobConfig, run
    from tests.conftest import write_test_notes

    notes = write_test_notes(tmp_path / "NOTEEVENTS.csv")
    opts = EmbedOptions(precision="fp32", backend="torch", global_attention="cls")
    run(
        JobConfig(
            notes=str(notes),
            model=str(tiny_artifact),
            out=str(tmp_path / "t"),
            id_type="long",
            granularity="note",
            options=opts,
        ),
        spark,
    )
    table = DeltaTable(str(tmp_path / "t")).to_pyarrow_table().to_pandas()
    texts = pd.read_csv(notes, keep_default_na=False).set_index("ROW_ID").TEXT
    local = NoteEmbedder(artifact, EmbedOptions(precision="fp32", backend="torch"))
    cls = NoteEmbedder(artifact, opts)
    checked = 0
    for note_id, vec in zip(table.note_id, table.embedding):
        text = texts.loc[note_id]
        if not isinstance(text, str):  # a duplicated id: its rows are covered by the other checks
            continue
        want = cls.embed([text])[0].note_vector()
        np.testing.assert_allclose(vec, want, atol=1e-5)
        checked += 1
        assert np.abs(local.embed([text])[0].note_vector() - want).max() > 0
    assert checked >= 5


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"backend": "onnxruntime"}, "re-export with python -m clinlong.export --global-attention"),
        ({"global_attention": "sep"}, "option global_attention must be one of"),
    ],
)
def test_refusals_are_one_line(artifact, options, needle):
    with pytest.raises(ValueError) as err:
        EmbedOptions(**{"global_attention": "cls", **options}).validate(artifact)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bigbird_and_old_artifacts_are_refused():
    cfg = EncoderConfig(
        vocab_size=10,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=40,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        attention_window=(4,),
    )
    old = PackedEncoder(cfg, with_global=False).eval()
    ids = torch.tensor([[0, 5, 6, 2]])
    pos = torch.tensor([[2, 3, 4, 5]])
    with pytest.raises(ValueError, match="re-export the checkpoint"):
        old(ids, pos, torch.tensor([[0]]))
    bird = PackedEncoder(EncoderConfig(**{**cfg.__dict__, "model_type": "big_bird", "attention_window": ()}))
    with pytest.raises(ValueError, match="global attention is Longformer's"):
        bird(ids, pos, torch.tensor([[0]]))


@pytest.fixture(scope="module")
def global_artifact(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported with --global-attention (the second ONNX graph)."""
    from clinlong.export.__main__ import run

    out = tmp_path_factory.mktemp("artifacts") / "tiny-global"
    run([str(tiny_checkpoint), str(out), "--global-attention"])
    return Artifact.open(out)


def test_export_writes_the_global_graph_and_checks_its_parity(global_artifact):
    manifest = global_artifact.manifest
    assert manifest["onnx_global"]["inputs"] == ["input_ids", "position_ids", "global_positions"]
    assert (global_artifact.path / manifest["onnx_global"]["file"]).is_file()
    report = json.loads((global_artifact.path / "parity.json").read_text())["global"]
    assert report["passed"] and report["max_abs_diff"] <= ATOL
    assert {r["global_tokens"] > 1 for r in report["results"]} == {True, False}
    assert len({r["row"] for r in report["results"]}) > 1  # a batch of several rows: the batch axis is dynamic
    MAX_DIFF[("onnx export report", "0/1/many")] = report["max_abs_diff"]


@pytest.mark.parametrize("mode", MODES)
def test_onnx_global_graph_equals_hugging_face(mode, global_artifact, sequences, hf_model):
    """The global graph on ONNX Runtime, every length packed with mixed lengths (dynamic row length and
    number of global tokens), against Hugging Face."""
    encoder = Encoder(
        global_artifact,
        token_budget=4096,
        batch_size=64,
        precision="fp32",
        backend="onnxruntime",
        global_attention="cls",
    )
    globs = [_globals(len(s), mode) for s in sequences]
    worst = 0.0
    for ids, glob, vecs in zip(sequences, globs, encoder(sequences, globs)):
        diff = float(np.abs(vecs - _hf(hf_model, ids, glob)).max())
        worst = max(worst, diff)
        assert diff <= ATOL, f"length {len(ids)}, {len(glob)} global tokens: max |diff| {diff:.2e}"
    MAX_DIFF[("onnxruntime", mode)] = worst


def test_global_export_keeps_the_model_id_and_the_local_graph(global_artifact, artifact):
    """The second graph changes no vector of the first: the same model_id."""
    assert global_artifact.model_id == artifact.model_id


def test_global_export_of_bigbird_is_refused():
    from clinlong.export.errors import ExportError
    from clinlong.export.native import write_native

    class Fake:
        encoder_config = EncoderConfig(
            vocab_size=10,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            max_position_embeddings=40,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=0,
            attention_window=(),
            model_type="big_bird",
        )

    with pytest.raises(ExportError, match="--global-attention is Longformer's"):
        write_native(Fake(), None, "x", None, with_global=True)


def test_zz_report_max_diff(capsys):
    """Prints the largest |diff| per kernel and mode (for the README's parity figures)."""
    with capsys.disabled():
        for (kernel, mode), diff in sorted(MAX_DIFF.items()):
            print(f"\nglobal attention parity: kernel={kernel} globals={mode} max|diff|={diff:.2e}")
