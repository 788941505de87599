"""Sentence detection and tokenization rules for clinical text; windows for long notes."""

from __future__ import annotations

import numpy as np
import pytest

from clinlong.pipelines.core.text import detect_sentences, lowercase_keep_offsets, tokenize
from clinlong.pipelines.core.windows import assign_pieces, window_plan, window_starts

NOTE = """HISTORY OF PRESENT ILLNESS:
Pt. is a 67 y/o M seen by Dr. [**Last Name (STitle) 1234**] on [**2101-3-4**]. He takes ASA q.d. and 2.5 mg IV. \
Repeat labs
were stable.
MEDICATIONS ON ADMISSION:
1. Aspirin 81 mg PO daily
2. Lisinopril 10 mg PO q.d.

IMPRESSION: No acute process. Small effusion."""


def sentences(text):
    return [text[b : e + 1] for b, e in detect_sentences(text)]


def test_clinical_sentence_rules():
    assert sentences(NOTE) == [
        "HISTORY OF PRESENT ILLNESS:",
        "Pt. is a 67 y/o M seen by Dr. [**Last Name (STitle) 1234**] on [**2101-3-4**].",
        "He takes ASA q.d. and 2.5 mg IV.",
        "Repeat labs\nwere stable.",
        "MEDICATIONS ON ADMISSION:",
        "1. Aspirin 81 mg PO daily",
        "2. Lisinopril 10 mg PO q.d.",
        "IMPRESSION: No acute process.",
        "Small effusion.",
    ]


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_blank_text_has_no_sentences(text):
    assert detect_sentences(text) == []


def test_deid_brackets_never_split():
    text = "Seen on [**2101-3-4**]. Called [**Telephone/Fax (1) 123**]. Done."
    assert sentences(text) == ["Seen on [**2101-3-4**].", "Called [**Telephone/Fax (1) 123**].", "Done."]


def test_tokens_keep_abbreviations_deid_and_numbers():
    text = "Pt. takes ASA q.d., BP 120/80, T 36.5 s/p CABG on [**2101-3-4**]."
    toks = [text[b : e + 1] for b, e, _ in tokenize(text, detect_sentences(text))]
    assert toks == [
        "Pt.",
        "takes",
        "ASA",
        "q.d.",
        ",",
        "BP",
        "120/80",
        ",",
        "T",
        "36.5",
        "s/p",
        "CABG",
        "on",
        "[**2101-3-4**]",
        ".",
    ]


def test_offsets_are_inclusive_and_point_into_the_text():
    for b, e, s in tokenize(NOTE, detect_sentences(NOTE)):
        assert NOTE[b : e + 1].strip() == NOTE[b : e + 1] and e >= b
    spans = detect_sentences(NOTE)
    assert all(spans[i][1] < spans[i + 1][0] for i in range(len(spans) - 1))


def test_lowercase_keeps_offsets():
    text = "İstanbul MRI ÅB"
    low = lowercase_keep_offsets(text)
    assert len(low) == len(text) and low.endswith("mri åb")


@pytest.mark.parametrize("n", [4095, 4200, 10_000, 100_000])
def test_windows_cover_every_piece_far_from_edges(n):
    max_len, overlap = 4096, 512
    starts, width = window_plan(n, max_len, overlap)
    assert width <= max_len - 2 and starts[0] == 0 and starts[-1] + width == n
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g == width - overlap for g in gaps[:-1])  # equal windows, `overlap` shared ...
    assert all(0 < g <= width - overlap for g in gaps)  # ... and at least that much with the last one
    assert len(starts) == -(-(n - overlap) // (max_len - 2 - overlap))  # the fewest windows
    assert len(starts) * width < n + len(starts) * overlap + len(starts)  # ~ n + (k - 1) overlap computed
    w, pos = assign_pieces(n, starts, width)
    assert ((pos >= 0) & (pos < width)).all()
    # Away from the note's ends, every piece sits at least overlap/2 from its window's edges.
    margin = np.minimum(pos, width - 1 - pos)
    interior = (np.arange(n) >= overlap) & (np.arange(n) < n - overlap)
    assert margin[interior].min() >= overlap // 2 - 1
    assert window_starts(4094, max_len, overlap) == [0]
