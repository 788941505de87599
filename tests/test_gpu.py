"""The heavy step on a CUDA GPU (marker `gpu`; skipped in one line where torch sees no CUDA device, as in CI).

Run by benchmarks/gpu_check.sh on a lent GPU machine. What a CPU cannot show: the packed encoder at fp32
against Hugging Face on CUDA for the FlexAttention and blocks kernels, with 0, 1 and many global tokens; the
varlen kernel (flash attention, bf16/fp16 only) and its log-sum-exp merge for global attention; BigBird's
flex form; sequences packed into one row never see each other; a real CUDA out-of-memory error splits a row
and loses nothing; the engine end to end on the GPU. Measured numbers are appended, one JSON line per check,
to the file named by CLINLONG_GPU_REPORT when it is set.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.runtime import Encoder
from tests.conftest import BIGBIRD_SWEEP, family_sequences, hf_reference
from tests.test_global_attention import MODES, SWEEP, _globals, _hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the GPU checks need one)"),
]

DEVICE = "cuda:0"
ATOL_FP32 = 1e-4  # fp32 against Hugging Face fp32 (the issues' bound)
MIN_COS_HALF = 0.999  # bf16/fp16 against Hugging Face fp32, per token (tiny random model; measured values reported)


def report(check: str, **numbers) -> None:
    """Append one measured line to $CLINLONG_GPU_REPORT (benchmarks/gpu_check.sh collects it)."""
    line = json.dumps({"check": check, **numbers})
    print(line)
    if os.environ.get("CLINLONG_GPU_REPORT"):
        with open(os.environ["CLINLONG_GPU_REPORT"], "a") as f:
            f.write(line + "\n")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)).min())


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    """fp32 means fp32: no TF32 in matrix products while these checks run."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import LongformerModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return LongformerModel.from_pretrained(str(tiny_checkpoint), add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def sequences(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    rng = np.random.default_rng(24)
    return [
        np.asarray([0] if n == 1 else [0, *rng.integers(4, cfg["vocab_size"] - 1, n - 2), 2], np.int64) for n in SWEEP
    ]


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return Artifact.open(tiny_artifact)


def test_varlen_at_fp32_is_refused_in_one_line(artifact):
    with pytest.raises(ValueError, match="bf16 or fp16 only"):
        Encoder(artifact, precision="fp32", backend="torch", device=DEVICE, kernel="varlen")
    assert Encoder(artifact, precision="fp32", backend="torch", device=DEVICE).model.kernel == "flex"


@pytest.mark.parametrize("global_attention", ["none", "cls"])
def test_engine_end_to_end_on_the_gpu(global_attention, artifact):
    """Notes through the engine on the GPU (token budget sized from free memory, auto kernel and
    precision) against the same notes through the CPU engine at fp32."""
    from clinlong.export.synthetic_notes import generate_notes
    from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder

    texts = [n.text for n in generate_notes(24, seed=3)]
    opts = dict(global_attention=global_attention)
    gpu = NoteEmbedder(artifact, EmbedOptions(**opts), device=DEVICE)
    cpu = NoteEmbedder(artifact, EmbedOptions(precision="fp32", backend="torch", **opts), device="cpu")
    assert gpu.precision == "bf16" and gpu.encoder.model.kernel == "varlen" and gpu.token_budget > 4096
    worst = 1.0
    for g, c in zip(gpu.embed(texts), cpu.embed(texts)):
        assert g.skip_reason == c.skip_reason and g.n_windows == c.n_windows
        if c.piece_vectors is not None and len(c.piece_vectors):
            worst = min(worst, _cos(g.piece_vectors, c.piece_vectors))
    assert worst >= MIN_COS_HALF
    report("engine_gpu_vs_cpu_fp32", global_attention=global_attention, min_cosine=worst, token_budget=gpu.token_budget)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_varlen_half_precision_against_hugging_face_fp32(precision, mode, artifact, sequences, hf_model):
    """varlen (flash attention over the packed sequences, with its log-sum-exp merged with the global keys
    where there are global tokens) at bf16/fp16: per-token cosine to Hugging Face fp32."""
    globs = [_globals(len(s), mode) for s in sequences]
    encoder = Encoder(
        artifact, token_budget=4096, batch_size=64, precision=precision, backend="torch", device=DEVICE, kernel="varlen"
    )
    got = encoder(sequences, globs)
    worst = min(_cos(v, _hf(hf_model, s, g)) for s, g, v in zip(sequences, globs, got))
    report("varlen_min_cosine_to_hf_fp32", precision=precision, global_tokens=mode, min_cosine=worst)
    assert worst >= MIN_COS_HALF


