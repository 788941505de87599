"""Random-weight checkpoints in the file layouts and key names of the supported family.

The hub is unreachable here, so tests, the demo and benchmarks use these. Families (`--family`), each
with what it stands for, its model, its tokenizer and its files:

- `longformer`: yikuan8/Clinical-Longformer; LongformerForMaskedLM; byte-level BPE;
  pytorch_model.bin, vocab.json + merges.txt
- `drlongformer`: abazoge/DrLongformer; LongformerForMaskedLM; byte-level BPE;
  model.safetensors, tokenizer.json
- `drbert-4096`: abazoge/DrBERT-4096; LongformerForMaskedLM; SentencePiece unigram, CamemBERT ids (<s> = 5);
  pytorch_model.bin, tokenizer.json
- `bigbird`: yikuan8/Clinical-BigBird; BigBirdForMaskedLM; SentencePiece unigram, [CLS] ... [SEP];
  pytorch_model.bin, tokenizer.json

`--head sequence|token --labels A,B,...` writes a fine-tuned layout instead of the masked-LM one:
Longformer/BigBird `ForSequenceClassification` or `ForTokenClassification` with a random head, `id2label`
and `label2id` in config.json (`--multi-label`: problem_type multi_label_classification, sigmoid scores;
else single_label_classification, softmax), as `save_pretrained` writes a model fine-tuned by users.

Each is built from its Hugging Face config class. `base` has the real checkpoint's config (so timings
are real); `tiny` keeps its structure (per-layer windows or BigBird's 64-token blocks, 4,096 positions)
at a size that runs in seconds. Tokenizers are trained on the bundled synthetic notes (English, and
French for the French models).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from clinlong.export.staging import apply_umask
from clinlong.export.synthetic_notes import generate_french_notes, generate_notes

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

# config.json of yikuan8/Clinical-BigBird (google/bigbird-roberta-base's architecture).
CLINICAL_BIGBIRD_CONFIG = {
    "architectures": ["BigBirdForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "attention_type": "block_sparse",
    "block_size": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "gelu_new",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 4096,
    "model_type": "big_bird",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "num_random_blocks": 3,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "rescale_embeddings": False,
    "sep_token_id": 66,
    "type_vocab_size": 2,
    "use_bias": True,
    "use_cache": True,
    "vocab_size": 50358,
}

TINY_OVERRIDES = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "attention_window": [512, 256],  # per-layer windows, as the config format allows
}
BIGBIRD_TINY_OVERRIDES = {k: v for k, v in TINY_OVERRIDES.items() if k != "attention_window"}

FAMILIES = ("longformer", "drlongformer", "drbert-4096", "bigbird")
HEADS = ("sequence", "token")  # ForSequenceClassification, ForTokenClassification
# CamemBERT's (and so DrBERT's) special tokens and ids; <mask> is the last id.
CAMEMBERT_SPECIALS = ["<s>NOTUSED", "<pad>", "</s>NOTUSED", "<unk>", "<unk>NOTUSED", "<s>", "</s>"]
# BigBird's SentencePiece specials: <pad> 0, <s> 1, </s> 2 as in its config; sequences are [CLS] ... [SEP].
BIGBIRD_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in RoBERTa; <mask> is the last id
TOKENIZER_VOCAB = 8000
TOKENIZER_TRAINING_NOTES = 400


def _training_texts(seed: int, french: bool) -> list[str]:
    texts = [n.text for n in generate_notes(TOKENIZER_TRAINING_NOTES, seed=seed)]
    return texts + generate_french_notes(TOKENIZER_TRAINING_NOTES, seed=seed) if french else texts


def _train_tokenizer(out: Path, seed: int, files: str = "bpe", french: bool = False) -> int:
    """Train the byte-level BPE on synthetic notes; write vocab.json/merges.txt (files "bpe", the real
    Clinical-Longformer's) or tokenizer.json (files "json", as newer save_pretrained writes); return its size."""
    from tokenizers import ByteLevelBPETokenizer

    texts = _training_texts(seed, french)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        texts, vocab_size=TOKENIZER_VOCAB - 1, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    bpe.save_model(str(out))
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    vocab["<mask>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "sep_token": "</s>",
                "pad_token": "<pad>",
                "cls_token": "<s>",
                "mask_token": {
                    "content": "<mask>",
                    "single_word": False,
                    "lstrip": True,
                    "rstrip": False,
                    "normalized": False,
                },
            },
            indent=2,
        )
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LongformerTokenizer",
                "model_max_length": 4096,
                "add_prefix_space": False,
                "errors": "replace",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "sep_token": "</s>",
                "pad_token": "<pad>",
                "cls_token": "<s>",
                "mask_token": "<mask>",
            },
            indent=2,
        )
    )
    if files == "json":  # the same tokenizer as one tokenizer.json, the BPE files removed
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(out)).backend_tokenizer.save(str(out / "tokenizer.json"))
        (out / "vocab.json").unlink()
        (out / "merges.txt").unlink()
    return len(vocab)


