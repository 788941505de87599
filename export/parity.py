"""Parity of the exported ONNX encoder against Hugging Face `LongformerModel` / `BigBirdModel` (fp32).

The reference runs each sequence alone, unpadded, through the real transformers implementation;
the candidate runs the ONNX file on packed rows (core.packing) that mix lengths, in one call whose
shorter rows are padded, so both sequence boundaries and padding are exercised. Every real token is
compared: max absolute difference and cosine similarity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clinlong.export.checkpoint import Checkpoint
from clinlong.export.synthetic_notes import generate_notes
from clinlong.pipelines.core.model import encoder_state
from clinlong.pipelines.core.packing import packed_rows

PARITY_LENGTHS = (1, 2, 7, 255, 256, 257, 511, 512, 513, 1500, 4096)
# Rows pack short and long sequences end to end; the shorter rows are padded to the longest.
PARITY_ROWS = ((1, 2, 7, 255, 256, 257), (511, 512, 513, 1500), (4096, 7))
# BigBird: both sides of its full-attention switch (704 = 11 blocks of 64) and lengths off the block size.
BIGBIRD_LENGTHS = (1, 2, 7, 63, 64, 65, 704, 705, 769, 1000, 1500, 4096)
BIGBIRD_ROWS = ((1, 2, 7, 63, 64, 65, 704, 705), (769, 1000, 1500), (4096, 7))


def parity_plan(model_type: str) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """The lengths checked and how they are packed into rows, for a model family."""
    return (BIGBIRD_LENGTHS, BIGBIRD_ROWS) if model_type == "big_bird" else (PARITY_LENGTHS, PARITY_ROWS)


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float = 1e-3
    min_cosine: float = 0.99999


def reference_model(ckpt: Checkpoint):
    """Hugging Face `LongformerModel` or `BigBirdModel` (fp32, eval) holding the checkpoint's encoder weights."""
    from transformers import BigBirdConfig, BigBirdModel, LongformerConfig, LongformerModel

    if ckpt.encoder_config.model_type == "big_bird":
        model = BigBirdModel(BigBirdConfig(**ckpt.config), add_pooling_layer=False)
    else:
        model = LongformerModel(LongformerConfig(**ckpt.config), add_pooling_layer=False)
    missing, _ = model.load_state_dict(encoder_state(ckpt.state_dict), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} {type(model).__name__} weights, e.g. {missing[:3]}")
    return model.eval()


def reference_run(model, ids: np.ndarray) -> np.ndarray:
    """last_hidden_state of one unpadded sequence. BigBirdModel switches itself to full attention for good
    after an input of at most 704 tokens (transformers 4.x); the configured type is restored before each
    sequence, so each runs as on a freshly loaded model."""
    if hasattr(model, "set_attention_type"):
        model.set_attention_type(model.config.attention_type)
    t = torch.from_numpy(ids)[None]
    with torch.inference_mode():
        return model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state[0].numpy()


def parity_sequences(ckpt: Checkpoint, lengths: tuple[int, ...], max_length: int) -> dict[int, np.ndarray]:
    """Token ids of the synthetic notes, cut to each length, framed as the tokenizer does (<s> ... </s>)."""
    body: list[int] = []
    for note in generate_notes(60, seed=123):
        body.extend(ckpt.tokenizer(note.text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(body) >= max_length:
            break
    bos, eos = ckpt.frame
    seqs = {}
    for n in lengths:
        if n > max_length:
            continue
        ids = [bos] if n == 1 else [bos, *body[: n - 2], eos]
        seqs[n] = np.asarray(ids, dtype=np.int64)
    return seqs


def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(ref - got).max())
    num = (ref * got).sum(-1)
    den = np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1)
    return diff, float((num / np.maximum(den, 1e-12)).min())


TORCH_CHECK_LENGTHS = (1, 513, 705, 1500)  # those among the family's parity lengths


