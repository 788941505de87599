"""Export-friendly Longformer encoder: the same function as Hugging Face's `LongformerModel`
(local sliding-window attention, no global attention), written so that it traces to ONNX with
dynamic batch and sequence length.

Hugging Face computes banded attention with stride tricks whose shapes depend on the traced
length. Here each layer pads the sequence to a multiple of its one-sided window `b = w/2`, cuts
it into blocks of `b` tokens, and lets every query block attend to the three key blocks around
it (previous, own, next) under the mask |i - j| <= b. That is exactly Hugging Face's window (each
token sees `b` tokens on either side) at 3b/(2b+1) ≈ 1.5x its attention FLOPs, and all shapes are
expressions of the input's shape. Parameter names equal Hugging Face's, so its state dict loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class EncoderConfig:
    """The subset of a Hugging Face `LongformerConfig` that defines the encoder's function."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    attention_window: tuple[int, ...]
    hidden_act: str = "gelu"

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "EncoderConfig":
        n_layers = int(cfg["num_hidden_layers"])
        window = cfg.get("attention_window", 512)
        windows = tuple(int(w) for w in window) if isinstance(window, (list, tuple)) else (int(window),) * n_layers
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
        )

    @property
    def max_length(self) -> int:
        """Longest input in tokens: RoBERTa-style positions start after the padding index."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @property
    def pad_multiple(self) -> int:
        """Every layer's block size divides sequences padded to this length multiple."""
        return math.lcm(*(w // 2 for w in self.attention_window))


_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "relu": F.relu}


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.padding_idx = cfg.pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # RoBERTa positions: count non-pad tokens, offset by the padding index (as Hugging Face).
        not_pad = input_ids.ne(self.padding_idx).to(torch.int64)
        position_ids = torch.cumsum(not_pad, dim=1) * not_pad + self.padding_idx
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings.weight[0])
        return self.LayerNorm(x)


class SlidingWindowSelfAttention(nn.Module):
    """Multi-head attention of each token over the `one_sided` tokens on either side of it."""

    def __init__(self, cfg: EncoderConfig, window: int, fused: bool = False):
        super().__init__()
        self.fused = fused  # PyTorch's fused SDPA kernel (GPUs); the ONNX export uses the explicit form
        if window <= 0 or window % 2:
            raise ValueError(f"attention window must be a positive even number, got {window}")
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.one_sided = window // 2
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        b = self.one_sided
        # Query row r of a block against key column c of the three blocks [prev, own, next]:
        # relative distance j - i = c - b - r; allowed when |c - b - r| <= b.
        r = torch.arange(b)[:, None]
        c = torch.arange(3 * b)[None, :]
        self.register_buffer("band", (c - b - r).abs() <= b, persistent=False)

    def _blocks3(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, n*b, d) -> (B, H, n, 3b, d): for each block, the previous, own and next block."""
        b = self.one_sided
        bsz, h, length, d = x.shape
        n = length // b
        padded = F.pad(x, (0, 0, b, b))
        blocks = padded.reshape(bsz, h, n + 2, b, d)
        return torch.cat([blocks[:, :, :-2], blocks[:, :, 1:-1], blocks[:, :, 2:]], dim=3)

    def forward(self, hidden: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """hidden: (B, L, D) with L a multiple of the block size; key_valid: (B, L) bool."""
        bsz, length, dim = hidden.shape
        b, h, d = self.one_sided, self.num_heads, self.head_dim
        n = length // b

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(bsz, length, h, d).transpose(1, 2)  # (B, H, L, d)

        q = heads(self.query(hidden) / math.sqrt(d)).reshape(bsz, h, n, b, d)
        k = self._blocks3(heads(self.key(hidden)))
        v = self._blocks3(heads(self.value(hidden)))
        valid = F.pad(key_valid, (b, b)).reshape(bsz, n + 2, b)
        valid = torch.cat([valid[:, :-2], valid[:, 1:-1], valid[:, 2:]], dim=2)  # (B, n, 3b)
        allowed = self.band[None, None] & valid[:, :, None, :]  # (B, n, b, 3b)
        if self.fused:
            # An additive mask of the dtype's minimum (not a boolean one) keeps fully masked padding rows
            # finite: a NaN there would reach real tokens through the next layer's keys.
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~allowed, torch.finfo(q.dtype).min)[:, None]
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            return ctx.reshape(bsz, h, length, d).transpose(1, 2).reshape(bsz, length, dim)
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, n, b, 3b)
        # masked_fill with the dtype's minimum (not -inf) keeps fully masked padding rows finite.
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v)  # (B, H, n, b, d)
        return ctx.reshape(bsz, h, length, d).transpose(1, 2).reshape(bsz, length, dim)


class _DenseLayerNorm(nn.Module):
    """Dense, residual add and LayerNorm (Hugging Face's *SelfOutput / *Output)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig, window: int, fused: bool = False):
        super().__init__()
        setattr(self, "self", SlidingWindowSelfAttention(cfg, window, fused))
        self.output = _DenseLayerNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        return self.output(getattr(self, "self")(hidden, key_valid), hidden)


class _Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig, window: int, fused: bool = False):
        super().__init__()
        self.attention = _Attention(cfg, window, fused)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        attn = self.attention(hidden, key_valid)
        return self.output(self.intermediate(attn), attn)


class _Stack(nn.Module):
    def __init__(self, cfg: EncoderConfig, fused: bool = False):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, w, fused) for w in cfg.attention_window)


class LongformerEncoder(nn.Module):
    """`last_hidden_state` of Hugging Face `LongformerModel` with local attention only."""

    def __init__(self, cfg: EncoderConfig, fused_attention: bool = False):
        super().__init__()
        if len(cfg.attention_window) != cfg.num_hidden_layers:
            raise ValueError(f"{len(cfg.attention_window)} attention windows for {cfg.num_hidden_layers} layers")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = _Stack(cfg, fused_attention)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        multiple = self.config.pad_multiple
        pad = (multiple - length % multiple) % multiple
        ids = F.pad(input_ids, (0, pad), value=self.config.pad_token_id)
        key_valid = F.pad(attention_mask, (0, pad), value=0) > 0
        hidden = self.embeddings(ids)
        for layer in self.encoder.layer:
            hidden = layer(hidden, key_valid)
        return hidden[:, :length]

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a LongformerModel or LongformerForMaskedLM state dict (`longformer.` prefix);
        global-attention projections, pooler and LM head are not part of the encoder."""
        state = encoder_state(state)
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} encoder weights, e.g. {missing[:3]}")
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"weight {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
        self.load_state_dict({k: state[k] for k in own}, strict=True)


HF_PREFIX = "longformer."  # LongformerForMaskedLM's prefix of the LongformerModel weights


def encoder_state(state: dict) -> dict:
    """A LongformerModel state dict from a LongformerForMaskedLM one (its `longformer.` weights, unprefixed);
    a state dict without the prefix is returned as it is."""
    if any(k.startswith(HF_PREFIX) for k in state):
        return {k[len(HF_PREFIX):]: v for k, v in state.items() if k.startswith(HF_PREFIX)}
    return state
