"""Issue 24, point 2: fine-tuned heads through the export. Synthetic fine-tuned checkpoints (the layouts users
fine-tune: ForSequenceClassification / ForTokenClassification of each family, id2label, label2id and
problem_type in config.json, a random head); their export (head.safetensors, the head in the manifest and in
model_id, logits parity in parity.json); core.heads' logits against Hugging Face's own classes at fp32, packed
with mixed lengths up to the tiny model's max length, with 0, 1 and many global tokens, on both backends;
multi-label sigmoid; refusals in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from clinlong.export.synthetic import main, write_synthetic_checkpoint
from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.heads import Head, HeadModel, probabilities, read_head_weights
from clinlong.pipelines.core.runtime import Encoder

ATOL = 1e-4  # fp32 logits against Hugging Face
SEQUENCE_LABELS = ("PNEUMONIA", "SEPSIS", "CHF")
TOKEN_LABELS = ("O", "B-PROBLEM", "I-PROBLEM")
# The tiny Longformer's one-sided windows are 256 and 128 tokens; 4,096 is its max length.
LENGTHS = (1, 2, 7, 129, 257, 513, 1500, 4095, 4096)
# BigBird: both sides of its switch to block-sparse attention (704 tokens), off the 64-token blocks, the max.
BIGBIRD_LENGTHS = (1, 7, 65, 704, 705, 1000, 4096)
MAX_DIFF: dict = {}  # case -> the largest |ours - Hugging Face| of the logits, printed at the end

_CHECKPOINTS: dict = {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(family, head, multi_label) -> a tiny synthetic checkpoint, written once per module."""

    def get(family: str, head: str, multi: bool = False):
        key = (family, head, multi)
        if key not in _CHECKPOINTS:
            labels = TOKEN_LABELS if head == "token" else SEQUENCE_LABELS
            out = tmp_path_factory.mktemp("ckpt") / f"{family}-{head}{'-multi' if multi else ''}"
            _CHECKPOINTS[key] = write_synthetic_checkpoint(out, "tiny", 0, family, head, labels, multi)
        return _CHECKPOINTS[key]

    return get


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """head kind -> the exported artifact of the tiny Longformer fine-tuned checkpoint of that kind."""
    from clinlong.export.__main__ import run

    built = {}

    def get(kind: str) -> Artifact:
        if kind not in built:
            out = tmp_path_factory.mktemp("artifacts") / f"longformer-{kind}"
            run([str(checkpoint("longformer", kind)), str(out)])
            built[kind] = Artifact.open(out)
        return built[kind]

    return get


_HF: dict = {}


def _hf_model(ckpt):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging

    if ckpt not in _HF:
        logging.set_verbosity_error()
        auto = AutoModelForTokenClassification if "token" in ckpt.name else AutoModelForSequenceClassification
        _HF[ckpt] = auto.from_pretrained(str(ckpt)).eval()
    return _HF[ckpt]


def _hf_logits(ckpt, ids: np.ndarray, glob: np.ndarray | None) -> np.ndarray:
    """Hugging Face's own class (AutoModelFor...Classification.from_pretrained, fp32), one sequence alone;
    `glob`: a global_attention_mask with these tokens (None: none given, the class's own default)."""
    model = _hf_model(ckpt)
    if hasattr(getattr(model, "bert", None), "set_attention_type"):  # BigBird keeps its switch to full attention
        model.bert.set_attention_type(model.config.attention_type)
    t = torch.from_numpy(ids)[None]
    kw = {}
    if glob is not None:
        kw["global_attention_mask"] = torch.zeros_like(t)
        kw["global_attention_mask"][0, torch.from_numpy(glob)] = 1
    with torch.no_grad():
        return model(t, attention_mask=torch.ones_like(t), **kw).logits[0].numpy()


