"""Export-friendly encoders of the model family: the same functions as Hugging Face's `LongformerModel`
(local sliding-window attention, no global attention) and `BigBirdModel` (block-sparse attention as it
runs at inference), written so that they trace to ONNX with dynamic batch and row length and run on
packed rows (core.packing).

Longformer: Hugging Face computes banded attention with stride tricks whose shapes depend on the traced
length. Here each layer pads the row to a multiple of its one-sided window `b = w/2`, cuts it into
blocks of `b` tokens, and lets every query block attend to the three key blocks around it (previous,
own, next) under the mask |i - j| <= b ∧ same sequence. That is exactly Hugging Face's window (each
token sees `b` tokens on either side) at 3b/(2b+1) ≈ 1.5x its attention FLOPs.

Longformer's global attention (`global_positions`, see `SlidingWindowSelfAttention.forward`): a global
token attends to every token of its sequence with the `*_global` projections, and every token of its
sequence attends to it. The local part keeps the windowed kernel as it is; the global keys outside each
query's window are a small dense part (queries x global tokens) merged with it by log-sum-exp, so no key
is counted twice; the global tokens' own rows are then replaced by their dense global attention.

BigBird: see `BlockSparseSelfAttention`. Parameter names equal Hugging Face's, so its state dicts load.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clinlong.pipelines.core.encoder_config import MODEL_TYPES, EncoderConfig  # noqa: F401 - re-exported
from clinlong.pipelines.core.options import check_choice
from clinlong.pipelines.core.packing import BIG_BIRD_KERNELS, KERNELS

_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised: its weights always come from a checkpoint, and its default
    normal_() init on the meta device (where runtimes build the model) imports ~800 modules of torch's
    Python decompositions, a second per Spark worker."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = _embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = _embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.offset = cfg.position_offset
        self.scale = math.sqrt(cfg.hidden_size) if cfg.rescale_embeddings else 1.0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        words = self.word_embeddings(input_ids)
        if self.scale != 1.0:
            words = words * self.scale
        types = self.token_type_embeddings.weight[0]
        if self.offset:  # BigBird: 0-based positions (padding maps below 0: any row serves, it is never read)
            positions = self.position_embeddings((position_ids - self.offset).clamp_min(0))
            return self.LayerNorm(words + types + positions)  # each family sums in Hugging Face's order
        return self.LayerNorm(words + self.position_embeddings(position_ids) + types)


@dataclass
class Segments:
    """Which packed sequence each token belongs to, computed once per forward and shared by all layers.

    `segment` (B, L): 1, 2, ... for the sequences of a row, 0 for padding; `relative` (B, L): each token's
    index in its sequence (-1 on padding); `starts`/`max_length` (varlen kernel only): cumulative token
    offsets of the runs of equal (row, segment) over the flattened batch."""

    segment: torch.Tensor
    relative: torch.Tensor
    starts: torch.Tensor | None = None
    max_length: int = 0
    # Longformer's global tokens (see with_globals): row index (B, G) of each, clamped to 0 where unused,
    # whether it is used, and its sequence (0 where unused).
    global_index: torch.Tensor | None = None
    global_valid: torch.Tensor | None = None
    global_segment: torch.Tensor | None = None


def with_globals(segments: Segments, global_positions: torch.Tensor) -> Segments:
    """`segments` with the global tokens of each row: `global_positions` (B, G) int64 holds their row
    indices, -1 in unused slots (rows with fewer global tokens than G; G >= 1)."""
    valid = global_positions.ge(0)
    index = global_positions.clamp_min(0)
    segment = torch.gather(segments.segment, 1, index) * valid.to(segments.segment.dtype)
    return Segments(segments.segment, segments.relative, segments.starts, segments.max_length, index, valid, segment)


def global_positions_of(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) global attention mask (nonzero: global) -> (B, G) row indices, -1 in unused slots (eager only)."""
    mask = mask.ne(0)
    count = int(mask.sum(1).max()) if mask.numel() else 0
    out = torch.full((mask.shape[0], max(count, 1)), -1, dtype=torch.int64, device=mask.device)
    for row in range(mask.shape[0]):
        idx = torch.nonzero(mask[row]).reshape(-1)
        out[row, : len(idx)] = idx
    return out


