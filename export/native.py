"""Write the native artifact: ONNX encoder, fast tokenizer, parity report and manifest."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from clinlong.export.checkpoint import Checkpoint
from clinlong.export.errors import ExportError
from clinlong.export.parity import Tolerance, check_parity, parity_sequences
from clinlong.export.synthetic_notes import generate_notes
from clinlong.pipelines.core.artifact import (
    MANIFEST_FILE,
    ONNX_FILE,
    PARITY_FILE,
    SUPPORTED_FORMAT,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    file_sha256,
)
from clinlong.pipelines.core.heads import HEAD_FILE
from clinlong.pipelines.core.model import PackedEncoder
from clinlong.pipelines.core.packing import positions

OPSET = 18
ONNX_INPUTS = ("input_ids", "position_ids")  # packed rows: positions restart at each sequence
# --global-attention: a second graph for Longformer's global attention on ONNX Runtime. global_positions
# (B, G): row indices of each row's global tokens, -1 in unused slots; every axis dynamic.
ONNX_GLOBAL_FILE = "encoder_global.onnx"
ONNX_GLOBAL_INPUTS = ("input_ids", "position_ids", "global_positions")

# Strings that stress byte-level BPE beyond the synthetic notes (no real patient data).
_TOKENIZER_PROBES = [
    "",
    " ",
    "  leading spaces",
    "Pt. c/o SOB; HR 110s.\n\n\tTabs\r\nCRLF",
    "[**2101-3-4**]",
    "émigré naïve café",
    "患者 发热",
    "مريض",
    "😷🩺 emoji",
    "\x00nul",
    "A" * 300,
    "mixed CASE Text",
]


def write_tokenizer(ckpt: Checkpoint, out: Path) -> None:
    """Save the checkpoint's fast tokenizer and prove it encodes exactly as the checkpoint's does."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(ckpt.tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(out / TOKENIZER_FILE))
    saved = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    texts = [n.text for n in generate_notes(50, seed=11)] + _TOKENIZER_PROBES
    for i, text in enumerate(texts):
        want = ckpt.tokenizer(text, verbose=False)["input_ids"]  # no "longer than the maximum" warning
        got = saved.encode(text).ids
        if got != want:  # never print the text itself
            raise ExportError(
                f"the exported tokenizer encodes probe #{i} differently from the checkpoint's; "
                "report this with the checkpoint's tokenizer files"
            )


def build_encoder(ckpt: Checkpoint) -> PackedEncoder:
    encoder = PackedEncoder(ckpt.encoder_config)
    encoder.load_hf_state_dict(ckpt.state_dict)
    return encoder.eval()


def write_weights(encoder: PackedEncoder, out: Path) -> None:
    """The encoder's weights (fp32, Hugging Face names) for runtimes that run the module itself."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(out / WEIGHTS_FILE))


def write_head(ckpt: Checkpoint, out: Path) -> None:
    """A fine-tuned checkpoint's head weights (fp32, Hugging Face's names without `classifier.`), read by
    core.heads without the safetensors package."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ckpt.head.weights.items()}, str(out / HEAD_FILE))


