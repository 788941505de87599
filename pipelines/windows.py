"""Overlapping windows for sequences longer than the model's max length, and how they are stitched.

A note of n content pieces (BPE pieces without <s>/</s>) that does not fit in `max_length` is cut
into windows of `max_length - 2` content pieces, each framed by <s> ... </s> and run alone. Windows
start every `max_length - 2 - overlap` pieces; the last one ends at the note's end. Every piece takes
its vector from the window in which it sits farthest from a window edge (ties: the earlier window),
so with the default overlap of 512 each stitched piece has at least 256 pieces of context on both
sides wherever the note itself has them.
"""
from __future__ import annotations

import numpy as np

DEFAULT_OVERLAP = 512


def window_starts(n: int, max_length: int, overlap: int = DEFAULT_OVERLAP) -> list[int]:
    """Start offsets (into the content pieces) of the windows covering n pieces."""
    width = max_length - 2
    if width < 1:
        raise ValueError(f"max_length {max_length} leaves no room for content between <s> and </s>")
    if n <= width:
        return [0]
    if not 0 <= overlap < width:
        raise ValueError(f"window overlap {overlap} must be in [0, {width})")
    stride = width - overlap
    starts = list(range(0, n - width, stride))
    starts.append(n - width)
    return starts


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
