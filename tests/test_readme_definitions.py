"""The README's definitions, each checked against a reference computed from the README's words alone
(Embedding note tables → Definitions): windows, which window a piece takes its vector from, offsets."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_windows(n: int, max_length: int, overlap: int) -> tuple[list[int], int]:
    """k = ceil((n - overlap) / (W - overlap)) windows of L = ceil((n + (k - 1) overlap) / k) pieces, window
    i at i (L - overlap) for i < k - 1, the last at n - L; W = max_length - 2."""
    width = max_length - 2
    if n <= width:
        return [0], n
    k = math.ceil((n - overlap) / (width - overlap))
    length = math.ceil((n + (k - 1) * overlap) / k)
    return [i * (length - overlap) for i in range(k - 1)] + [n - length], length


def readme_window_of(p: int, starts: list[int], length: int) -> int:
    """The window where p sits farthest from an edge (min of pieces before and after it); ties: the earlier."""
    margins = [min(p - s, s + length - 1 - p) if s <= p < s + length else -1 for s in starts]
    return margins.index(max(margins))


def test_readme_states_the_fewest_equal_windows_rule():
    assert "fewest overlapping windows of equal length" in README
    assert re.search(r"4,095-piece note .* 2 windows of 2,304", README.replace("\n", " "))


@pytest.mark.parametrize("n,k,length", [(4095, 2, 2304), (9000, 3, 3342), (4094, 1, 4094), (20000, 6, 3760)])
def test_window_plan_is_the_readmes(n, k, length):
    from clinlong.pipelines.core.windows import assign_pieces, window_plan

    starts, got_length = window_plan(n, 4096, 512)
    assert (starts, got_length) == readme_windows(n, 4096, 512) and len(starts) == k and got_length == length
    w, pos = assign_pieces(n, starts, got_length)
    want = [readme_window_of(p, starts, got_length) for p in range(n)]
    assert w.tolist() == want and (pos == np.arange(n) - np.asarray(starts)[w]).all()


def test_long_note_piece_and_token_vectors_follow_the_readme(tiny_artifact, tiny_checkpoint):
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder
    from tests.conftest import hf_reference

    art = Artifact.open(tiny_artifact)
    text = " ".join(f"Pt{i % 89} is stable, BP {100 + i % 50}/80." for i in range(600))
    enc = art.tokenizer.encode(text, add_special_tokens=False)
    n = len(enc.ids)
    assert n > 4094
    res = NoteEmbedder(art, EmbedOptions(precision="fp32")).embed([text])[0]
    starts, length = readme_windows(n, 4096, 512)
    bos, eos = art.sequence_frame
    runs = [hf_reference(tiny_checkpoint, [bos, *enc.ids[s : s + length], eos]) for s in starts]
    want = np.stack(
        [
            runs[readme_window_of(p, starts, length)][p - starts[readme_window_of(p, starts, length)] + 1]
            for p in range(n)
        ]
    )
    np.testing.assert_allclose(res.piece_vectors, want, atol=1e-4)
    # Token vector: the first piece containing the token's first character (the tokenizer's own offsets).
    offsets = enc.offsets
    for (b, e, _), v in zip(res.tokens, res.token_vectors()):
        first = next(i for i, (a, z) in enumerate(offsets) if a <= b < z)
        np.testing.assert_allclose(v, want[first], atol=1e-4)
        assert text[b : e + 1].strip() == text[b : e + 1]
    # Sentence vector: mean of the pieces whose first character is inside the sentence.
    for (b, e), v in zip(res.sentences, res.sentence_vectors()):
        inside = [i for i, (a, _) in enumerate(offsets) if b <= a <= e]
        np.testing.assert_allclose(v, want[inside].mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(res.note_vector(), want.mean(axis=0), atol=1e-4)


def test_error_reasons_are_the_readmes(tiny_artifact):
    from clinlong.pipelines import load

    table = README[README.index("**Bad input** has one defined outcome") :]
    for reason in (
        "null text",
        "empty text",
        "whitespace-only text",
        "text contains NUL bytes",
        "no BPE pieces",
        "token has no BPE piece",
        "sentence has no BPE piece",
    ):
        assert f"`{reason}`" in table, reason
    out = load(str(tiny_artifact)).predict(["ok.", "", None, "  ", "a\x00b"], output_level="document")
    assert out.skip_reason.tolist() == [
        None,
        "empty text",
        "null text",
        "whitespace-only text",
        "text contains NUL bytes",
    ]