def _merge(ctx_a: torch.Tensor, lse_a: torch.Tensor, ctx_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each set's output (B, H, L, d) and
    log-sum-exp of scores (B, H, L): each output weighted by its share of the softmax's denominator."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return (ctx_a.float() * wa + ctx_b.float() * wb).to(ctx_a.dtype)


def segments_of(position_ids: torch.Tensor, padding_idx: int, with_starts: bool = False) -> Segments:
    """Segments from RoBERTa positions: a sequence starts where its first position (padding_idx + 1)
    appears, padding carries padding_idx. Nothing else is needed to pack sequences into a row."""
    valid = position_ids.ne(padding_idx)
    segment = torch.cumsum(position_ids.eq(padding_idx + 1).to(torch.int64), dim=1) * valid.to(torch.int64)
    relative = position_ids - (padding_idx + 1)
    if not with_starts:
        return Segments(segment, relative)
    bsz, length = segment.shape
    key = (segment + torch.arange(bsz, device=segment.device)[:, None] * (length + 1)).reshape(-1)
    change = torch.ones_like(key, dtype=torch.bool)
    change[1:] = key[1:] != key[:-1]
    starts = torch.cat([torch.nonzero(change).reshape(-1), key.new_tensor([key.numel()])]).to(torch.int32)
    return Segments(segment, relative, starts, int((starts[1:] - starts[:-1]).max()))


class SlidingWindowSelfAttention(nn.Module):
    """Multi-head attention of each token over the `one_sided` tokens on either side of it, within its
    own packed sequence, and, where a sequence has global tokens, Longformer's global attention.

    Kernels: `blocks`, the explicit form that ONNX traces (query blocks of `one_sided` tokens against
    the three key blocks around them); `flex`, FlexAttention with a block mask "same sequence and
    |i - j| <= one_sided" (GPUs under torch.compile; also runs eagerly on CPUs, which the tests use);
    `varlen`, flash attention over the flattened sequences with a window (CUDA only).

    Global attention (Hugging Face's `LongformerSelfAttention` with a `global_attention_mask`): a local
    token attends to its window and to every global token of its sequence, keys and values from the
    usual projections, each key once; a global token attends to every token of its sequence with
    `query_global`, `key_global` and `value_global`. Every kernel computes its window as without global
    tokens and returns the log-sum-exp of its scores; the global keys farther than `one_sided` from a
    query (the ones its window lacks) are a dense (L x G) part merged with it (`_merge`)."""

    def __init__(self, cfg: EncoderConfig, window: int, kernel: str = "blocks", with_global: bool = True):
        super().__init__()
        if window <= 0 or window % 2:
            raise ValueError(f"attention window must be a positive even number, got {window}")
        check_choice("attention kernel", kernel, KERNELS)
        self.kernel = kernel
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.one_sided = window // 2
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.with_global = with_global
        if with_global:
            self.query_global = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.key_global = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.value_global = nn.Linear(cfg.hidden_size, cfg.hidden_size)

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
        glob = segments.global_index is not None
        if glob and not self.with_global:
            raise ValueError(
                "this model was built without the global-attention projections (query_global, "
                "key_global, value_global); re-export the checkpoint for global attention"
            )
        if self.kernel == "varlen":
            from torch.nn.attention.varlen import AuxRequest, varlen_attn

            def flat(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(bsz * length, h, d)

            res = varlen_attn(
                flat(q),
                flat(k),
                flat(v),
                segments.starts,
                segments.starts,
                segments.max_length,
                segments.max_length,
                scale=scale,
                window_size=(self.one_sided, self.one_sided),
                return_aux=AuxRequest(lse=True) if glob else None,
            )
            if not glob:
                return res.reshape(bsz, length, dim)
            ctx, lse = res
            # lse: (tokens, heads) as documented; flash attention's own layout is (heads, tokens)
            lse = lse.transpose(0, 1) if lse.shape[0] == h and lse.shape[-1] != h else lse
            ctx = ctx.reshape(bsz, length, h, d).transpose(1, 2)
            lse = lse.reshape(bsz, length, h).transpose(1, 2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, d)
            if self.kernel == "flex":
                key = ("flex", self.one_sided)
                if key not in masks:
                    masks[key] = _flex_block_mask(segments.segment, self.one_sided)
                if not glob:
                    ctx = _flex_attention()(q, k, v, block_mask=masks[key], scale=scale)
                    return ctx.transpose(1, 2).reshape(bsz, length, dim)
                from torch.nn.attention.flex_attention import AuxRequest

                ctx, aux = _flex_attention()(
                    q, k, v, block_mask=masks[key], scale=scale, return_aux=AuxRequest(lse=True)
                )
                lse = aux.lse
            else:
                ctx, lse = self._blocks(q, k, v, segments, masks, scale, glob)
                if not glob:
                    return ctx.transpose(1, 2).reshape(bsz, length, dim)
        ctx = self._add_global_keys(q, k, v, ctx, lse, segments, masks, scale)
        ctx = ctx.transpose(1, 2).reshape(bsz, length, dim)
        return self._global_rows(hidden, ctx, segments, scale)

    def _blocks(self, q, k, v, segments: Segments, masks: dict, scale: float, with_lse: bool):
        """The explicit banded form: (B, H, L, d) context, and the log-sum-exp of scores (B, H, L) if asked."""
        bsz, h, length, d = q.shape
        b = self.one_sided
        n = length // b
        key = ("blocks", b)
        if key not in masks:
            # Query row r of a block against key column c of the three blocks [prev, own, next]:
            # relative distance j - i = c - b - r; allowed when |c - b - r| <= b (and the same sequence).
            r = torch.arange(b, device=q.device)[:, None]
            c = torch.arange(3 * b, device=q.device)[None, :]
            band = (c - b - r).abs() <= b
            seg_q = segments.segment.reshape(bsz, n, b)
            seg_k = self._blocks3(segments.segment[..., None]).reshape(bsz, n, 3 * b)  # outside: 0, as padding
            masks[key] = (band[None, None] & (seg_q[..., :, None] == seg_k[..., None, :]))[:, None]
        q = (q * scale).reshape(bsz, h, n, b, d)
        scores = torch.matmul(q, self._blocks3(k).transpose(-1, -2))  # (B, H, n, b, 3b)
        # The dtype's minimum (not -inf) keeps fully masked rows finite (padding sees padding anyway).
        scores = scores.masked_fill(~masks[key], torch.finfo(scores.dtype).min)
        if not with_lse:
            ctx = torch.matmul(torch.softmax(scores, dim=-1), self._blocks3(v))  # (B, H, n, b, d)
            return ctx.reshape(bsz, h, length, d), None
        # The log-sum-exp from the fused softmax, without another exp pass over the scores: at the row's
        # largest score m, p = exp(m - lse) >= 1 / 3b, so lse = m - log(p) loses nothing to underflow.
        probs = torch.softmax(scores, dim=-1)
        lse = scores.amax(dim=-1) - torch.log(probs.amax(dim=-1))
        ctx = torch.matmul(probs, self._blocks3(v))
        return ctx.reshape(bsz, h, length, d), lse.reshape(bsz, h, length)

    def _add_global_keys(self, q, k, v, ctx, lse, segments: Segments, masks: dict, scale: float) -> torch.Tensor:
        """Merge into the windowed context (B, H, L, d) each query's global keys outside its window."""
        bsz, h, length, d = q.shape
        idx = segments.global_index  # (B, G)
        key = ("global_keys", self.one_sided)
        if key not in masks:
            rows = torch.arange(length, device=q.device)
            far = (rows[None, :, None] - idx[:, None, :]).abs() > self.one_sided  # (B, L, G)
            same = segments.segment[:, :, None] == segments.global_segment[:, None, :]
            masks[key] = (far & same & segments.global_valid[:, None, :])[:, None]  # (B, 1, L, G)
        gather = idx[:, None, :, None].expand(bsz, h, idx.shape[1], d)
        k_g, v_g = torch.gather(k, 2, gather), torch.gather(v, 2, gather)  # (B, H, G, d)
        scores = torch.matmul(q * scale, k_g.transpose(-1, -2))  # (B, H, L, G)
        scores = scores.masked_fill(~masks[key], torch.finfo(scores.dtype).min)
        lse_g = torch.logsumexp(scores, dim=-1)
        ctx_g = torch.matmul(torch.softmax(scores, dim=-1), v_g)
        return _merge(ctx, lse, ctx_g, lse_g)

    def _global_rows(self, hidden: torch.Tensor, ctx: torch.Tensor, segments: Segments, scale: float) -> torch.Tensor:
        """`ctx` (B, L, D) with each global token's row replaced by its attention over its whole sequence
        through the global projections (Hugging Face's `_compute_global_attn_output_from_hidden`)."""
        bsz, length, dim = hidden.shape
        h, d = self.num_heads, self.head_dim
        idx, valid = segments.global_index, segments.global_valid
        n_glob = idx.shape[1]
        rows = torch.gather(hidden, 1, idx[:, :, None].expand(bsz, n_glob, dim))  # (B, G, D)
        q = (self.query_global(rows) * scale).reshape(bsz, n_glob, h, d).transpose(1, 2)  # (B, H, G, d)
        allowed = (segments.global_segment[:, :, None] == segments.segment[:, None, :]) & valid[:, :, None]
        exporting = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
        if n_glob * h < dim and not exporting:
            # Few global tokens (<s> of each sequence): the key and value projections moved to the global
            # side, q.(W h + b) = (W^T q).h + q.b and sum p (W h + b) = W (sum p h) + b, cost G x L x D
            # instead of key_global and value_global over all L tokens (L x D x D). q.b is the same for
            # every key of a row, which a softmax ignores.
            w_k = self.key_global.weight.reshape(h, d, dim)
            w_v = self.value_global.weight.reshape(h, d, dim)
            scores = torch.matmul(torch.einsum("bhgd,hde->bhge", q, w_k), hidden.transpose(1, 2)[:, None])
            scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
            mixed = torch.matmul(torch.softmax(scores, dim=-1), hidden[:, None])  # (B, H, G, D)
            out = torch.einsum("bhge,hde->bhgd", mixed, w_v) + self.value_global.bias.reshape(h, 1, d)
        else:  # Hugging Face's order (and the ONNX graph's, whose number of global tokens is dynamic)
            k = self.key_global(hidden).reshape(bsz, length, h, d).transpose(1, 2)
            v = self.value_global(hidden).reshape(bsz, length, h, d).transpose(1, 2)
            scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, G, L)
            scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
        out = out.transpose(1, 2).reshape(bsz, n_glob, dim)
        # Unused slots write to an extra row that is dropped.
        target = torch.where(valid, idx, torch.full_like(idx, length))
        padded = torch.cat([ctx, ctx.new_zeros(bsz, 1, dim)], dim=1)
        padded = padded.scatter(1, target[:, :, None].expand(bsz, n_glob, dim), out.to(ctx.dtype))
        return padded[:, :length]


class BlockSparseSelfAttention(nn.Module):
    """Hugging Face `BigBirdModel`'s attention as it runs at inference (eval mode), re-expressed exactly as
    masked attention with a score bias, for each packed sequence of n tokens alone:

    - n <= `sparse_from` (704 with blocks of 64 and 3 random blocks): full attention, as Hugging Face
      switches to "original_full" for such inputs.
    - longer: n is cut into nb = ceil(n / 64) blocks (Hugging Face pads the last one and masks its padding
      keys). The first and last query blocks attend to every key; every other query block to the block
      before, at and after it, to the first and last blocks, and to r "random" blocks, which Hugging Face
      draws only in training: in eval mode its `rand_attn` is all zeros, so all r are block 0. Block 0's
      keys thus enter those softmaxes 1 + r times, the same as once with log(1 + r) added to their scores.

    Kernels: `blocks` (dense scores with that mask and bias per row; what ONNX traces and CPUs run) and
    `flex` (FlexAttention: the mask as block mask, the bias as score_mod; GPUs)."""

    def __init__(self, cfg: EncoderConfig, kernel: str = "blocks"):
        super().__init__()
        check_choice("BigBird's attention kernel", kernel, BIG_BIRD_KERNELS)
        self.kernel = kernel
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.block_size, self.sparse_from, self.block_sparse = cfg.block_size, cfg.sparse_from, cfg.block_sparse
        self.block0_bias = math.log(1 + cfg.num_random_blocks)
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def layout(self, segments: Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token (B, L): its block in its sequence, whether it is a key block attended by every query
        (the first or last block), and whether it is a sparse query (a non-global block of a sequence
        longer than `sparse_from`)."""
        seg, rel = segments.segment, segments.relative
        # Each sequence's length: its largest relative position + 1 (positions count up to its end).
        per_seq = torch.zeros_like(F.pad(seg, (0, 1))).scatter_reduce(1, seg, rel + 1, "amax")
        length = torch.gather(per_seq, 1, seg)
        block = rel.clamp_min(0) // self.block_size
        n_blocks = (length + self.block_size - 1) // self.block_size
        edge = (block == 0) | (block == n_blocks - 1)
        sparse = (length > self.sparse_from) & ~edge
        if not self.block_sparse:
            sparse = torch.zeros_like(sparse)
        return block, edge, sparse

    def forward(self, hidden: torch.Tensor, segments: Segments, masks: dict) -> torch.Tensor:
        bsz, length, dim = hidden.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = (
            proj(hidden).reshape(bsz, length, h, d).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        scale = 1.0 / math.sqrt(d)
        if "bigbird" not in masks:
            masks["bigbird"] = self.layout(segments)
        block, edge, sparse = masks["bigbird"]
        seg = segments.segment
        if self.kernel == "flex":
            if "bigbird_flex" not in masks:
                masks["bigbird_flex"] = _flex_bigbird_mask(seg, block, edge, sparse)
            bias = self.block0_bias

            def block0_counted(score, b, h, q_idx, kv_idx):
                return score + (sparse[b, q_idx] & (block[b, kv_idx] == 0)).to(score.dtype) * bias

            ctx = _flex_attention()(q, k, v, score_mod=block0_counted, block_mask=masks["bigbird_flex"], scale=scale)
            return ctx.transpose(1, 2).reshape(bsz, length, dim)
        if "bigbird_dense" not in masks:  # one additive mask (B, 1, L, L) for all layers and heads
            same = seg[:, :, None] == seg[:, None, :]  # padding with padding: no row is fully masked
            near = (block[:, None, :] - block[:, :, None]).abs() <= 1
            allowed = same & (~sparse[:, :, None] | near | edge[:, None, :])
            counted = sparse[:, :, None] & (block[:, None, :] == 0)
            bias = counted.to(q.dtype) * self.block0_bias
            masks["bigbird_dense"] = bias.masked_fill(~allowed, torch.finfo(q.dtype).min)[:, None]
        # SDPA with a float mask: CPUs' fused kernel, faster than the explicit softmax(QK^T + mask)V on torch
        # and on onnxruntime alike (figures: README, "BigBird at inference").
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=masks["bigbird_dense"], scale=scale)
        return ctx.transpose(1, 2).reshape(bsz, length, dim)


def _flex_bigbird_mask(seg: torch.Tensor, block: torch.Tensor, edge: torch.Tensor, sparse: torch.Tensor):
    """FlexAttention's block mask of BlockSparseSelfAttention (same sequence; sparse queries see the blocks
    around them and the first and last blocks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def bigbird(b, h, q_idx, kv_idx):
        near = (block[b, kv_idx] - block[b, q_idx]).abs() <= 1
        return (seg[b, q_idx] == seg[b, kv_idx]) & (~sparse[b, q_idx] | near | edge[b, kv_idx])

    bsz, length = seg.shape
    return create_block_mask(bigbird, bsz, None, length, length, device=seg.device)


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
    # One compiled kernel per row length (a power of two, see runtime._TorchModel.row_width), precision and
    # form (with or without the log-sum-exp): more than torch._dynamo's default of 8, past which it falls back
    # to dense attention silently (seen on the H200 run of 2026-11-29).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
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
    def __init__(self, cfg: EncoderConfig, window: int, kernel: str, with_global: bool = True):
        super().__init__()
        attention = (
            BlockSparseSelfAttention(cfg, kernel)
            if cfg.model_type == "big_bird"
            else SlidingWindowSelfAttention(cfg, window, kernel, with_global)
        )
        setattr(self, "self", attention)
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
    def __init__(self, cfg: EncoderConfig, window: int, kernel: str = "blocks", with_global: bool = True):
        super().__init__()
        self.attention = _Attention(cfg, window, kernel, with_global)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, segments: Segments, masks: dict) -> torch.Tensor:
        attn = self.attention(hidden, segments, masks)
        return self.output(self.intermediate(attn), attn)


class _Stack(nn.Module):
    def __init__(self, cfg: EncoderConfig, kernel: str = "blocks", with_global: bool = True):
        super().__init__()
        windows = cfg.attention_window or (0,) * cfg.num_hidden_layers  # BigBird layers have no window
        self.layer = nn.ModuleList(Layer(cfg, w, kernel, with_global) for w in windows)


class PackedEncoder(nn.Module):
    """`last_hidden_state` of Hugging Face `LongformerModel` (with or without a global attention mask) or
    `BigBirdModel` (eval mode), for rows that pack several sequences end to end.

    Inputs: `input_ids` (B, L) and `position_ids` (B, L), the RoBERTa-style positions of each packed
    sequence (padding_idx + 1, + 2, ... from its first token; padding_idx on padding; core.packing builds
    them for every family); optionally (Longformer) `global_positions` (B, G), the row indices of the
    global tokens, -1 in unused slots. Each sequence's vectors equal those of the sequence run alone:
    positions restart, attention never crosses a sequence.

    `with_global`: Longformer's layers hold the `*_global` projections (artifacts exported before they
    were kept lack them; such a model runs local attention only)."""

    def __init__(self, cfg: EncoderConfig, kernel: str = "blocks", with_global: bool = True):
        super().__init__()
        check_choice("model type", cfg.model_type, MODEL_TYPES)
        if cfg.model_type == "longformer" and len(cfg.attention_window) != cfg.num_hidden_layers:
            raise ValueError(f"{len(cfg.attention_window)} attention windows for {cfg.num_hidden_layers} layers")
        self.config = cfg
        self.kernel = kernel
        self.with_global = with_global and cfg.model_type == "longformer"
        self.embeddings = Embeddings(cfg)
        self.encoder = _Stack(cfg, kernel, self.with_global)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, global_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        length = input_ids.shape[1]
        pad_id = self.config.pad_token_id
        multiple = self.config.pad_multiple
        if self.kernel == "blocks" and multiple > 1:  # whole blocks per row: padding at the row's end only
            pad = (multiple - length % multiple) % multiple
            input_ids = F.pad(input_ids, (0, pad), value=pad_id)
            position_ids = F.pad(position_ids, (0, pad), value=pad_id)
        segments = segments_of(position_ids, pad_id, with_starts=self.kernel == "varlen")
        if global_positions is not None:
            if self.config.model_type != "longformer":
                raise ValueError(f"global attention is Longformer's; {self.config.model_type} has none")
            segments = with_globals(segments, global_positions)
        hidden = self.embeddings(input_ids, position_ids)
        masks: dict = {}
        for layer in self.encoder.layer:
            hidden = layer(hidden, segments, masks)
        return hidden[:, :length]

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face state dict (the bare model's or a *ForMaskedLM's, see `encoder_state`);
        poolers and LM heads are not part of the encoder (Longformer's global projections are)."""
        state = encoder_state(state)
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} encoder weights, e.g. {missing[:3]}")
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"weight {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
        self.load_state_dict({k: state[k] for k in own}, strict=True)


# *ForMaskedLM's prefix of the bare model's weights: LongformerForMaskedLM, BigBirdForMaskedLM.
HF_PREFIXES = ("longformer.", "bert.")


def encoder_state(state: dict) -> dict:
    """The bare model's state dict from a *ForMaskedLM one (its prefixed weights, unprefixed); a state dict
    without a known prefix is returned as it is."""
    for prefix in HF_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state