def _sequences(ckpt, lengths) -> list[np.ndarray]:
    """Framed ids (<s> ... </s>, [CLS] ... [SEP]) of each length, random body ids (fixed seed)."""
    from transformers import AutoTokenizer

    cfg = json.loads((ckpt / "config.json").read_text())
    framed = AutoTokenizer.from_pretrained(str(ckpt))("x")["input_ids"]
    bos, eos = framed[0], framed[-1]
    rng = np.random.default_rng(24)
    return [
        np.asarray([bos] if n == 1 else [bos, *rng.integers(10, cfg["vocab_size"] - 1, n - 2), eos], np.int64)
        for n in lengths
    ]


def _globals(n: int, mode: str) -> np.ndarray | None:
    """Global tokens: None (the Hugging Face class's default: <s> for sequence, none for token
    classification), none, <s>, or many (<s>, window edges, the middle, the last, every 97th)."""
    if mode == "default":
        return None
    if mode == "none":
        return np.zeros(0, np.int64)
    if mode == "cls":
        return np.zeros(1, np.int64)
    return np.asarray(
        sorted(p for p in {0, n // 2, n - 1, 127, 128, 129, 256, 257, *range(5, n, 97)} if p < n), np.int64
    )


# --- synthetic fine-tuned checkpoints ---------------------------------------------------------


@pytest.mark.parametrize(
    "family,head,multi",
    [
        ("longformer", "sequence", False),
        ("longformer", "sequence", True),
        ("longformer", "token", False),
        ("bigbird", "sequence", True),
        ("bigbird", "token", False),
    ],
)
def test_synthetic_head_checkpoint_loads_in_hugging_faces_own_class(family, head, multi, checkpoint):
    labels = TOKEN_LABELS if head == "token" else SEQUENCE_LABELS
    out = checkpoint(family, head, multi)
    cfg = json.loads((out / "config.json").read_text())
    prefix = "BigBird" if family == "bigbird" else "Longformer"
    kind = "Sequence" if head == "sequence" else "Token"
    assert cfg["architectures"] == [f"{prefix}For{kind}Classification"]
    assert cfg["id2label"] == {str(i): n for i, n in enumerate(labels)}
    assert cfg["problem_type"] == ("multi_label_classification" if multi else "single_label_classification")
    model = _hf_model(out)
    assert type(model).__name__ == cfg["architectures"][0] and model.num_labels == 3
    head_weights = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
    assert head_weights and all(v.abs().sum() > 0 for k, v in head_weights.items() if k.endswith("weight"))
    with torch.no_grad():
        logits = model(torch.tensor([[model.config.bos_token_id or 0, 10, 11, 12, 2]])).logits
    assert logits.shape[-1] == 3 and torch.isfinite(logits).all()
    assert logits.abs().max() > 0.1  # a head whose logits are of order one, as fine-tuned ones are


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--labels", "A,B"], "--labels and --multi-label need --head"),
        (["--head", "token", "--labels", "A"], "at least two distinct labels"),
        (["--head", "token", "--labels", "O,B", "--multi-label"], "--multi-label is for sequence heads"),
    ],
)
def test_synthetic_head_refusals_are_one_line(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ck"), *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in err
    assert not (tmp_path / "ck").exists()


# --- the export -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_export_writes_the_head_and_its_labels(kind, exported, checkpoint):
    art = exported(kind)
    manifest = art.manifest
    labels = SEQUENCE_LABELS if kind == "sequence" else TOKEN_LABELS
    head = art.head
    assert head == Head(
        kind=kind,
        labels=labels,
        problem_type="single_label_classification",
        activation="softmax",
        global_attention="cls" if kind == "sequence" else "none",
        architecture=f"LongformerFor{kind.capitalize()}Classification",
        dense_act="tanh" if kind == "sequence" else None,
    )
    assert manifest["head"]["labels"] == list(labels)  # id2label, in id order
    assert "head.safetensors" in manifest["files"]
    # Longformer's sequence head runs with global attention on <s>: the global graph comes with it.
    assert ("onnx_global" in manifest) == (kind == "sequence")
    assert manifest["architecture"] == "LongformerModel"  # the encoder's export is unchanged
    ours = read_head_weights(art.path / "head.safetensors")
    state = torch.load(checkpoint("longformer", kind) / "pytorch_model.bin", weights_only=True)
    assert all(np.array_equal(ours[k], state[f"classifier.{k}"].numpy()) for k in ours)
    report = json.loads((art.path / "parity.json").read_text())["head"]
    assert report["passed"] and report["max_abs_diff"] <= ATOL and report["labels"] == list(labels)
    assert f"LongformerFor{kind.capitalize()}Classification" in report["reference"]
    assert max(r["length"] for r in report["results"]) == 4096 and len(report["torch"]["results"]) == 3
    assert manifest["head"]["parity_max_abs_diff"] == report["max_abs_diff"]
    MAX_DIFF[(f"export parity.json, {kind}", "onnxruntime")] = report["max_abs_diff"]


# Longformer: (kind, backend, global tokens). The token artifact has no global graph: onnxruntime runs it
# without global tokens (the torch backend takes any).
LONGFORMER_CASES = (
    [(k, "torch", m) for k in ("sequence", "token") for m in ("default", "none", "cls", "many")]
    + [("sequence", "onnxruntime", m) for m in ("default", "none", "many")]
    + [("token", "onnxruntime", "default")]
)


@pytest.mark.parametrize("kind,backend,mode", LONGFORMER_CASES)
def test_longformer_head_logits_equal_hugging_faces_class(kind, backend, mode, exported, checkpoint):
    """Every length up to the max, packed with mixed lengths in rows of 4,096 tokens, through the artifact's
    encoder (with the head's global attention) and core.heads, against Hugging Face's own class on each
    sequence alone, with the same global tokens ("default": none given; the class puts <s> global for
    sequence classification and the head's `global_attention` does the same)."""
    art, ckpt = exported(kind), checkpoint("longformer", kind)
    seqs = _sequences(ckpt, LENGTHS)
    globs = [_globals(len(s), mode) for s in seqs]
    encoder = Encoder(
        art,
        token_budget=4096,
        batch_size=64,
        precision="fp32",
        backend=backend,
        global_attention=art.head.global_attention,
    )
    outputs = HeadModel.load(art)(encoder(seqs, None if mode == "default" else globs))
    worst = 0.0
    for ids, glob, out in zip(seqs, globs, outputs):
        ref = _hf_logits(ckpt, ids, glob)
        assert out.logits.shape == ref.shape == ((3,) if kind == "sequence" else (len(ids), 3))
        diff = float(np.abs(out.logits - ref).max())
        worst = max(worst, diff)
        assert diff <= ATOL, f"length {len(ids)}: max |diff| {diff:.2e}"
        np.testing.assert_allclose(out.probabilities, torch.from_numpy(ref).softmax(-1).numpy(), atol=ATOL)
    MAX_DIFF[(f"longformer {kind}, globals {mode}", backend)] = worst


def test_the_sequence_heads_global_attention_matters(exported, checkpoint):
    """The check has teeth: without global attention on <s>, the sequence head's logits move."""
    art, ckpt = exported("sequence"), checkpoint("longformer", "sequence")
    seq = _sequences(ckpt, (513,))
    local = Encoder(art, precision="fp32", backend="torch")  # global_attention none
    got = HeadModel.load(art)(local(seq))[0].logits
    assert np.abs(got - _hf_logits(ckpt, seq[0], None)).max() > 1e-3
    np.testing.assert_allclose(got, _hf_logits(ckpt, seq[0], np.zeros(0, np.int64)), atol=ATOL)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_bigbird_head_logits_equal_hugging_faces_class(kind, checkpoint):
    """BigBird's twins (the sequence head multi-label: sigmoid), in process: the checkpoint's head as the export
    reads it, the packed encoder on one row mixing lengths, against Hugging Face's own class."""
    from clinlong.export.checkpoint import read_checkpoint
    from clinlong.export.native import build_encoder
    from clinlong.pipelines.core.packing import packed_rows

    ckpt_dir = checkpoint("bigbird", kind, kind == "sequence")
    ckpt = read_checkpoint(str(ckpt_dir))
    spec = ckpt.head.head
    assert spec.global_attention == "none" and spec.dense_act == (None if kind == "token" else "gelu_new")
    head = HeadModel(spec, {k: v.numpy() for k, v in ckpt.head.weights.items()})
    seqs = _sequences(ckpt_dir, BIGBIRD_LENGTHS)
    pad = ckpt.encoder_config.pad_token_id
    ids, pos, spans = packed_rows(seqs, [list(range(len(seqs)))], ckpt.tokenizer.pad_token_id, pad)
    with torch.no_grad():
        hidden = build_encoder(ckpt)(torch.from_numpy(ids), torch.from_numpy(pos)).numpy()[0]
    outputs = head([hidden[first : first + n] for first, n in spans[0]])
    worst = 0.0
    for seq, out in zip(seqs, outputs):
        ref = _hf_logits(ckpt_dir, seq, None)
        diff = float(np.abs(out.logits - ref).max())
        worst = max(worst, diff)
        assert diff <= ATOL, f"length {len(seq)}: max |diff| {diff:.2e}"
        t = torch.from_numpy(ref)
        want = t.sigmoid() if kind == "sequence" else t.softmax(-1)
        np.testing.assert_allclose(out.probabilities, want.numpy(), atol=ATOL)
    MAX_DIFF[(f"bigbird {kind}", "torch")] = worst


def test_multi_label_scores_are_a_sigmoid_per_label(checkpoint):
    """problem_type multi_label_classification: each label's own sigmoid (rows need not sum to 1), recorded in
    the manifest entry and read back by Artifact.head."""
    from clinlong.export.checkpoint import read_checkpoint

    spec = read_checkpoint(str(checkpoint("longformer", "sequence", True))).head.head
    assert (spec.problem_type, spec.activation) == ("multi_label_classification", "sigmoid")
    assert Artifact("/nowhere", {"head": spec.to_manifest()}).head == spec
    from clinlong.pipelines.core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="holds no fine-tuned head"):  # an embedding model
        Artifact("/nowhere", {}).load_head()
    logits = np.asarray([[2.0, -1.0, 0.5], [-30.0, 40.0, 0.0]], np.float32)
    got = probabilities(logits, "sigmoid")
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-6)
    assert not np.allclose(got.sum(-1), 1.0)
    np.testing.assert_allclose(probabilities(logits, "softmax").sum(-1), 1.0, rtol=1e-6)


