"""Packing (#11): sequences share rows end to end, and each vector equals that of its sequence run alone."""

from __future__ import annotations

import os

import numpy as np
import pytest

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.packing import pack, packed_rows, positions
from clinlong.pipelines.core.runtime import Encoder

# Every kind of length: 1 (<s> alone), around each block size of the tiny model's windows (256, 512:
# one-sided 128 and 256), and up to the model's 4,096.
LENGTHS = (1, 2, 3, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 2047, 4095, 4096)


def _sequences(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[0], rng.integers(4, 1000, n - 1)])[:n] for n in lengths]


def test_pack_fills_rows_first_fit_decreasing_within_the_budget():
    lengths = [4096, 3000, 900, 300, 257, 256, 200, 10, 9, 1, 5000]
    rows = pack(lengths, capacity=4096, max_sequences=4)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # each sequence exactly once
    for r in rows:
        assert len(r) <= 4 and (sum(lengths[i] for i in r) <= 4096 or len(r) == 1)
    assert [10] in rows  # longer than a row: a row of its own
    # 5000 | 4096 | 3000 900 10 9 | 300 257 256 200 (four sequences: full) | 1
    assert [[lengths[i] for i in r] for r in rows] == [[5000], [4096], [3000, 900, 10, 9], [300, 257, 256, 200], [1]]
    assert pack([], 100) == []


def test_positions_restart_at_each_sequence_after_the_padding_index():
    assert positions([3, 1, 2], padding_idx=1).tolist() == [2, 3, 4, 2, 2, 3]
    ids, pos, spans = packed_rows([np.array([7, 8, 9]), np.array([5])], [[1, 0], [0]], pad_id=1, padding_idx=1)
    assert ids.tolist() == [[5, 7, 8, 9], [7, 8, 9, 1]]
    assert pos.tolist() == [[2, 2, 3, 4], [2, 3, 4, 1]]
    assert spans == [[(0, 1), (1, 3)], [(0, 3)]]


def test_segments_are_read_back_from_positions():
    import torch

    from clinlong.pipelines.core.model import segments_of

    pos = torch.tensor([[2, 3, 4, 2, 2, 3, 1, 1], [2, 3, 4, 5, 6, 7, 8, 1]])
    seg = segments_of(pos, padding_idx=1, with_starts=True)
    assert seg.segment.tolist() == [[1, 1, 1, 2, 3, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]]
    assert seg.starts.tolist() == [0, 3, 4, 6, 8, 15, 16] and seg.max_length == 7


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return Artifact.open(tiny_artifact)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_packed_equals_alone_at_every_length(artifact, backend):
    """All lengths 1..4,096 in shared rows (long and short together) against each sequence in a row of its
    own, fp32: the parity contract is unchanged by packing."""
    seqs = _sequences(LENGTHS)
    packed = Encoder(artifact, token_budget=6000, batch_size=64, precision="fp32", backend=backend)
    rows = pack([len(s) for s in seqs], 6000, 64)
    assert any(len(r) > 3 for r in rows) and any(4096 in [len(seqs[i]) for i in r] and len(r) > 1 for r in rows)
    alone = Encoder(artifact, token_budget=1, precision="fp32", backend=backend)  # each sequence in its own row
    for n, a, b in zip(LENGTHS, packed(seqs), alone(seqs)):
        assert a.shape == (n, artifact.dimension) and np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"length {n}")


def test_a_notes_vectors_do_not_depend_on_its_row_mates(artifact):
    """Segment isolation: the same sequence packed with different neighbours gives the same vectors."""
    target = _sequences([700], seed=1)[0]
    enc = Encoder(artifact, token_budget=4096, batch_size=64, precision="fp32", backend="onnxruntime")
    outs = [
        enc([target, *_sequences(mates, seed=seed)])[0]
        for seed, mates in enumerate([(1,), (5, 300, 2000), (100,) * 30], start=2)
    ]
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], atol=1e-5)


def test_flex_attention_equals_the_blocked_form(tiny_checkpoint):
    """The GPU kernel FlexAttention (eager on CPU) computes what the ONNX graph's blocked form computes,
    on a packed row with padding, per-layer windows included (the tiny model has 256 and 512)."""
    import torch

    from clinlong.export.checkpoint import read_checkpoint
    from clinlong.pipelines.core.model import PackedEncoder

    ckpt = read_checkpoint(str(tiny_checkpoint))
    assert len(set(ckpt.encoder_config.attention_window)) > 1
    blocks, flex = PackedEncoder(ckpt.encoder_config), PackedEncoder(ckpt.encoder_config, kernel="flex")
    blocks.load_hf_state_dict(ckpt.state_dict)
    flex.load_hf_state_dict(ckpt.state_dict)
    seqs = _sequences((1, 300, 7, 700, 129), seed=3)
    ids, pos, spans = packed_rows(seqs, [[0, 1, 2], [3, 4]], pad_id=1, padding_idx=1)
    with torch.inference_mode():
        a = blocks.eval()(torch.from_numpy(ids), torch.from_numpy(pos))
        b = flex.eval()(torch.from_numpy(ids), torch.from_numpy(pos))
    assert torch.isfinite(b).all()
    for r, row_spans in enumerate(spans):
        for s, n in row_spans:
            torch.testing.assert_close(b[r, s : s + n], a[r, s : s + n], atol=1e-5, rtol=1e-5)


