"""Overlapping windows for sequences longer than the model's max length, and how they are stitched.

A note of n content pieces (BPE pieces without <s>/</s>) that does not fit in `max_length` is cut
into the fewest windows of at most `max_length - 2` content pieces that overlap by `overlap`
pieces: k = ceil((n - overlap) / (width - overlap)) windows of equal length
w = ceil((n + (k - 1) * overlap) / k), starting every w - overlap pieces, the last one ending at the
note's end. Each is framed by <s> ... </s> and run alone, so the model computes about
n + (k - 1) * overlap tokens (not k full windows). Every piece takes its vector from the window in
which it sits farthest from a window edge (ties: the earlier window), so with the default overlap of
512 each stitched piece has at least 256 pieces of context on both sides wherever the note has them.
"""

from __future__ import annotations

import numpy as np

DEFAULT_OVERLAP = 512


def default_overlap(max_length: int) -> int:
    """The window overlap when none is set: 512 pieces, or a quarter of a window's content pieces
    ((max_length - 2) // 4) when that is smaller, so that it follows the max length (max_length 512: 127;
    128: 31; 3, the smallest: 0)."""
    return max(0, min(DEFAULT_OVERLAP, (max_length - 2) // 4))


def window_plan(n: int, max_length: int, overlap: int = DEFAULT_OVERLAP) -> tuple[list[int], int]:
    """Start offsets (into the content pieces) and the common length of the windows covering n pieces."""
    width = max_length - 2
    if width < 1:
        raise ValueError(f"max_length {max_length} leaves no room for content between <s> and </s>")
    if n <= width:
        return [0], n
    if not 0 <= overlap < width:
        raise ValueError(
            f"window overlap {overlap} must be in [0, {width}) for max length {max_length} "
            "(window_overlap, --window-overlap)"
        )
    k = -(-(n - overlap) // (width - overlap))
    length = -(-(n + (k - 1) * overlap) // k)
    stride = length - overlap
    return [i * stride for i in range(k - 1)] + [n - length], length


def window_starts(n: int, max_length: int, overlap: int = DEFAULT_OVERLAP) -> list[int]:
    """Start offsets of the windows covering n pieces (see window_plan)."""
    return window_plan(n, max_length, overlap)[0]


def assign_pieces(n: int, starts: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """For each content piece: the window it takes its vector from, and its position in that window."""
    pos = np.arange(n)
    best_w = np.zeros(n, dtype=np.int64)
    best_margin = np.full(n, -1, dtype=np.int64)
    for w, s in enumerate(starts):
        inside = (pos >= s) & (pos < s + width)
        margin = np.minimum(pos - s, s + width - 1 - pos)
        better = inside & (margin > best_margin)
        best_w[better] = w
        best_margin[better] = margin[better]
    return best_w, pos - np.asarray(starts)[best_w]
