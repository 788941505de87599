"""Read and validate a Hugging Face checkpoint of the family (Longformer, BigBird; local directory or hub id)."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from clinlong.export.errors import ExportError
from clinlong.pipelines.core.artifact import file_sha256
from clinlong.pipelines.core.heads import ACTIVATIONS, ARCHITECTURES, DENSE_ACTIVATIONS, WEIGHT_NAMES, Head
from clinlong.pipelines.core.model import MODEL_TYPES, EncoderConfig, encoder_state

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SENTENCEPIECE_FILES = ("sentencepiece.bpe.model", "spiece.model")  # CamemBERT/DrBERT's, BigBird's
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    *SENTENCEPIECE_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class HeadSpec:
    """A fine-tuned checkpoint's head: its description (core.heads.Head) and its weights (Hugging Face's names
    under `classifier.`, without the prefix)."""

    head: Head
    weights: dict[str, torch.Tensor]
    problem_type_given: bool  # False: config.json has none; single-label softmax, as Hugging Face's pipelines read it


@dataclass
class Checkpoint:
    """A validated checkpoint: its config, encoder weights and the tokenizer it was trained with."""

    path: Path
    config: dict
    encoder_config: EncoderConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: object  # transformers PreTrainedTokenizerFast, exactly as the checkpoint encodes
    weights_file: str
    sha256: str  # over config, weights and tokenizer files, in name order
    frame: tuple[int, int]  # the ids the tokenizer puts around a text (see sequence_frame)
    head: HeadSpec | None = None  # a *ForSequenceClassification / *ForTokenClassification checkpoint's head
    other_head: str | None = None  # the architecture of a fine-tuned checkpoint whose head is not exported (QA, ...)

    @property
    def name(self) -> str:
        return self.path.name


def resolve(source: str) -> Path:
    """A local directory as is; otherwise a hub id downloaded through huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ExportError(f"checkpoint {source} is a file; pass the checkpoint directory that holds config.json")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ExportError(
            f"checkpoint directory {source} does not exist; pass a local checkpoint directory "
            "or a hub id like yikuan8/Clinical-Longformer"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors", "*.bin"]))
    except Exception as e:  # network, auth, missing repo
        raise ExportError(
            f"could not download {source} from the Hugging Face hub ({type(e).__name__}); "
            "download the checkpoint elsewhere and pass its local directory"
        ) from None


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(
            f"{cfg_path} is not valid JSON ({e.__class__.__name__}); re-download the checkpoint"
        ) from None
    if cfg.get("model_type") not in MODEL_TYPES:
        raise ExportError(
            f"config.json describes a {cfg.get('model_type')!r} model, not one of {MODEL_TYPES}; "
            "pass a Longformer or BigBird checkpoint such as yikuan8/Clinical-Longformer"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
    )
    if cfg["model_type"] == "big_bird":
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise ExportError("config.json describes a BigBird decoder; pass an encoder checkpoint (is_decoder false)")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ExportError(
                f"position_embedding_type {cfg['position_embedding_type']!r} is not supported; "
                "BigBird checkpoints use absolute positions"
            )
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ExportError(f"config.json lacks {', '.join(missing)}; re-download the checkpoint")
    return cfg


def _encoder_config(cfg: dict) -> EncoderConfig:
    ec = EncoderConfig.from_hf_dict(cfg)
    if ec.hidden_size % ec.num_attention_heads:
        raise ExportError(
            f"hidden_size {ec.hidden_size} is not divisible by {ec.num_attention_heads} heads; fix config.json"
        )
    if ec.model_type == "big_bird":
        if cfg.get("attention_type", "block_sparse") not in ("block_sparse", "original_full"):
            raise ExportError(
                f"attention_type {cfg['attention_type']!r} is not one of block_sparse, original_full; fix config.json"
            )
        if ec.block_size < 1 or ec.num_random_blocks < 0:
            raise ExportError(
                f"block_size {ec.block_size} / num_random_blocks {ec.num_random_blocks} are invalid; fix config.json"
            )
        return ec
    if len(ec.attention_window) != ec.num_hidden_layers:
        raise ExportError(
            f"config.json has {len(ec.attention_window)} attention windows for "
            f"{ec.num_hidden_layers} layers; give one window per layer or a single number"
        )
    bad = [w for w in ec.attention_window if w <= 0 or w % 2]
    if bad:
        raise ExportError(f"attention windows must be positive and even, config.json has {bad}; fix attention_window")
    if ec.max_length < 1:
        raise ExportError(
            f"max_position_embeddings {ec.max_position_embeddings} leaves no room for tokens after "
            f"the padding index {ec.pad_token_id}; fix config.json"
        )
    return ec


def _read_weights(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    for name in WEIGHT_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return name, load_file(str(f), device="cpu")
            return name, torch.load(f, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise ExportError(
                f"weights file {f} is corrupt or truncated ({type(e).__name__}); re-download it"
            ) from None
        except Exception as e:  # safetensors raises its own error type
            raise ExportError(f"weights file {f} could not be read ({type(e).__name__}); re-download it") from None
    raise ExportError(f"{path} has no weights ({' or '.join(WEIGHT_FILES)}); download the checkpoint's weights")


def _read_tokenizer(path: Path):
    """The checkpoint's fast tokenizer: tokenizer.json, byte-level BPE files, or a SentencePiece model
    (converted by transformers, which needs the sentencepiece and protobuf packages)."""
    has_fast = (path / "tokenizer.json").is_file()
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    spm = next((name for name in SENTENCEPIECE_FILES if (path / name).is_file()), None)
    if not (has_fast or has_bpe or spm):
        raise ExportError(
            f"{path} has no tokenizer (tokenizer.json, vocab.json with merges.txt, or "
            f"{' / '.join(SENTENCEPIECE_FILES)}); copy the checkpoint's tokenizer files into it"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:
        hint = (
            "; converting a SentencePiece model needs: pip install sentencepiece protobuf"
            if spm and not has_fast
            else "; re-download them"
        )
        raise ExportError(f"the tokenizer files in {path} could not be loaded ({type(e).__name__}){hint}") from None
    if not tok.is_fast:
        raise ExportError(
            f"the tokenizer in {path} has no fast (Rust) form; add its tokenizer.json "
            "(tokenizer.save_pretrained writes one)"
        )
    return tok


def _check_shapes(ec: EncoderConfig, state: dict[str, torch.Tensor], tokenizer) -> None:
    state = encoder_state(state)
    pos = state.get("embeddings.position_embeddings.weight")
    words = state.get("embeddings.word_embeddings.weight")
    if pos is None or words is None:
        raise ExportError(
            f"the weights lack {ec.model_type} embeddings (embeddings.position_embeddings / "
            "word_embeddings); pass the checkpoint that config.json describes"
        )
    if pos.shape[0] != ec.max_position_embeddings:
        raise ExportError(
            f"max_position_embeddings is {ec.max_position_embeddings} in config.json but the weights "
            f"hold {pos.shape[0]} positions; use the config.json that came with these weights"
        )
    if words.shape[0] != ec.vocab_size:
        raise ExportError(
            f"vocab_size is {ec.vocab_size} in config.json but the weights hold {words.shape[0]} rows; "
            "use the config.json that came with these weights"
        )
    if len(tokenizer) > ec.vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {ec.vocab_size} embeddings; "
            "use the tokenizer that came with these weights"
        )
    if tokenizer.pad_token_id != ec.pad_token_id:
        raise ExportError(
            f"the tokenizer pads with id {tokenizer.pad_token_id} but config.json says "
            f"{ec.pad_token_id}; use the tokenizer that came with these weights"
        )


def sequence_frame(tokenizer) -> tuple[int, int]:
    """The ids the tokenizer puts around a text (<s> ... </s>, [CLS] ... [SEP]), read from what it does."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    framed = tokenizer("x")["input_ids"]
    i = next((i for i in range(len(framed) - len(bare) + 1) if framed[i : i + len(bare)] == bare), None)
    if i != 1 or len(framed) != len(bare) + 2:
        raise ExportError(
            "the tokenizer does not frame a text with one start and one end token; "
            "pass a checkpoint whose tokenizer adds e.g. <s> ... </s> or [CLS] ... [SEP]"
        )
    return framed[0], framed[-1]


def fine_tuned_architecture(cfg: dict) -> str | None:
    """The checkpoint's class when it is a fine-tuned one (not *Model or *ForMaskedLM), e.g.
    LongformerForSequenceClassification; None for an encoder or a masked-LM checkpoint."""
    return next((a for a in cfg.get("architectures") or [] if not a.endswith(("MaskedLM", "Model"))), None)


def read_head(cfg: dict, state: dict[str, torch.Tensor]) -> HeadSpec | None:
    """The head of a sequence- or token-classification checkpoint (core.heads.ARCHITECTURES), checked against
    config.json (id2label, problem_type) and the weights; None for other checkpoints. Every refusal is one line."""
    arch = fine_tuned_architecture(cfg)
    if arch not in ARCHITECTURES:
        return None
    family = "BigBird" if cfg["model_type"] == "big_bird" else "Longformer"
    if not arch.startswith(family):
        raise ExportError(
            f"config.json names a {arch} but describes a {cfg['model_type']} model; "
            "use the config.json that came with these weights"
        )
    kind, dense = ARCHITECTURES[arch]
    id2label = cfg.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ExportError(
            f"config.json of this {arch} checkpoint has no id2label; add the label names in id order "
            '(e.g. "id2label": {"0": "NEGATIVE", "1": "POSITIVE"}), as save_pretrained writes them'
        )
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ExportError("config.json's id2label keys must be the label ids 0, 1, ...; fix id2label") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ExportError(f"config.json's id2label has ids {sorted(by_id)}, not 0..{len(by_id) - 1}; fix id2label")
    labels = tuple(by_id[i] for i in range(len(by_id)))
    if len(set(labels)) != len(labels):
        dup = sorted({n for n in labels if labels.count(n) > 1})
        raise ExportError(f"config.json's id2label names {dup} more than once; give each label id its own name")
    problem_type = cfg.get("problem_type")
    if problem_type == "regression" or len(labels) == 1:
        raise ExportError(
            f"this {arch} checkpoint is a regression head ({len(labels)} output, problem_type "
            f"{problem_type}); only classification heads are exported (single_label_classification, "
            "multi_label_classification)"
        )
    given = problem_type is not None
    problem_type = problem_type or "single_label_classification"  # Hugging Face's pipelines: softmax for > 1 label
    if problem_type not in ACTIVATIONS:
        raise ExportError(f"problem_type {problem_type!r} is not one of {sorted(ACTIVATIONS)}; fix config.json")
    if kind == "token" and problem_type != "single_label_classification":
        raise ExportError(
            f"a token-classification head is single-label (softmax per token), config.json says "
            f"{problem_type}; fix problem_type"
        )
    dense_act = None
    if kind == "sequence":
        dense_act = "tanh" if dense == "tanh" else str(cfg.get("hidden_act") or "gelu_new")
        if dense_act not in DENSE_ACTIVATIONS:
            raise ExportError(f"the head's activation {dense_act!r} is not supported ({sorted(DENSE_ACTIVATIONS)})")
    weights = {k[len("classifier.") :]: v.float() for k, v in state.items() if k.startswith("classifier.")}
    missing = [f"classifier.{n}" for n in WEIGHT_NAMES[kind] if n not in weights]
    if missing:
        raise ExportError(
            f"the weights lack the {arch} head ({', '.join(missing)}); pass the checkpoint that config.json describes"
        )
    weights = {n: weights[n] for n in WEIGHT_NAMES[kind]}
    hidden = int(cfg["hidden_size"])
    out = weights["out_proj.weight" if kind == "sequence" else "weight"]
    shapes = {
        "sequence": {
            "dense.weight": (hidden, hidden),
            "dense.bias": (hidden,),
            "out_proj.weight": (len(labels), hidden),
            "out_proj.bias": (len(labels),),
        },
        "token": {"weight": (len(labels), hidden), "bias": (len(labels),)},
    }[kind]
    bad = [n for n, shape in shapes.items() if tuple(weights[n].shape) != shape]
    if bad:
        raise ExportError(
            f"the head's classifier.{bad[0]} has shape {tuple(weights[bad[0]].shape)}, expected "
            f"{shapes[bad[0]]} ({len(labels)} labels in id2label, hidden size {hidden}; the head gives "
            f"{out.shape[0]} logits); use the config.json that came with these weights"
        )
    head = Head(
        kind=kind,
        labels=labels,
        problem_type=problem_type,
        activation=ACTIVATIONS[problem_type],
        global_attention="cls" if kind == "sequence" and family == "Longformer" else "none",
        architecture=arch,
        dense_act=dense_act,
    )
    return HeadSpec(head, weights, given)


def read_checkpoint(source: str) -> Checkpoint:
    """Load `source` (directory or hub id), checking that config, weights and tokenizer agree."""
    path = resolve(source)
    cfg = _read_config(path)
    ec = _encoder_config(cfg)
    weights_file, state = _read_weights(path)
    head = read_head(cfg, state)  # a fine-tuned head's refusals come before the tokenizer's work
    tokenizer = _read_tokenizer(path)
    _check_shapes(ec, state, tokenizer)
    frame = sequence_frame(tokenizer)
    arch = fine_tuned_architecture(cfg)
    h = hashlib.sha256()
    for name in sorted({"config.json", weights_file, *TOKENIZER_FILES}):
        if (path / name).is_file():
            h.update(f"{name}:{file_sha256(path / name)}\n".encode())
    return Checkpoint(
        path=path,
        config=cfg,
        encoder_config=ec,
        state_dict=state,
        tokenizer=tokenizer,
        weights_file=weights_file,
        sha256=h.hexdigest(),
        frame=frame,
        head=head,
        other_head=arch if arch and head is None else None,
    )