def test_varlen_kernel_is_refused_on_cpus():
    from clinlong.pipelines.core.runtime import resolve_kernel

    assert resolve_kernel("auto", "cpu") == "blocks" and resolve_kernel("auto", "cuda:0") == "varlen"
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        resolve_kernel("varlen", "cpu")
    # flash attention has no fp32: auto takes FlexAttention there, an explicit varlen is refused in one line
    assert resolve_kernel("auto", "cuda:0", precision="fp32") == "flex"
    with pytest.raises(ValueError, match="bf16 or fp16 only"):
        resolve_kernel("varlen", "cuda:0", precision="fp32")


@pytest.mark.parametrize(
    "vendor, flags, auto",
    [
        ("AuthenticAMD", "avx512f avx512_bf16", "bf16"),  # Zen 4: bf16 products at ~4x fp32's rate
        ("GenuineIntel", "avx512f avx512_bf16 amx_bf16 amx_tile", "bf16"),  # Sapphire Rapids with AMX
        ("GenuineIntel", "avx512f avx512_bf16", "fp32"),  # AVX512-BF16 without AMX: no faster than fp32
        ("GenuineIntel", "avx512f avx2", "fp32"),
        ("AuthenticAMD", "avx2", "fp32"),
    ],
)
def test_auto_precision_is_bf16_where_the_cpu_computes_it_faster(monkeypatch, vendor, flags, auto):
    from clinlong.pipelines.core import devices, runtime

    monkeypatch.setattr(devices, "cpu_info", lambda: devices.CpuInfo(vendor, "a CPU", frozenset(flags.split())))
    assert runtime.resolve_precision("auto", "cpu") == auto
    assert runtime.resolve_precision("auto", "cpu", backend="onnxruntime") == "fp32"
    assert runtime.resolve_precision("fp16", "cpu") == "fp16"


def test_cpu_info_reads_this_machines_cpuinfo():
    from clinlong.pipelines.core.devices import cpu_info

    info = cpu_info()
    if os.path.exists("/proc/cpuinfo"):
        text = open("/proc/cpuinfo").read()
        assert info.vendor and info.vendor in text and info.model in text
        assert info.flags and all(f in text for f in info.flags)


def test_note_granularity_in_note_context_runs_no_text_rules(artifact, monkeypatch):
    """Sentence and word rules run only where asked for (they cost as much as BPE); a result's repr never
    shows its text."""
    from clinlong.pipelines.core import engine

    def refuse(*_):
        raise AssertionError("text rules ran")

    monkeypatch.setattr(engine, "detect_sentences", refuse)
    monkeypatch.setattr(engine, "tokenize", refuse)
    res = engine.NoteEmbedder(artifact, engine.EmbedOptions(precision="fp32")).embed(["Pt stable. BP 120/80."])[0]
    assert res.note_vector().shape == (artifact.dimension,) and "Pt stable" not in repr(res)
    with pytest.raises(AssertionError, match="text rules ran"):
        res.sentences


def test_overlapped_keeps_order_and_counts_waits():
    import time

    from clinlong.pipelines.core.engine import Stalls, overlapped

    stalls = Stalls()

    def slow(x):
        time.sleep(0.05)
        return x * 2

    assert list(overlapped(slow, lambda y: y + 1, range(5), stalls)) == [1, 3, 5, 7, 9]
    assert 0 < stalls.waited <= stalls.total and 0 < stalls.fraction <= 1


def test_core_share_gives_idle_cores_to_the_tasks_still_running(tmp_path):
    import os
    import subprocess
    import sys

    from clinlong.pipelines.core.runtime import CoreShare

    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / str(sibling.pid)).touch()  # a sibling task, running
        (tmp_path / "999999999").touch()  # a worker that died without unregistering
        with CoreShare(tmp_path, cores=8, own=1) as share:
            assert (tmp_path / str(os.getpid())).exists()
            assert share.threads() == 4 and not (tmp_path / "999999999").exists()
            sibling.kill()
            sibling.wait()
            assert share.threads() == 8  # alone now: every core of the executor
        assert not (tmp_path / str(os.getpid())).exists()
        assert CoreShare(tmp_path, cores=2, own=4).threads() == 4  # never fewer than the task's own cores
    finally:
        sibling.kill()


def test_small_arrow_batches_are_joined_to_fill_a_row():
    import pyarrow as pa

    from clinlong.pipelines.core.batches import coalesce

    batches = [pa.record_batch({"note_id": [i], "text": ["x" * 100]}) for i in range(10)]
    batches.insert(3, pa.record_batch({"note_id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}))
    out = list(coalesce(iter(batches), chars=350))
    assert [b.num_rows for b in out] == [4, 4, 2]
    assert [i for b in out for i in b.column("note_id").to_pylist()] == list(range(10))