def _train_sentencepiece(out: Path, seed: int, family: str) -> tuple[int, dict]:
    """Train a SentencePiece-style unigram tokenizer (Metaspace "▁" word boundaries, NFKC) on synthetic
    notes and save it as its model's fast tokenizer (tokenizer.json); return its size and special ids."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing

    bigbird = family == "bigbird"
    specials = BIGBIRD_SPECIALS if bigbird else CAMEMBERT_SPECIALS
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        _training_texts(seed, french=not bigbird),
        vocab_size=TOKENIZER_VOCAB - 1,
        special_tokens=specials,
        unk_token="<unk>",
        show_progress=False,
    )
    backend = sp._tokenizer
    if not bigbird:
        backend.add_special_tokens(["<mask>"])
    ids = {t: backend.token_to_id(t) for t in [*specials, "<mask>"] if backend.token_to_id(t) is not None}
    first, last = ("[CLS]", "[SEP]") if bigbird else ("<s>", "</s>")
    backend.post_processor = TemplateProcessing(
        single=f"{first} $A {last}",
        pair=f"{first} $A {last} {last} $B {last}",
        special_tokens=[(first, ids[first]), (last, ids[last])],
    )
    if bigbird:
        from transformers import BigBirdTokenizerFast as Fast

        names = dict(
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            sep_token="[SEP]",
            cls_token="[CLS]",
            mask_token="[MASK]",
        )
    else:
        from transformers import CamembertTokenizerFast as Fast

        names = dict(
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            sep_token="</s>",
            cls_token="<s>",
            mask_token="<mask>",
        )
    tok = Fast(tokenizer_object=backend, model_max_length=4096, **names)
    tok.save_pretrained(str(out))
    return backend.get_vocab_size(), ids


def config_for(size: str, vocab_size: int, family: str = "longformer", ids: dict | None = None) -> dict:
    """config.json of a family at a size; `ids` (special token → id) of a SentencePiece tokenizer."""
    if size not in ("tiny", "base"):
        raise ValueError(f"unknown size {size!r}; use tiny or base")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    if family == "bigbird":
        if size == "base":  # the real vocabulary size; the synthetic tokenizer uses its first ids
            return {**CLINICAL_BIGBIRD_CONFIG, "sep_token_id": ids["[SEP]"]}
        return {
            **CLINICAL_BIGBIRD_CONFIG,
            **BIGBIRD_TINY_OVERRIDES,
            "vocab_size": vocab_size,
            "sep_token_id": ids["[SEP]"],
        }
    cfg = {**CLINICAL_LONGFORMER_CONFIG, **(TINY_OVERRIDES if size == "tiny" else {})}
    if family == "drbert-4096":  # DrBERT's vocabulary and CamemBERT ids in the Longformer architecture
        return {
            **cfg,
            "vocab_size": vocab_size,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "sep_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        }
    return {**cfg, "vocab_size": vocab_size} if size == "tiny" else cfg


def _head_model(family: str, cfg: dict, head: str):
    """A fine-tuned layout of the family: its ForSequenceClassification or ForTokenClassification."""
    import transformers

    prefix, config_class = (
        ("BigBird", transformers.BigBirdConfig)
        if family == "bigbird"
        else ("Longformer", transformers.LongformerConfig)
    )
    cls = getattr(transformers, f"{prefix}For{'Sequence' if head == 'sequence' else 'Token'}Classification")
    model = cls(config_class(**cfg))
    # Hugging Face initialises a head with std 0.02 and zero biases: logits near 0.03 that any error would hide
    # in. A fine-tuned head's are of order one: weights of std 1/sqrt(fan in) (out_proj 2x), biases of std 0.5.
    with torch.no_grad():
        for name, param in model.classifier.named_parameters():
            if name.endswith("weight"):
                param.normal_(0.0, (2.0 if "out_proj" in name else 1.0) / param.shape[1] ** 0.5)
            else:
                param.normal_(0.0, 0.5)
    return model


def write_synthetic_checkpoint(
    out: str | Path,
    size: str = "tiny",
    seed: int = 0,
    family: str = "longformer",
    head: str | None = None,
    labels: list[str] | tuple[str, ...] = (),
    multi_label: bool = False,
) -> Path:
    """Write a random-weight checkpoint of `family` to `out` (created, must not exist); with `head`, a
    fine-tuned classification layout whose config names `labels` (see the module docstring)."""
    from transformers import BigBirdConfig, BigBirdForMaskedLM, LongformerConfig, LongformerForMaskedLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    if head is not None:
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; use one of {HEADS}")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a {head} head needs at least two distinct labels, got {list(labels)}")
        if multi_label and head != "sequence":
            raise ValueError("--multi-label is for sequence heads (token heads are single-label)")
    elif labels or multi_label:
        raise ValueError("--labels and --multi-label need --head sequence or token")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        ids = None
        if family in ("drbert-4096", "bigbird"):
            vocab_size, ids = _train_sentencepiece(tmp, seed, family)
        else:
            vocab_size = _train_tokenizer(
                tmp, seed, "json" if family == "drlongformer" else "bpe", french=family == "drlongformer"
            )
        cfg = config_for(size, vocab_size, family, ids)
        torch.manual_seed(seed)
        if head is not None:
            cfg = {
                **cfg,
                "id2label": dict(enumerate(labels)),
                "label2id": {n: i for i, n in enumerate(labels)},
                "problem_type": "multi_label_classification" if multi_label else "single_label_classification",
            }
            model = _head_model(family, cfg, head).eval()
            model.config.architectures = [type(model).__name__]
            model.save_pretrained(str(tmp), safe_serialization=family == "drlongformer")
            apply_umask(tmp)
            if out.exists():
                out.rmdir()
            tmp.rename(out)
            return out
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if family == "bigbird":
            model = BigBirdForMaskedLM(BigBirdConfig(**cfg)).eval()
        else:
            model = LongformerForMaskedLM(LongformerConfig(**cfg)).eval()
        if family == "drlongformer":
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head.decoder")},
                str(tmp / "model.safetensors"),
                metadata={"format": "pt"},
            )
        else:
            torch.save(model.state_dict(), tmp / "pytorch_model.bin")
        apply_umask(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clinlong.export.synthetic",
        description="Write a random-weight checkpoint in a family's real layout.",
    )
    p.add_argument("out", help="directory to create")
    p.add_argument("--size", choices=("tiny", "base"), default="tiny")
    p.add_argument(
        "--family",
        choices=FAMILIES,
        default="longformer",
        help="longformer: Clinical-Longformer; drlongformer; drbert-4096; bigbird: Clinical-BigBird",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--head",
        choices=HEADS,
        help="a fine-tuned layout: ForSequenceClassification (sequence) or "
        "ForTokenClassification (token) with a random head",
    )
    p.add_argument("--labels", default="", help="with --head: comma-separated label names (id2label in order)")
    p.add_argument(
        "--multi-label",
        action="store_true",
        help="with --head sequence: problem_type multi_label_classification (sigmoid per label)",
    )
    args = p.parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    try:
        write_synthetic_checkpoint(args.out, args.size, args.seed, args.family, args.head, labels, args.multi_label)
    except ValueError as e:
        p.error(str(e))
    kind = f"{args.head}-classification " if args.head else ""
    print(f"wrote synthetic {args.family} {args.size} {kind}checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