@pytest.mark.parametrize("kernel,precision", [("varlen", "bf16"), ("flex", "bf16"), ("flex", "fp32")])
def test_packed_sequences_never_see_each_other(kernel, precision, artifact, sequences):
    """A sequence packed beside another gives the same vectors whatever the other holds (same row shape,
    so the same kernels run); the neighbour's own vectors do change (the check has teeth)."""
    encoder = Encoder(
        artifact, token_budget=8192, batch_size=64, precision=precision, backend="torch", device=DEVICE, kernel=kernel
    )
    a, b = sequences[SWEEP.index(2000)], sequences[SWEEP.index(1023)]
    b2 = b.copy()
    b2[1:-1] = np.random.default_rng(5).permutation(b[1:-1])
    for glob in (None, [np.zeros(1, np.int64)] * 2):
        first = encoder([a, b], glob)
        second = encoder([a, b2], glob)
        isolation = float(np.abs(first[0] - second[0]).max())
        assert isolation <= 1e-5, f"{kernel}: a neighbour changed a sequence's vectors by {isolation:.2e}"
        assert np.abs(first[1] - second[1]).max() > 1e-2
    report("segment_isolation", kernel=kernel, precision=precision, max_abs_change=isolation)


def test_a_real_out_of_memory_error_splits_the_row_and_loses_nothing(artifact, sequences):
    """The GPU's memory capped just above what the weights hold: a row of 64 sequences of 4,096 tokens
    runs out of CUDA memory for real, is split in halves until the parts fit, and every sequence's vectors
    equal those of the unconstrained run. One sequence that cannot fit fails with a one-line MemoryError."""
    seqs = [np.tile(sequences[-1], 1)] * 64
    encoder = Encoder(
        artifact,
        token_budget=64 * 4096,
        batch_size=64,
        precision="bf16",
        backend="torch",
        device=DEVICE,
        kernel="varlen",
    )
    reference = encoder(seqs[:2])[0]
    calls = []

    model = encoder.model
    encoder.model = lambda *args: calls.append(args[0].shape) or model(*args)  # noqa: E731 - counts calls, shapes
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    try:
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + 96 * 2**20) / total))
        got = encoder(seqs)
        calls_needed = len(calls)
        torch.cuda.empty_cache()  # cached blocks would serve the next call under any cap
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + 2**20) / total))
        with pytest.raises(MemoryError, match="one sequence of 4096 tokens does not fit"):
            encoder(seqs[:1])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert calls_needed > 1 and all(g is not None for g in got)
    for g in got:
        np.testing.assert_allclose(g, reference, atol=2e-2)
    report(
        "oom_split",
        model_calls=calls_needed,
        first_call_tokens=int(np.prod(calls[0])),
        smallest_call_tokens=int(min(np.prod(c) for c in calls[:calls_needed])),
    )


@pytest.mark.parametrize("kernel", ["blocks", "flex"])
@pytest.mark.parametrize("mode", MODES)
def test_fp32_packed_parity_on_cuda(kernel, mode, artifact, sequences, hf_model):
    """Every length 1..4,096 packed with mixed lengths, on the GPU at fp32, equals Hugging Face fp32 per
    sequence alone (≤ 1e-4), with 0, 1 and many global tokens."""
    encoder = Encoder(
        artifact, token_budget=4096, batch_size=64, precision="fp32", backend="torch", device=DEVICE, kernel=kernel
    )
    globs = [_globals(len(s), mode) for s in sequences]
    worst = 0.0
    for ids, glob, vecs in zip(sequences, globs, encoder(sequences, globs)):
        ref = _hf(hf_model, ids, glob)
        diff = float(np.abs(vecs - ref).max())
        worst = max(worst, diff)
        assert diff <= ATOL_FP32, f"length {len(ids)}, {len(glob)} global tokens: max |diff| {diff:.2e}"
    report("fp32_parity", kernel=kernel, global_tokens=mode, max_abs_diff=worst)


def test_bigbird_flex_fp32_on_cuda_equals_hugging_face(family_model):
    checkpoint, art = family_model("bigbird")
    seqs = family_sequences(checkpoint, BIGBIRD_SWEEP)
    encoder = Encoder(Artifact.open(art), precision="fp32", backend="torch", device=DEVICE, kernel="flex")
    worst = 0.0
    for n, ids, vecs in zip(BIGBIRD_SWEEP, seqs, encoder([np.asarray(s, np.int64) for s in seqs])):
        diff = float(np.abs(vecs - hf_reference(checkpoint, ids)).max())
        worst = max(worst, diff)
        assert diff <= ATOL_FP32, f"length {n}: {diff:.2e}"
    report("bigbird_flex_fp32_parity", max_abs_diff=worst)
