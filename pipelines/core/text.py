"""Clinical sentence detection and word tokenization on character offsets (`end` inclusive).

Rules tuned for clinical notes: titles and abbreviations ("Dr.", "pt.", "vs.") never end sentences,
dosing abbreviations ("q.d.", "b.i.d.") only before a capitalized word, decimals never; de-identification brackets ("[**2101-3-4**]") are never split; numbered and
bulleted list items and section headers on their own line ("HISTORY OF PRESENT ILLNESS:") start new
sentences; blank lines separate paragraphs; a line wrapped mid-sentence is joined.
"""
from __future__ import annotations

import bisect
import re

Span = tuple[int, int]  # begin, end (inclusive), Spark NLP's convention

# Abbreviations after which a period never ends a sentence (titles and the like). Other abbreviations
# ("q.d.", "mg", "IV") end a sentence when the next word is capitalized, as in "... 2.5 mg IV. Repeat".
TITLES = frozenset("dr mr mrs ms prof st pt pts vs no approx e.g i.e cf fig ref dept".split())

_DEID = r"\[\*\*.*?\*\*\]"
# A sentence may end at . ! ? (optionally followed by closing quotes/brackets) before whitespace.
_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
_LIST_ITEM = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*\u2022#])\s+")
_HEADER = re.compile(r"^\s*[A-Z][A-Za-z /&()'-]{1,60}:\s*$")
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")

_TOKEN = re.compile(
    _DEID                                   # de-identification brackets, whole
    + r"|(?:[A-Za-z]{1,3}\.){2,}"           # dotted abbreviations: q.d., b.i.d., e.g.
    + r"|(?:Dr|Mr|Mrs|Ms|Pt|pt|vs|Vs|No|St)\.(?=\s|$)"  # titles and common abbreviations
    + r"|\w+(?:[-/'.:,]\w+)*"               # words and numbers: 36.5, 120/80, s/p, 2101-3-4, 1,000
    + r"|[^\w\s]"                           # any other symbol alone
)


def _is_abbreviation(text: str, dot: int) -> bool:
    m = _WORD_BEFORE.search(text, max(0, dot - 64), dot)
    if not m:
        return False
    word = m.group(1).lower().rstrip(".")
    return word in TITLES or len(word) == 1


_NEXT_CHAR = re.compile(r"\s*(\S)")


def _protected(text: str) -> list[Span]:
    return [(m.start(), m.end()) for m in re.finditer(_DEID, text)]


def _inside(protected: list[Span], pos: int) -> bool:
    i = bisect.bisect_right(protected, (pos, float("inf"))) - 1
    return i >= 0 and protected[i][0] <= pos < protected[i][1]


def _split_line(text: str, begin: int, end: int, protected: list[Span]) -> list[Span]:
    """Split the characters text[begin:end] at sentence-final punctuation."""
    out, start = [], begin
    for m in _END.finditer(text, begin, end):
        cut = m.end()
        if _inside(protected, m.start()):
            continue
        if text[m.start()] == "." and m.end() - m.start() == 1 and _is_abbreviation(text, m.start()):
            continue
        if start == begin and _LIST_ITEM.fullmatch(text[begin:cut] + " "):
            continue  # the "1." of a numbered list item
        nxt = _NEXT_CHAR.match(text, cut, end)
        if nxt and nxt.group(1).islower():
            continue  # "... 5 mg p.o. daily" style continuation
        out.append((start, cut))
        start = cut
    out.append((start, end))
    return out


def detect_sentences(text: str) -> list[Span]:
    """Sentence spans of `text`, whitespace trimmed; empty for blank text."""
    protected = _protected(text)
    # 1) lines, 2) merge wrapped lines into blocks, 3) split blocks at sentence-final punctuation.
    blocks: list[list[int]] = []
    prev_open, prev_end = False, 0  # whether the previous line may continue on this one
    for m in re.finditer(r"[^\n]+", text):
        b, e = m.start(), m.end()
        line = text[b:e]
        if not line.strip() or text.count("\n", prev_end, b) > 1:  # a blank line closes the paragraph
            prev_open = False
        prev_end = e
        if not line.strip():
            continue
        starts_new = (not prev_open or _LIST_ITEM.match(line) or _HEADER.match(line)
                      or not line.lstrip()[:1].islower())
        if starts_new or not blocks:
            blocks.append([b, e])
        else:
            blocks[-1][1] = e
        stripped = line.rstrip()
        prev_open = not (_HEADER.match(line) or stripped.endswith((".", ":", "!", "?", ";")))
    spans: list[Span] = []
    for b, e in blocks:
        for s, t in _split_line(text, b, e, protected):
            seg = text[s:t]
            if seg.strip():
                lead = len(seg) - len(seg.lstrip())
                trail = len(seg) - len(seg.rstrip())
                spans.append((s + lead, t - trail - 1))
    return spans


def tokenize(text: str, sentences: list[Span]) -> list[tuple[int, int, int]]:
    """Word tokens as (begin, end inclusive, sentence index), in text order."""
    out = []
    for i, (b, e) in enumerate(sentences):
        for m in _TOKEN.finditer(text, b, e + 1):
            out.append((m.start(), m.end() - 1, i))
    return out


def lowercase_keep_offsets(text: str) -> str:
    """Lowercase without changing any character's position (offsets stay valid for the original)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