def test_head_model_shapes():
    """Sequence heads read each sequence's first row: (labels,); token heads: (n, labels) per sequence, one
    product for the batch (a sequence's logits do not depend on its batch mates)."""
    rng = np.random.default_rng(0)
    w = {"weight": rng.normal(size=(3, 8)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32)}
    token = HeadModel(Head("token", ("O", "B", "I"), "single_label_classification", "softmax"), w)
    hidden = [rng.normal(size=(n, 8)).astype(np.float32) for n in (5, 1, 9)]
    outs = token(hidden)
    assert [o.logits.shape for o in outs] == [(5, 3), (1, 3), (9, 3)]
    np.testing.assert_allclose(outs[2].logits, token([hidden[2]])[0].logits, rtol=1e-6)
    seq_w = {
        "dense.weight": rng.normal(size=(8, 8)),
        "dense.bias": rng.normal(size=8),
        "out_proj.weight": rng.normal(size=(2, 8)),
        "out_proj.bias": rng.normal(size=2),
    }
    seq = HeadModel(Head("sequence", ("A", "B"), "single_label_classification", "softmax", dense_act="tanh"), seq_w)
    outs = seq(hidden)
    assert [o.logits.shape for o in outs] == [(2,)] * 3
    np.testing.assert_allclose(outs[0].logits, seq.logits(hidden[0][:1])[0], rtol=1e-6)
    with pytest.raises(ValueError, match="names 3 labels"):
        HeadModel(
            Head("token", ("O", "B", "I"), "single_label_classification", "softmax"),
            {"weight": w["weight"][:2], "bias": w["bias"][:2]},
        )


