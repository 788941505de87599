"""The encoder's configuration, typed and frozen: the subset of a Hugging Face config that defines the
encoder's function. No torch here, so the artifact reader, the engine and the runtime read it without
importing the model (`core.model` re-exports it; `export/` builds it from config.json, the artifact's
manifest stores it as a dict and `Artifact.encoder_config` reads it back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

MODEL_TYPES = ("longformer", "big_bird")  # Hugging Face's model_type of each supported family


@dataclass(frozen=True)
class EncoderConfig:
    """The subset of a Hugging Face `LongformerConfig` or `BigBirdConfig` that defines the encoder's function."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    attention_window: tuple[int, ...]  # Longformer: one window per layer; BigBird: none
    hidden_act: str = "gelu"
    model_type: str = "longformer"
    block_size: int = 64  # BigBird: attention block, global first/last blocks, one block either side
    num_random_blocks: int = 3  # BigBird: random key blocks per query block (all block 0 at inference)
    block_sparse: bool = True  # BigBird: attention_type "block_sparse" (else "original_full")
    rescale_embeddings: bool = False  # BigBird: word embeddings times sqrt(hidden_size)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "EncoderConfig":
        n_layers = int(cfg["num_hidden_layers"])
        model_type = str(cfg.get("model_type", "longformer"))
        window = cfg.get("attention_window", 512)
        windows = tuple(int(w) for w in window) if isinstance(window, (list, tuple)) else (int(window),) * n_layers
        if model_type == "big_bird":
            windows = ()
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            type_vocab_size=int(cfg.get("type_vocab_size", 1)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            pad_token_id=int(cfg.get("pad_token_id", 1)),
            attention_window=windows,
            hidden_act=str(cfg.get("hidden_act", "gelu")),
            model_type=model_type,
            block_size=int(cfg.get("block_size", 64)),
            num_random_blocks=int(cfg.get("num_random_blocks", 3)),
            block_sparse=cfg.get("attention_type", "block_sparse") == "block_sparse",
            rescale_embeddings=bool(cfg.get("rescale_embeddings", False)),
        )

    @property
    def position_offset(self) -> int:
        """Packed rows carry RoBERTa-style positions (padding_idx + 1, + 2, ...; core.packing) for every
        family; the embedding row of a position is that minus this offset (BigBird's positions are 0-based)."""
        return self.pad_token_id + 1 if self.model_type == "big_bird" else 0

    @property
    def max_length(self) -> int:
        """Longest input in tokens: Longformer's (RoBERTa's) positions start after the padding index."""
        return self.max_position_embeddings - (0 if self.model_type == "big_bird" else self.pad_token_id + 1)

    @property
    def pad_multiple(self) -> int:
        """The blocks kernel pads rows to this length multiple (every Longformer layer's block size divides it)."""
        return math.lcm(*(w // 2 for w in self.attention_window)) if self.attention_window else 1

    @property
    def sparse_from(self) -> int:
        """BigBird: sequences longer than this run block-sparse, shorter ones full attention (Hugging Face's
        switch: 2 global + 3 sliding + 2 x random blocks)."""
        return (5 + 2 * self.num_random_blocks) * self.block_size

    @classmethod
    def from_manifest(cls, cfg: dict) -> "EncoderConfig":
        """Back from the manifest's dict (`dataclasses.asdict` of one): lists become tuples; keys this version
        does not know are ignored, missing optional ones take their defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in cfg.items() if k in known}
        values["attention_window"] = tuple(values.get("attention_window", ()))
        return cls(**values)
