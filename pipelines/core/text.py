"""Clinical sentence detection and word tokenization on character offsets (`end` inclusive).

Rules tuned for clinical notes: titles and abbreviations ("Dr.", "pt.", "vs.") never end sentences,
dosing abbreviations ("q.d.", "b.i.d.") only before a capitalized word, decimals never; de-identification
brackets ("[**2101-3-4**]") are never split; numbered and bulleted list items and section headers on their
own line ("HISTORY OF PRESENT ILLNESS:") start new sentences; blank lines separate paragraphs; a line
wrapped mid-sentence is joined.

Words are whole in any Unicode form: combining marks (general category M: Mn, Mc, Me), the zero-width
joiner and non-joiner (U+200D, U+200C) and variation selectors (U+FE00-FE0F, U+E0100-E01EF) continue
the word or symbol they follow, in every script (Unicode's UAX #29 rule WB4: "ignore Extend and Format
characters" inside a word), so a text and its NFC or NFD form give the same words, each at its offsets
in the text as given.
"""

from __future__ import annotations

import bisect
import re
import unicodedata

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


def _extend_class() -> str:
    """A regex class body of the characters that continue a word (see the module docstring): every code
    point of general category M in Python's Unicode database (planes 0-2 and 14, where all are), ZWNJ,
    ZWJ and the variation selectors."""
    ranges, start = [], None
    for cp in [*range(0x30000), *range(0xE0000, 0xE1000), 0x10FFFF]:
        mark = cp != 0x10FFFF and unicodedata.category(chr(cp))[0] == "M"
        if mark and start is None:
            start = cp
        elif not mark and start is not None:
            ranges.append((start, cp - 1))
            start = None
    ranges += [(0x200C, 0x200D), (0xFE00, 0xFE0F), (0xE0100, 0xE01EF)]
    return "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges)


EXTEND = f"[{_extend_class()}]"  # continues the word or symbol before it
_WORD = rf"\w(?:\w|{EXTEND})*"
_TOKEN = re.compile(
    _DEID  # de-identification brackets, whole
    + r"|(?:[A-Za-z]{1,3}\.){2,}"  # dotted abbreviations: q.d., b.i.d., e.g.
    + r"|(?:Dr|Mr|Mrs|Ms|Pt|pt|vs|Vs|No|St)\.(?=\s|$)"  # titles and common abbreviations
    + rf"|{_WORD}(?:[-/'.:,]{_WORD})*"  # words and numbers: 36.5, 120/80, s/p, 2101-3-4, 1,000, l'hôpital
    + rf"|[^\w\s](?:\u200d[^\w\s]|{EXTEND})*"  # any other symbol alone, with its marks (ZWJ emoji whole)
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
        starts_new = not prev_open or _LIST_ITEM.match(line) or _HEADER.match(line) or not line.lstrip()[:1].islower()
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


# Unicode's simple lowercase mappings (UnicodeData.txt field 13) where Python's full lowercase differs:
# U+0130 'İ' lowercases to 'i' + U+0307 in full (SpecialCasing.txt), to 'i' in the simple mapping; capital
# sigma lowercases to 'σ' everywhere (the simple mapping) instead of to 'ς' at a word's end (SpecialCasing's
# context-dependent Final_Sigma rule, which Python's str.lower applies).
_SIMPLE_LOWER = {"\u0130": "i", "\u03a3": "\u03c3"}


def lowercase_keep_offsets(text: str) -> str:
    """The text each character lowercased alone by Unicode's simple lowercase mapping (UnicodeData.txt,
    one character to one): context-free (a character lowercases the same way wherever it stands: 'Σ' is
    always 'σ', 'İ' always 'i') and of the same length, so every offset stays valid for the original.
    This is the README's definition of `--case-insensitive` / `case_sensitive=False`; the tokenizer's
    own normalizer runs after it."""
    if any(c in text for c in _SIMPLE_LOWER):
        for c, low in _SIMPLE_LOWER.items():
            text = text.replace(c, low)
    low = text.lower()
    if len(low) == len(text):
        return low
    # (no other character lowercases to more than one in Python's Unicode database; kept as a guard)
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