def write_onnx(
    encoder: PackedEncoder, ckpt: Checkpoint, out: Path, opset: int = OPSET, with_global: bool = False
) -> None:
    """Export the encoder with dynamic batch and row-length axes; inputs are packed rows (input_ids and
    position_ids, see core.packing), so a row may be longer than one sequence's max length. `with_global`:
    the global-attention graph (ONNX_GLOBAL_FILE), whose third input's number of global tokens is dynamic too."""
    length = min(600, ckpt.encoder_config.max_length)  # an example past one window where the model allows
    example = torch.from_numpy(parity_sequences(ckpt, (length,), length)[length])[None].repeat(2, 1)
    pos = torch.from_numpy(positions([length], ckpt.encoder_config.pad_token_id))[None].repeat(2, 1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("row_length")
    names, file, args = list(ONNX_INPUTS), ONNX_FILE, (example, pos)
    shapes = {name: {0: batch, 1: seq} for name in ONNX_INPUTS}
    if with_global:  # two global tokens in the first row, one (and an unused slot) in the second
        glob = torch.tensor([[0, length // 2], [0, -1]], dtype=torch.int64)
        names, file, args = list(ONNX_GLOBAL_INPUTS), ONNX_GLOBAL_FILE, (example, pos, glob)
        shapes["global_positions"] = {0: batch, 1: torch.export.Dim("n_global")}
    # The exporter logs one warning per torchvision op it cannot register ("torchvision is not installed"):
    # noise for an encoder that uses none of them.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            args,
            str(out / file),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    registration.setLevel(level)


def _library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import tokenizers
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _special_tokens(tok) -> dict[str, dict]:
    names = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")
    return {
        n: {"token": getattr(tok, f"{n}_token"), "id": getattr(tok, f"{n}_token_id")}
        for n in names
        if getattr(tok, f"{n}_token", None) is not None
    }


ARCHITECTURES = {"longformer": "LongformerModel", "big_bird": "BigBirdModel"}


def tokenizer_traits(tok) -> dict:
    """What the pipeline must know of a tokenizer beyond its file: whether it keeps case (its own
    normalizer may lowercase) and the word-boundary marker of SentencePiece-style tokenizers ("▁",
    whose pieces' offsets start at the space it stands for), read from the tokenizer itself."""
    backend = tok.backend_tokenizer
    lowercases = backend.normalizer is not None and backend.normalizer.normalize_str("AbC Éé") == "abc éé"
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    marker = next((p.get("replacement") for p in parts if p.get("type") == "Metaspace"), None)
    return {"case_sensitive": not lowercases, "word_marker": marker}


def write_manifest(ckpt: Checkpoint, out: Path, name: str, report: dict) -> dict:
    """The manifest; `report["global"]` (export --global-attention) adds the global-attention graph."""
    ec = ckpt.encoder_config
    start, end = ckpt.frame
    files = {f.name: file_sha256(f) for f in sorted(out.iterdir()) if f.is_file() and f.name != MANIFEST_FILE}
    manifest = {
        "format": SUPPORTED_FORMAT[0],
        "format_version": SUPPORTED_FORMAT[1],
        "name": name,
        "model_id": "",  # filled in below, from what determines the vectors
        "architecture": ARCHITECTURES[ec.model_type],
        "model_type": ec.model_type,
        "dimension": ec.hidden_size,
        "num_layers": ec.num_hidden_layers,
        "max_length": ec.max_length,
        "attention_windows": list(ec.attention_window),
        **(
            {
                "block_sparse": {
                    "block_size": ec.block_size,
                    "num_random_blocks": ec.num_random_blocks,
                    "enabled": ec.block_sparse,
                    "full_attention_up_to": ec.sparse_from,
                }
            }
            if ec.model_type == "big_bird"
            else {}
        ),
        "pad_multiple": ec.pad_multiple,
        "vocab_size": ec.vocab_size,
        "special_tokens": _special_tokens(ckpt.tokenizer),
        "sequence_frame": {"start": start, "end": end},
        **tokenizer_traits(ckpt.tokenizer),
        # Longformer: the torch weights hold the global projections (--global-attention cls runs on torch)
        "global_attention": ec.model_type == "longformer",
        "onnx": {
            "file": ONNX_FILE,
            "opset": OPSET,
            "inputs": list(ONNX_INPUTS),
            "packed": True,
            "outputs": ["last_hidden_state"],
            "dtype": "float32",
        },
        **(
            {
                "onnx_global": {
                    "file": ONNX_GLOBAL_FILE,
                    "opset": OPSET,
                    "inputs": list(ONNX_GLOBAL_INPUTS),
                    "packed": True,
                    "outputs": ["last_hidden_state"],
                    "dtype": "float32",
                    "parity_max_abs_diff": report["global"]["max_abs_diff"],
                }
            }
            if report.get("global")
            else {}
        ),
        **(
            {"head": {**ckpt.head.head.to_manifest(), "parity_max_abs_diff": report["head"]["max_abs_diff"]}}
            if ckpt.head is not None
            else {}
        ),
        "tokenizer": TOKENIZER_FILE,
        "torch": {"file": WEIGHTS_FILE, "encoder_config": asdict(ec), "dtype": "float32"},
        "parity": {
            "file": PARITY_FILE,
            "passed": report["passed"],
            "max_abs_diff": report["max_abs_diff"],
            "min_cosine": report["min_cosine"],
        },
        "source": {
            "checkpoint": str(ckpt.path),
            "name": ckpt.name,
            "sha256": ckpt.sha256,
            "weights_file": ckpt.weights_file,
        },
        "libraries": _library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    manifest["model_id"] = f"{name}@{vector_identity(manifest)[:12]}"
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


# The manifest entries that determine the vectors: the graph's format, the weights, the tokenizer and how
# the pipeline frames and reads its pieces. Never timings (parity.json), paths, dates or library versions.
VECTOR_FILES = (WEIGHTS_FILE, TOKENIZER_FILE)
VECTOR_KEYS = (
    "format",
    "format_version",
    "architecture",
    "model_type",
    "dimension",
    "num_layers",
    "max_length",
    "attention_windows",
    "block_sparse",
    "pad_multiple",
    "vocab_size",
    "special_tokens",
    "sequence_frame",
    "case_sensitive",
    "word_marker",
    "global_attention",
)
# A fine-tuned head's entries that determine its scores (with the digest of HEAD_FILE); never its parity figures.
HEAD_KEYS = ("kind", "architecture", "labels", "problem_type", "activation", "global_attention", "dense_act")


def vector_identity(manifest: dict) -> str:
    """The hex sha256 behind `model_id`: the digests of the weights and the tokenizer, the encoder config and
    the manifest entries in VECTOR_KEYS, as canonical JSON. Two exports of one checkpoint get the same id
    (the parity report's timings and the creation date do not count); any change that can move a vector
    (weights, tokenizer, config, the artifact format) gives another. A fine-tuned head (manifest "head") counts
    too: its weights' digest and HEAD_KEYS (labels in order, problem type, ...); an embedding model's identity
    is unchanged by this."""
    identity = {
        "files": {f: manifest["files"][f] for f in VECTOR_FILES},
        "encoder_config": manifest["torch"]["encoder_config"],
        **{k: manifest[k] for k in VECTOR_KEYS if k in manifest},
    }
    if manifest.get("head"):
        head = manifest["head"]
        identity["head"] = {"file": manifest["files"][head["file"]], **{k: head.get(k) for k in HEAD_KEYS}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_native(
    ckpt: Checkpoint,
    out: Path,
    name: str,
    tol: Tolerance,
    log: Callable[[str], None] = lambda _: None,
    with_global: bool = False,
) -> tuple[dict, dict]:
    """Write the native artifact into `out` (a staging directory); refuse on failed parity. `with_global`:
    also the global-attention graph, checked against LongformerModel(global_attention_mask=...). A fine-tuned
    checkpoint (`ckpt.head`) adds HEAD_FILE, its logits checked against Hugging Face's own class; a head run with
    global attention on <s> (Longformer's sequence classification) brings the global graph with it."""
    with_global = with_global or (ckpt.head is not None and ckpt.head.head.global_attention == "cls")
    if with_global and ckpt.encoder_config.model_type != "longformer":
        raise ExportError(f"--global-attention is Longformer's; a {ckpt.encoder_config.model_type} checkpoint has none")
    t = time.perf_counter()
    write_tokenizer(ckpt, out)
    log(f"tokenizer.json written and verified ({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    encoder = build_encoder(ckpt)
    write_weights(encoder, out)
    write_onnx(encoder, ckpt, out)
    log(f"{ONNX_FILE} exported ({(out / ONNX_FILE).stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t:.1f} s)")
    report = check_parity(out / ONNX_FILE, ckpt, tol, log, torch_encoder=encoder)
    (out / PARITY_FILE).write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        worst = max(report["results"], key=lambda r: r["max_abs_diff"])
        raise ExportError(
            f"parity check failed (max |diff| {report['max_abs_diff']:.2e} at length {worst['length']}, "
            f"min cosine {report['min_cosine']:.6f}); no artifact written. "
            "Report this with the checkpoint"
        )
    log(f"parity passed ({report['seconds']:.1f} s)")
    if with_global:
        from clinlong.export.parity import check_global_parity

        t = time.perf_counter()
        write_onnx(encoder, ckpt, out, with_global=True)
        log(f"{ONNX_GLOBAL_FILE} exported ({time.perf_counter() - t:.1f} s)")
        report["global"] = check_global_parity(out / ONNX_GLOBAL_FILE, ckpt, tol)
        (out / PARITY_FILE).write_text(json.dumps(report, indent=2))
        if not report["global"]["passed"]:
            raise ExportError(
                f"global-attention parity failed (max |diff| {report['global']['max_abs_diff']:.2e}); "
                "no artifact written. Report this with the checkpoint"
            )
        log(
            f"global-attention parity passed (max |diff| {report['global']['max_abs_diff']:.2e}, "
            f"{report['global']['seconds']:.1f} s)"
        )
    if ckpt.head is not None:
        from clinlong.export.parity import check_head_parity

        write_head(ckpt, out)
        graph = ONNX_GLOBAL_FILE if ckpt.head.head.global_attention == "cls" else ONNX_FILE
        report["head"] = check_head_parity(out / graph, out / HEAD_FILE, ckpt, tol, torch_encoder=encoder)
        (out / PARITY_FILE).write_text(json.dumps(report, indent=2))
        h = report["head"]
        if not h["passed"]:
            worst = max(h["results"] + h["torch"]["results"], key=lambda r: r["max_abs_diff"])
            raise ExportError(
                f"head parity failed (logits max |diff| {worst['max_abs_diff']:.2e} at length "
                f"{worst['length']} against {ckpt.head.head.architecture}); no artifact written. "
                "Report this with the checkpoint"
            )
        log(
            f"{HEAD_FILE}: {ckpt.head.head.kind} head, logits parity passed against {ckpt.head.head.architecture} "
            f"(max |diff| {h['max_abs_diff']:.2e}, {h['seconds']:.1f} s)"
        )
    return write_manifest(ckpt, out, name, report), report