def test_model_id_counts_the_heads_weights_and_labels(exported):
    """Heads of other weights or labels are other models; the parity figures never count."""
    from clinlong.export.native import vector_identity

    art = exported("token")
    manifest = json.loads(json.dumps(art.manifest))
    assert art.model_id.endswith("@" + vector_identity(manifest)[:12])
    other_weights = {**manifest, "files": {**manifest["files"], "head.safetensors": "0" * 64}}
    relabelled = {**manifest, "head": {**manifest["head"], "labels": ["O", "B-PROBLEM", "I-TEST"]}}
    reordered = {**manifest, "head": {**manifest["head"], "labels": ["O", "I-PROBLEM", "B-PROBLEM"]}}
    sigmoid = {**manifest, "head": {**manifest["head"], "activation": "sigmoid"}}
    headless = {k: v for k, v in manifest.items() if k != "head"}
    ids = {vector_identity(m) for m in (manifest, other_weights, relabelled, reordered, sigmoid, headless)}
    assert len(ids) == 6
    figures = {**manifest, "head": {**manifest["head"], "parity_max_abs_diff": 0.5}}
    assert vector_identity(figures) == vector_identity(manifest)
    # the two exported heads (other weights, labels and kind on other encoders) are other models too
    assert exported("sequence").model_id != art.model_id


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "kind,changes,needle",
    [
        ("sequence", {"problem_type": "regression"}, "is a regression head"),
        (
            "sequence",
            {"id2label": {"0": "SCORE"}, "label2id": {"SCORE": 0}, "problem_type": None},
            "is a regression head",
        ),
        ("sequence", {"id2label": None, "label2id": None}, "has no id2label"),
        ("sequence", {"id2label": {"0": "A", "1": "B"}}, "has shape (3, 64), expected (2, 64)"),
        ("sequence", {"id2label": {"0": "A", "1": "A", "2": "C"}}, "names ['A'] more than once"),
        ("token", {"problem_type": "multi_label_classification"}, "a token-classification head is single-label"),
    ],
)
def test_bad_heads_are_refused_in_one_line(kind, changes, needle, checkpoint, tmp_path, capsys):
    from clinlong.export.__main__ import main as export_main

    ckpt = _edit_config(checkpoint("longformer", kind), tmp_path / "ck", **changes)
    assert export_main([str(ckpt), str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err[-1]
    assert not (tmp_path / "art").exists()


def test_a_head_without_problem_type_is_single_label(checkpoint, tmp_path):
    """Token-classification configs often carry no problem_type: softmax, as Hugging Face's pipelines read it."""
    from clinlong.export.checkpoint import read_checkpoint

    ckpt = _edit_config(checkpoint("longformer", "token"), tmp_path / "ck", problem_type=None)
    spec = read_checkpoint(str(ckpt)).head
    assert not spec.problem_type_given
    assert (spec.head.problem_type, spec.head.activation) == ("single_label_classification", "softmax")


def test_other_fine_tuned_heads_are_named_and_left_behind(checkpoint, tmp_path):
    """A question-answering checkpoint's head is not exported (the export warns and embeds with its encoder)."""
    from clinlong.export.checkpoint import read_checkpoint

    ckpt = _edit_config(
        checkpoint("longformer", "token"), tmp_path / "ck", architectures=["LongformerForQuestionAnswering"]
    )
    read = read_checkpoint(str(ckpt))
    assert read.head is None and read.other_head == "LongformerForQuestionAnswering"


def test_zz_report_max_diff(capsys):
    """Prints the largest |diff| of the logits per case (for the README's parity figures)."""
    with capsys.disabled():
        for (case, backend), diff in sorted(MAX_DIFF.items()):
            print(f"\nhead logits parity: {case} ({backend}) max|diff|={diff:.2e}")