def check_parity(
    onnx_path: str | Path,
    ckpt: Checkpoint,
    tol: Tolerance = Tolerance(),
    log: Callable[[str], None] = lambda _: None,
    torch_encoder=None,
) -> dict:
    """Run the reference and the ONNX encoder on the parity lengths and return the report.

    With `torch_encoder` (the module the ONNX was traced from, as the torch runtime runs it), a
    mixed-length batch of TORCH_CHECK_LENGTHS is also checked and reported under "torch"."""
    import onnxruntime as ort
    import transformers

    start = time.perf_counter()
    max_len = ckpt.encoder_config.max_length
    parity_lengths, parity_rows = parity_plan(ckpt.encoder_config.model_type)
    seqs = parity_sequences(ckpt, parity_lengths, max_len)
    model = reference_model(ckpt)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # BigBird warns at every switch to full attention and padding
    try:
        reference = {n: reference_run(model, ids) for n, ids in seqs.items()}
    finally:
        transformers.logging.set_verbosity(verbosity)
    name = type(model).__name__
    log(f"reference: transformers {name} on {len(seqs)} lengths ({time.perf_counter() - start:.1f} s)")

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pad, padding_idx = ckpt.tokenizer.pad_token_id, ckpt.encoder_config.pad_token_id
    lengths = sorted(seqs)
    rows = [[lengths.index(n) for n in row if n in seqs] for row in parity_rows]
    rows = [r for r in rows if r]
    ids, pos, spans = packed_rows([seqs[n] for n in lengths], rows, pad, padding_idx)
    out = session.run(["last_hidden_state"], {"input_ids": ids, "position_ids": pos})[0]
    results = []
    for r, row in enumerate(rows):
        for i, (first, n) in zip(row, spans[r]):
            got = out[r, first : first + n]
            diff, cos = _compare(reference[lengths[i]], got)
            ok = diff <= tol.max_abs_diff and cos >= tol.min_cosine and np.isfinite(got).all()
            results.append(
                {
                    "length": n,
                    "row": r,
                    "row_length": ids.shape[1],
                    "max_abs_diff": diff,
                    "min_cosine": cos,
                    "passed": bool(ok),
                }
            )
    torch_rows = []
    if torch_encoder is not None:
        batch = [n for n in TORCH_CHECK_LENGTHS if n in seqs]
        t_ids, t_pos, t_spans = packed_rows([seqs[n] for n in batch], [list(range(len(batch)))], pad, padding_idx)
        with torch.inference_mode():
            t_out = torch_encoder(torch.from_numpy(t_ids), torch.from_numpy(t_pos)).numpy()[0]
        for n, (first, _) in zip(batch, t_spans[0]):
            diff, cos = _compare(reference[n], t_out[first : first + n])
            torch_rows.append(
                {
                    "length": n,
                    "max_abs_diff": diff,
                    "min_cosine": cos,
                    "passed": bool(diff <= tol.max_abs_diff and cos >= tol.min_cosine),
                }
            )
    seen = {r["length"] for r in results}
    if seen != set(seqs):  # every parity length must have been checked
        raise AssertionError(f"parity lengths not checked: {sorted(set(seqs) - seen)}")
    return {
        "passed": all(r["passed"] for r in results + torch_rows),
        "tolerance": asdict(tol),
        "reference": f"transformers {transformers.__version__} {name}, fp32, each sequence alone",
        "candidate": f"ONNX on onnxruntime {ort.__version__} CPUExecutionProvider, packed rows mixing lengths",
        "lengths_skipped_over_max_length": [n for n in parity_lengths if n > max_len],
        "rows": [[lengths[i] for i in row] for row in rows],
        "results": sorted(results, key=lambda r: r["length"]),
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "min_cosine": min(r["min_cosine"] for r in results),
        "torch": {
            "candidate": "core.model.PackedEncoder in torch fp32 (the torch runtime's module), one packed row",
            "results": torch_rows,
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


# Global attention (encoder_global.onnx): each length with no, one (<s>) and many global tokens, packed
# in rows that mix them; the reference is LongformerModel with the same global_attention_mask, alone.
GLOBAL_ROWS = ((1, 2, 7, 255, 256, 257), (511, 512, 513, 1500), (4096, 7))


def global_tokens(n: int, k: int) -> np.ndarray:
    """The global token offsets of the k-th sequence of length n in a parity row: none, <s>, or many."""
    if k % 3 == 0:
        return np.zeros(0, np.int64)
    if k % 3 == 1:
        return np.zeros(1, np.int64)
    return np.asarray(sorted({0, n // 2, n - 1, *range(3, n, 211)}), np.int64)


def check_global_parity(onnx_path: str | Path, ckpt: Checkpoint, tol: Tolerance = Tolerance()) -> dict:
    """The global-attention graph (inputs input_ids, position_ids, global_positions) against Hugging Face's
    LongformerModel(global_attention_mask=...), fp32, on rows that pack lengths with 0, 1 and many global tokens."""
    import onnxruntime as ort

    start = time.perf_counter()
    max_len = ckpt.encoder_config.max_length
    rows = [[n for n in row if n <= max_len] for row in GLOBAL_ROWS]
    rows = [r for r in rows if r]
    seqs = parity_sequences(ckpt, sorted({n for r in rows for n in r}), max_len)
    model = reference_model(ckpt)
    pad, padding_idx = ckpt.tokenizer.pad_token_id, ckpt.encoder_config.pad_token_id
    flat = [(n, k) for r in rows for k, n in enumerate(r)]
    globs = [global_tokens(n, k) for n, k in flat]
    index = {key: i for i, key in enumerate(flat)}
    plan = [[index[(n, k)] for k, n in enumerate(r)] for r in rows]
    ids, pos, spans = packed_rows([seqs[n] for n, _ in flat], plan, pad, padding_idx)
    width = max(1, max(sum(len(globs[i]) for i in row) for row in plan))
    gpos = np.full((len(plan), width), -1, np.int64)
    for r, row in enumerate(plan):
        found = [first + globs[i] for i, (first, _) in zip(row, spans[r])]
        found = np.concatenate(found) if found else np.zeros(0, np.int64)
        gpos[r, : len(found)] = found
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(["last_hidden_state"], {"input_ids": ids, "position_ids": pos, "global_positions": gpos})[0]
    results = []
    for r, row in enumerate(plan):
        for i, (first, n) in zip(row, spans[r]):
            mask = torch.zeros(1, n, dtype=torch.int64)
            mask[0, torch.from_numpy(globs[i])] = 1
            t = torch.from_numpy(seqs[n])[None]
            with torch.inference_mode():
                ref = model(t, attention_mask=torch.ones_like(t), global_attention_mask=mask).last_hidden_state[0]
            ref = ref.numpy()
            diff, cos = _compare(ref, out[r, first : first + n])
            results.append(
                {
                    "length": n,
                    "global_tokens": len(globs[i]),
                    "row": r,
                    "max_abs_diff": diff,
                    "min_cosine": cos,
                    "passed": bool(diff <= tol.max_abs_diff and cos >= tol.min_cosine),
                }
            )
    return {
        "passed": all(r["passed"] for r in results),
        "file": Path(onnx_path).name,
        "reference": "transformers LongformerModel(global_attention_mask=...), fp32, each sequence alone",
        "results": results,
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "min_cosine": min(r["min_cosine"] for r in results),
        "seconds": round(time.perf_counter() - start, 2),
    }


# Fine-tuned heads: logits of the artifact (encoder graph + core.heads on head.safetensors) against Hugging Face's
# own class (LongformerForSequenceClassification, ...), fp32, each sequence alone.


def reference_head_model(ckpt: Checkpoint):
    """Hugging Face's own class of the checkpoint's head (e.g. LongformerForSequenceClassification), fp32, eval,
    holding all of the checkpoint's weights."""
    import transformers

    from clinlong.export.errors import ExportError

    arch = ckpt.head.head.architecture
    config_class = (
        transformers.BigBirdConfig if ckpt.encoder_config.model_type == "big_bird" else transformers.LongformerConfig
    )
    model = getattr(transformers, arch)(config_class(**ckpt.config))
    missing, _ = model.load_state_dict(ckpt.state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ExportError(
            f"the checkpoint lacks {len(missing)} {arch} weights (e.g. {missing[:3]}); "
            "pass the checkpoint that config.json describes"
        )
    return model.eval()


def reference_head_run(model, ids: np.ndarray, global_tokens: np.ndarray | None = None) -> np.ndarray:
    """Logits of one unpadded sequence from Hugging Face's class: (labels,) for a sequence head, (n, labels) for
    a token head. `global_tokens` (Longformer): offsets of the global tokens (None: the class's own default,
    which for sequence classification is <s>)."""
    encoder = getattr(model, "bert", None)
    if encoder is not None and hasattr(encoder, "set_attention_type"):  # BigBird: see reference_run
        encoder.set_attention_type(model.config.attention_type)
    t = torch.from_numpy(ids)[None]
    kw = {}
    if global_tokens is not None:
        mask = torch.zeros_like(t)
        mask[0, torch.from_numpy(np.asarray(global_tokens, np.int64))] = 1
        kw["global_attention_mask"] = mask
    with torch.inference_mode():
        return model(input_ids=t, attention_mask=torch.ones_like(t), **kw).logits[0].numpy()


def check_head_parity(
    onnx_path: str | Path, head_path: str | Path, ckpt: Checkpoint, tol: Tolerance = Tolerance(), torch_encoder=None
) -> dict:
    """The head's logits through the artifact's encoder graph (`onnx_path`: the global-attention graph where the
    head runs with global attention on <s>) on packed rows mixing the parity lengths, and core.heads on
    `head_path`, against Hugging Face's own class on each sequence alone. With `torch_encoder`, a mixed-length
    row of TORCH_CHECK_LENGTHS through the torch module too (reported under "torch")."""
    import onnxruntime as ort
    import transformers

    from clinlong.pipelines.core.heads import HeadModel, read_head_weights

    start = time.perf_counter()
    spec = ckpt.head.head
    cls_global = spec.global_attention == "cls"
    max_len = ckpt.encoder_config.max_length
    parity_lengths, parity_rows = parity_plan(ckpt.encoder_config.model_type)
    seqs = parity_sequences(ckpt, parity_lengths, max_len)
    model = reference_head_model(ckpt)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # BigBird warns at every switch to full attention
    try:
        reference = {n: reference_head_run(model, ids) for n, ids in seqs.items()}
    finally:
        transformers.logging.set_verbosity(verbosity)
    head = HeadModel(spec, read_head_weights(head_path))
    pad, padding_idx = ckpt.tokenizer.pad_token_id, ckpt.encoder_config.pad_token_id
    lengths = sorted(seqs)

    def compare(n: int, out) -> dict:
        diff = float(np.abs(out.logits - reference[n]).max())
        probs = float(np.abs(out.probabilities - np.asarray(_scores(reference[n], spec.activation))).max())
        ok = diff <= tol.max_abs_diff and bool(np.isfinite(out.logits).all())
        return {"length": n, "max_abs_diff": diff, "max_abs_diff_probabilities": probs, "passed": ok}

    rows = [[lengths.index(n) for n in row if n in seqs] for row in parity_rows]
    rows = [r for r in rows if r]
    ids, pos, spans = packed_rows([seqs[n] for n in lengths], rows, pad, padding_idx)
    feed = {"input_ids": ids, "position_ids": pos}
    if cls_global:  # each sequence's first token
        feed["global_positions"] = np.full((len(rows), max(len(r) for r in rows)), -1, np.int64)
        for r, row_spans in enumerate(spans):
            feed["global_positions"][r, : len(row_spans)] = [first for first, _ in row_spans]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(["last_hidden_state"], feed)[0]
    results = []
    for r, row in enumerate(rows):
        outputs = head([out[r, first : first + n] for first, n in spans[r]])
        results += [{**compare(lengths[i], o), "row": r} for i, o in zip(row, outputs)]
    torch_rows = []
    if torch_encoder is not None:
        batch = [n for n in TORCH_CHECK_LENGTHS if n in seqs]
        t_ids, t_pos, t_spans = packed_rows([seqs[n] for n in batch], [list(range(len(batch)))], pad, padding_idx)
        glob = torch.tensor([[first for first, _ in t_spans[0]]]) if cls_global else None
        with torch.inference_mode():
            t_out = torch_encoder(torch.from_numpy(t_ids), torch.from_numpy(t_pos), glob).numpy()[0]
        outputs = head([t_out[first : first + n] for first, n in t_spans[0]])
        torch_rows = [compare(n, o) for n, o in zip(batch, outputs)]
    return {
        "passed": all(r["passed"] for r in results + torch_rows),
        "kind": spec.kind,
        "labels": list(spec.labels),
        "activation": spec.activation,
        "tolerance": {"max_abs_diff": tol.max_abs_diff},
        "reference": f"transformers {transformers.__version__} {spec.architecture}, fp32, each sequence alone"
        + (" (global attention on <s>, as the class sets it without a mask)" if cls_global else ""),
        "candidate": f"{Path(onnx_path).name} on onnxruntime {ort.__version__}, packed rows mixing lengths"
        + (", global attention on each sequence's <s>" if cls_global else "")
        + f", then core.heads on {Path(head_path).name}",
        "results": sorted(results, key=lambda r: r["length"]),
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "max_abs_diff_probabilities": max(r["max_abs_diff_probabilities"] for r in results),
        "torch": {
            "candidate": "core.model.PackedEncoder in torch fp32, one packed row, then core.heads",
            "results": torch_rows,
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def _scores(logits: np.ndarray, activation: str) -> np.ndarray:
    """Hugging Face's logits as scores, by torch (the reference side of the probabilities' comparison)."""
    t = torch.from_numpy(np.asarray(logits))
    return (t.softmax(-1) if activation == "softmax" else t.sigmoid()).numpy()


def format_report(report: dict) -> str:
    """The parity report as a small table for terminals."""
    lines = [f"{'length':>7} {'row':>5} {'row len':>7} {'max|diff|':>10} {'min cos':>10}  ok"]
    for r in report["results"]:
        lines.append(
            f"{r['length']:>7} {r['row']:>5} {r['row_length']:>7} {r['max_abs_diff']:>10.2e} "
            f"{r['min_cosine']:>10.7f}  {'yes' if r['passed'] else 'NO'}"
        )
    t = report["tolerance"]
    lines.append(
        f"overall: max|diff| {report['max_abs_diff']:.2e} (tolerance {t['max_abs_diff']:.0e}), "
        f"min cosine {report['min_cosine']:.7f} (tolerance {t['min_cosine']}) -> "
        f"{'PASSED' if report['passed'] else 'FAILED'}"
    )
    if report.get("head"):
        h = report["head"]
        lines.append(
            f"head ({h['kind']}, {len(h['labels'])} labels, {h['activation']}): logits max|diff| "
            f"{h['max_abs_diff']:.2e} against Hugging Face's own class on {len(h['results'])} sequences "
            f"(tolerance {h['tolerance']['max_abs_diff']:.0e}) -> {'PASSED' if h['passed'] else 'FAILED'}"
        )
    return "\n".join(lines)
