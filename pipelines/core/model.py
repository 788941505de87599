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

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clinlong.pipelines.core.packing import KERNELS


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

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings.weight[0])
        return self.LayerNorm(x)




@dataclass
class Segments:
    """Which packed sequence each token belongs to, computed once per forward and shared by all layers.

    `segment` (B, L): 1, 2, ... for the sequences of a row, 0 for padding; `starts`/`max_length` (varlen
    kernel only): cumulative token offsets of the runs of equal (row, segment) over the flattened batch."""

    segment: torch.Tensor
    starts: torch.Tensor | None = None
    max_length: int = 0


def segments_of(position_ids: torch.Tensor, padding_idx: int, with_starts: bool = False) -> Segments:
    """Segments from RoBERTa positions: a sequence starts where its first position (padding_idx + 1)
    appears, padding carries padding_idx. Nothing else is needed to pack sequences into a row."""
    valid = position_ids.ne(padding_idx)
    segment = torch.cumsum(position_ids.eq(padding_idx + 1).to(torch.int64), dim=1) * valid.to(torch.int64)
    if not with_starts:
        return Segments(segment)
    bsz, length = segment.shape
    key = (segment + torch.arange(bsz, device=segment.device)[:, None] * (length + 1)).reshape(-1)
    change = torch.ones_like(key, dtype=torch.bool)
    change[1:] = key[1:] != key[:-1]
    starts = torch.cat([torch.nonzero(change).reshape(-1), key.new_tensor([key.numel()])]).to(torch.int32)
    return Segments(segment, starts, int((starts[1:] - starts[:-1]).max()))


class SlidingWindowSelfAttention(nn.Module):
    """Multi-head attention of each token over the `one_sided` tokens on either side of it, within its
    own packed sequence.

    Kernels: `blocks`, the explicit form that ONNX traces (query blocks of `one_sided` tokens against
    the three key blocks around them); `flex`, FlexAttention with a block mask "same sequence and
    |i - j| <= one_sided" (GPUs under torch.compile; also runs eagerly on CPUs, which the tests use);
    `varlen`, flash attention over the flattened sequences with a window (CUDA only)."""

    def __init__(self, cfg: EncoderConfig, window: int, kernel: str = "blocks"):
        super().__init__()
        if window <= 0 or window % 2:
            raise ValueError(f"attention window must be a positive even number, got {window}")
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.one_sided = window // 2
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _blocks3(self, x: torch.Tensor, value=0) -> torch.Tensor:
        """(..., n*b, d) -> (..., n, 3b, d): for each block, the previous, own and next block."""
        b = self.one_sided
        *lead, length, d = x.shape
        n = length // b
        blocks = F.pad(x, (0, 0, b, b), value=value).reshape(*lead, n + 2, b, d)
        return torch.cat([blocks[..., :-2, :, :], blocks[..., 1:-1, :, :], blocks[..., 2:, :, :]], dim=-2)

    def forward(self, hidden: torch.Tensor, segments: Segments, masks: dict) -> torch.Tensor:
        """hidden: (B, L, D), L a multiple of the block size for `blocks`; `masks` caches what layers
        with the same window share (the band mask or the block mask)."""
        bsz, length, dim = hidden.shape
        h, d = self.num_heads, self.head_dim
        q = self.query(hidden).reshape(bsz, length, h, d)
        k = self.key(hidden).reshape(bsz, length, h, d)
        v = self.value(hidden).reshape(bsz, length, h, d)
        scale = 1.0 / math.sqrt(d)
        if self.kernel == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            flat = (lambda t: t.reshape(bsz * length, h, d))
            ctx = varlen_attn(flat(q), flat(k), flat(v), segments.starts, segments.starts, segments.max_length,
                              segments.max_length, scale=scale, window_size=(self.one_sided, self.one_sided))
            return ctx.reshape(bsz, length, dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, d)
        if self.kernel == "flex":
            key = ("flex", self.one_sided)
            if key not in masks:
                masks[key] = _flex_block_mask(segments.segment, self.one_sided)
            ctx = _flex_attention()(q, k, v, block_mask=masks[key], scale=scale)
            return ctx.transpose(1, 2).reshape(bsz, length, dim)
        b = self.one_sided
        n = length // b
        key = ("blocks", b)
        if key not in masks:
            # Query row r of a block against key column c of the three blocks [prev, own, next]:
            # relative distance j - i = c - b - r; allowed when |c - b - r| <= b (and the same sequence).
            r = torch.arange(b, device=hidden.device)[:, None]
            c = torch.arange(3 * b, device=hidden.device)[None, :]
            band = (c - b - r).abs() <= b
            seg_q = segments.segment.reshape(bsz, n, b)
            seg_k = self._blocks3(segments.segment[..., None]).reshape(bsz, n, 3 * b)  # outside: 0, as padding
            masks[key] = (band[None, None] & (seg_q[..., :, None] == seg_k[..., None, :]))[:, None]
        q = (q * scale).reshape(bsz, h, n, b, d)
        scores = torch.matmul(q, self._blocks3(k).transpose(-1, -2))  # (B, H, n, b, 3b)
        # The dtype's minimum (not -inf) keeps fully masked rows finite (padding sees padding anyway).
        scores = scores.masked_fill(~masks[key], torch.finfo(scores.dtype).min)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), self._blocks3(v))  # (B, H, n, b, d)
        return ctx.reshape(bsz, h, length, d).transpose(1, 2).reshape(bsz, length, dim)


