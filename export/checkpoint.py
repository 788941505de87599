"""Read and validate a Hugging Face Longformer checkpoint (local directory or hub id)."""
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
from clinlong.pipelines.core.model import EncoderConfig, encoder_state

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


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
        raise ExportError(f"checkpoint directory {source} does not exist; pass a local checkpoint directory or a hub id like yikuan8/Clinical-Longformer")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"]))
    except Exception as e:  # network, auth, missing repo
        raise ExportError(f"could not download {source} from the Hugging Face hub ({type(e).__name__}); "
                          "download the checkpoint elsewhere and pass its local directory") from None


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg_path} is not valid JSON ({e.__class__.__name__}); re-download the checkpoint") from None
    if cfg.get("model_type") != "longformer":
        raise ExportError(f"config.json describes a {cfg.get('model_type')!r} model, not 'longformer'; "
                          "pass a Longformer checkpoint such as yikuan8/Clinical-Longformer")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ExportError(f"config.json lacks {', '.join(missing)}; re-download the checkpoint")
    return cfg


def _encoder_config(cfg: dict) -> EncoderConfig:
    ec = EncoderConfig.from_hf_dict(cfg)
    if len(ec.attention_window) != ec.num_hidden_layers:
        raise ExportError(f"config.json has {len(ec.attention_window)} attention windows for "
                          f"{ec.num_hidden_layers} layers; give one window per layer or a single number")
    bad = [w for w in ec.attention_window if w <= 0 or w % 2]
    if bad:
        raise ExportError(f"attention windows must be positive and even, config.json has {bad}; fix attention_window")
    if ec.hidden_size % ec.num_attention_heads:
        raise ExportError(f"hidden_size {ec.hidden_size} is not divisible by {ec.num_attention_heads} heads; fix config.json")
    if ec.max_length < 1:
        raise ExportError(f"max_position_embeddings {ec.max_position_embeddings} leaves no room for tokens after "
                          f"the padding index {ec.pad_token_id}; fix config.json")
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
            raise ExportError(f"weights file {f} is corrupt or truncated ({type(e).__name__}); re-download it") from None
        except Exception as e:  # safetensors raises its own error type
            raise ExportError(f"weights file {f} could not be read ({type(e).__name__}); re-download it") from None
    raise ExportError(f"{path} has no weights ({' or '.join(WEIGHT_FILES)}); download the checkpoint's weights")


def _read_tokenizer(path: Path):
    has_fast = (path / "tokenizer.json").is_file()
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not (has_fast or has_bpe):
        raise ExportError(f"{path} has no tokenizer (tokenizer.json, or vocab.json with merges.txt); "
                          "copy the checkpoint's tokenizer files into it")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:
        raise ExportError(f"the tokenizer files in {path} could not be loaded ({type(e).__name__}); re-download them") from None


def _check_shapes(ec: EncoderConfig, state: dict[str, torch.Tensor], tokenizer) -> None:
    state = encoder_state(state)
    pos = state.get("embeddings.position_embeddings.weight")
    words = state.get("embeddings.word_embeddings.weight")
    if pos is None or words is None:
        raise ExportError("the weights lack Longformer embeddings (embeddings.position_embeddings / word_embeddings); "
                          "pass a Longformer checkpoint")
    if pos.shape[0] != ec.max_position_embeddings:
        raise ExportError(f"max_position_embeddings is {ec.max_position_embeddings} in config.json but the weights hold "
                          f"{pos.shape[0]} positions; use the config.json that came with these weights")
    if words.shape[0] != ec.vocab_size:
        raise ExportError(f"vocab_size is {ec.vocab_size} in config.json but the weights hold {words.shape[0]} rows; "
                          "use the config.json that came with these weights")
    if len(tokenizer) > ec.vocab_size:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens but the model only {ec.vocab_size} embeddings; "
                          "use the tokenizer that came with these weights")
    if tokenizer.pad_token_id != ec.pad_token_id:
        raise ExportError(f"the tokenizer pads with id {tokenizer.pad_token_id} but config.json says {ec.pad_token_id}; "
                          "use the tokenizer that came with these weights")


def read_checkpoint(source: str) -> Checkpoint:
    """Load `source` (directory or hub id), checking that config, weights and tokenizer agree."""
    path = resolve(source)
    cfg = _read_config(path)
    ec = _encoder_config(cfg)
    weights_file, state = _read_weights(path)
    tokenizer = _read_tokenizer(path)
    _check_shapes(ec, state, tokenizer)
    h = hashlib.sha256()
    for name in sorted({"config.json", weights_file, *TOKENIZER_FILES}):
        if (path / name).is_file():
            h.update(f"{name}:{file_sha256(path / name)}\n".encode())
    return Checkpoint(path=path, config=cfg, encoder_config=ec, state_dict=state, tokenizer=tokenizer,
                      weights_file=weights_file, sha256=h.hexdigest())
