"""Packing sequences end to end into rows: the model input of every backend.

A row holds several sequences (notes, windows or sentences) one after another; each carries its own
RoBERTa positions, restarting at `padding_idx + 1`, and the encoder keeps attention inside each
sequence (core.model.segments_of reads the sequences back from the positions). So a 20-token ECG costs
20 tokens, not a 256-token block, and every vector equals that of its sequence run alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# How the encoder keeps attention inside each packed sequence (core.model.SlidingWindowSelfAttention):
# blocks (explicit, the ONNX graph's form), flex (FlexAttention block mask), varlen (flash attention, CUDA).
# BigBird's block-sparse attention has no varlen form. KERNEL_CHOICES: what --attention-kernel accepts.
KERNELS = ("blocks", "flex", "varlen")
BIG_BIRD_KERNELS = tuple(k for k in KERNELS if k != "varlen")
KERNEL_CHOICES = ("auto", *KERNELS)


def pack(lengths: Sequence[int], capacity: int, max_sequences: int | None = None) -> list[list[int]]:
    """Indices of sequences grouped into rows of at most `capacity` tokens and `max_sequences` sequences,
    first-fit decreasing (longest first; each goes into the first row with room). A sequence longer
    than `capacity` gets a row of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    limit = max_sequences or len(lengths) or 1
    open_rows: list[int] = []  # rows that still have room and fewer than `limit` sequences
    for i in order:
        n = lengths[i]
        for k, r in enumerate(open_rows):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                if len(rows[r]) >= limit or room[r] == 0:
                    open_rows.pop(k)
                break
        else:
            rows.append([i])
            room.append(max(capacity - n, 0))
            if limit > 1 and room[-1] > 0:
                open_rows.append(len(rows) - 1)
        if len(open_rows) > 64:  # the fullest rows rarely take more; keep first-fit linear in practice
            open_rows.pop(0)
    return rows


def positions(lengths: Sequence[int], padding_idx: int) -> np.ndarray:
    """RoBERTa position ids of sequences packed end to end: padding_idx + 1, + 2, ... for each."""
    total = int(sum(lengths))
    starts = np.repeat(np.cumsum(lengths) - np.asarray(lengths, np.int64), lengths)
    return np.arange(total, dtype=np.int64) - starts + padding_idx + 1


def packed_rows(
    sequences: Sequence[np.ndarray], rows: list[list[int]], pad_id: int, padding_idx: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    """Model inputs for `rows` of `sequences`: input_ids and position_ids (len(rows), width), padded with
    pad_id / padding_idx, and for each row the (start, length) of each of its sequences."""
    lengths = [[len(sequences[i]) for i in row] for row in rows]
    width = max(width or 0, max((sum(n) for n in lengths), default=0))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    pos = np.full((len(rows), width), padding_idx, dtype=np.int64)
    spans: list[list[tuple[int, int]]] = []
    for r, (row, ns) in enumerate(zip(rows, lengths)):
        used = sum(ns)
        if used:
            ids[r, :used] = np.concatenate([sequences[i] for i in row])
            pos[r, :used] = positions(ns, padding_idx)
        starts = np.cumsum(ns) - np.asarray(ns, np.int64)
        spans.append(list(zip(starts.tolist(), ns)))
    return ids, pos, spans