def _flex_block_mask(segment: torch.Tensor, one_sided: int):
    """FlexAttention's block mask: same sequence (padding with padding) and |i - j| <= one_sided."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sequence_in_window(b, h, q_idx, kv_idx):
        return (segment[b, q_idx] == segment[b, kv_idx]) & ((q_idx - kv_idx).abs() <= one_sided)

    bsz, length = segment.shape
    return create_block_mask(same_sequence_in_window, bsz, None, length, length, device=segment.device)


@functools.cache
def _flex_attention():
    """FlexAttention, compiled where a GPU runs it (eager on CPUs: correct, dense, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)


class _DenseLayerNorm(nn.Module):
    """Dense, residual add and LayerNorm (Hugging Face's *SelfOutput / *Output)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig, window: int, kernel: str):
        super().__init__()
        setattr(self, "self", SlidingWindowSelfAttention(cfg, window, kernel))
        self.output = _DenseLayerNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, segments: Segments, masks: dict) -> torch.Tensor:
        return self.output(getattr(self, "self")(hidden, segments, masks), hidden)


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
    def __init__(self, cfg: EncoderConfig, window: int, kernel: str = "blocks"):
        super().__init__()
        self.attention = _Attention(cfg, window, kernel)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, segments: Segments, masks: dict) -> torch.Tensor:
        attn = self.attention(hidden, segments, masks)
        return self.output(self.intermediate(attn), attn)


class _Stack(nn.Module):
    def __init__(self, cfg: EncoderConfig, kernel: str = "blocks"):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, w, kernel) for w in cfg.attention_window)


class LongformerEncoder(nn.Module):
    """`last_hidden_state` of Hugging Face `LongformerModel` with local attention only, for rows that
    pack several sequences end to end.

    Inputs: `input_ids` (B, L) and `position_ids` (B, L), the RoBERTa positions of each packed
    sequence (padding_idx + 1, + 2, ... from its first token; padding_idx on padding). Each sequence's
    vectors equal those of the sequence run alone: positions restart, attention never crosses a
    sequence. `position_ids_for` builds them for a row."""

    def __init__(self, cfg: EncoderConfig, kernel: str = "blocks"):
        super().__init__()
        if len(cfg.attention_window) != cfg.num_hidden_layers:
            raise ValueError(f"{len(cfg.attention_window)} attention windows for {cfg.num_hidden_layers} layers")
        self.config = cfg
        self.kernel = kernel
        self.embeddings = Embeddings(cfg)
        self.encoder = _Stack(cfg, kernel)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        pad_id = self.config.pad_token_id
        if self.kernel == "blocks":  # whole blocks per row: padding at the row's end only
            multiple = self.config.pad_multiple
            pad = (multiple - length % multiple) % multiple
            input_ids = F.pad(input_ids, (0, pad), value=pad_id)
            position_ids = F.pad(position_ids, (0, pad), value=pad_id)
        segments = segments_of(position_ids, pad_id, with_starts=self.kernel == "varlen")
        hidden = self.embeddings(input_ids, position_ids)
        masks: dict = {}
        for layer in self.encoder.layer:
            hidden = layer(hidden, segments, masks)
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
