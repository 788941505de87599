"""Random-weight checkpoints in the exact file layout and key names of yikuan8/Clinical-Longformer.

The hub is unreachable here, so tests, the demo and benchmarks use these. `base` has the real
checkpoint's config (so timings are real); `tiny` keeps its structure (per-layer windows, 4,096
positions) at a size that runs in seconds. The tokenizer is a byte-level BPE trained on the
bundled synthetic notes, saved as vocab.json + merges.txt like the real checkpoint's.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from clinlong.export.synthetic_notes import generate_notes

# config.json of yikuan8/Clinical-Longformer (LongformerForMaskedLM).
CLINICAL_LONGFORMER_CONFIG = {
    "architectures": ["LongformerForMaskedLM"],
    "attention_mode": "longformer",
    "attention_probs_dropout_prob": 0.1,
    "attention_window": [512] * 12,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "ignore_attention_mask": False,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 4098,
    "model_type": "longformer",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "position_embedding_type": "absolute",
    "sep_token_id": 2,
    "torch_dtype": "float32",
    "transformers_version": "4.9.1",
    "type_vocab_size": 1,
    "use_cache": True,
    "vocab_size": 50265,
}

TINY_OVERRIDES = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "attention_window": [512, 256],  # per-layer windows, as the config format allows
}

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in RoBERTa; <mask> is the last id
TOKENIZER_VOCAB = 8000
TOKENIZER_TRAINING_NOTES = 400


def _train_tokenizer(out: Path, seed: int) -> int:
    """Train the byte-level BPE on synthetic notes; write vocab.json/merges.txt; return its size."""
    from tokenizers import ByteLevelBPETokenizer

    texts = [n.text for n in generate_notes(TOKENIZER_TRAINING_NOTES, seed=seed)]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=TOKENIZER_VOCAB - 1, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe.save_model(str(out))
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    vocab["<mask>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
        "pad_token": "<pad>", "cls_token": "<s>",
        "mask_token": {"content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False, "normalized": False},
    }, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LongformerTokenizer", "model_max_length": 4096, "add_prefix_space": False,
        "errors": "replace", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
        "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>",
    }, indent=2))
    return len(vocab)


def config_for(size: str, vocab_size: int) -> dict:
    if size == "base":
        return dict(CLINICAL_LONGFORMER_CONFIG)
    if size == "tiny":
        return {**CLINICAL_LONGFORMER_CONFIG, **TINY_OVERRIDES, "vocab_size": vocab_size}
    raise ValueError(f"unknown size {size!r}; use tiny or base")


def write_synthetic_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight LongformerForMaskedLM checkpoint to `out` (created, must not exist)."""
    from transformers import LongformerConfig, LongformerForMaskedLM

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        vocab_size = _train_tokenizer(tmp, seed)
        cfg = config_for(size, vocab_size)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        torch.manual_seed(seed)
        model = LongformerForMaskedLM(LongformerConfig(**cfg)).eval()
        torch.save(model.state_dict(), tmp / "pytorch_model.bin")
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinlong.export.synthetic",
                                description="Write a random-weight Clinical-Longformer-layout checkpoint.")
    p.add_argument("out", help="directory to create")
    p.add_argument("--size", choices=("tiny", "base"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_synthetic_checkpoint(args.out, args.size, args.seed)
    print(f"wrote synthetic {args.size} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
