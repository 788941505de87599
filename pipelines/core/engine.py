"""From note texts to piece, token, sentence and note vectors: the computation every front-end shares
(the Spark job, the Spark ML stages and the in-process `predict`).

Definitions (the README's "Definitions"): in note context the whole note is BPE-encoded once, as the checkpoint's
tokenizer does (<s> ... </s>), and run as one sequence (windows past the max length, see windows.py);
in sentence context each sentence is encoded and run alone. A token's vector is that of its first
BPE piece (or the mean of its pieces); sentence and note vectors are the mean of the pieces inside the
span (a piece is inside when its first character is), special tokens and padding excluded.

No vector is ever invented: a character the tokenizer's normalizer drops (SentencePiece's Nmt: C0 controls
but tab, LF, FF, CR; DEL, U+008F, U+009F) or turns into a space (tab, LF, FF, CR, U+0085, U+00A0, U+1680,
U+2000-U+200F (ZWSP, ZWNJ, ZWJ, LRM, RLM included), U+2028, U+2029, U+202F, U+205F, U+2581, U+3000, U+FEFF,
U+FFFD) is covered by no piece. The covered characters are asked of the artifact's own normalizer, one
distinct character at a time, so any family's rules apply. A token or sentence that no piece covers has
no vector (NaN rows in the arrays below, null in every output, counted under the reasons TOKEN_NO_PIECE
and SENTENCE_NO_PIECE); a note with no piece is not embedded (NOTE_NO_PIECE).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.devices import DEVICES
from clinlong.pipelines.core.options import GLOBAL_ATTENTION, check_choice, check_types, option
from clinlong.pipelines.core.packing import KERNEL_CHOICES
from clinlong.pipelines.core.runtime import (
    BACKENDS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_TOKEN_BUDGET,
    PRECISIONS,
    Encoder,
    check_global_attention,
    resolve_backend,
    resolve_kernel,
    resolve_precision,
)
from clinlong.pipelines.core.text import Span, detect_sentences, lowercase_keep_offsets, tokenize
from clinlong.pipelines.core.windows import assign_pieces, default_overlap, window_plan

T, P, R = TypeVar("T"), TypeVar("P"), TypeVar("R")
CONTEXTS = ("note", "sentence")
MAX_LENGTH = 4096  # Clinical-Longformer's positions; the default max length everywhere
TOKEN_VECTORS = ("first", "mean")
NOTE_NO_PIECE = "no BPE pieces"  # a note no piece covers a character of (errors table, stage check)
TOKEN_NO_PIECE = "token has no BPE piece"  # null vector: every character of the token is dropped by the tokenizer
SENTENCE_NO_PIECE = "sentence has no BPE piece"  # null vector: no piece starts inside the sentence


@dataclass(frozen=True)
class EmbedOptions:
    """How notes are embedded; each field is also the job's command-line option of the same name."""

    context: str = option(
        "note",
        "note: the whole note is one sequence (windows past the max length); "
        "sentence: each sentence alone (Spark NLP's behaviour)",
        choices=CONTEXTS,
    )
    max_length: int = option(MAX_LENGTH, "BPE pieces per sequence, <s> and </s> included (at most the model's)")
    case_sensitive: bool = option(
        True, "lowercase text before BPE (offsets stay in the original text)", flag="--case-insensitive", negate=True
    )
    window_overlap: int | None = option(
        None,
        "pieces shared by consecutive windows of long notes (default: 512, or (max length - 2) // 4 when smaller)",
        type=int,
    )
    token_vector: str = option(
        "first", "token vector: its first BPE piece (Spark NLP) or the mean of its pieces", choices=TOKEN_VECTORS
    )
    token_budget: int = option(
        DEFAULT_TOKEN_BUDGET,
        "max tokens per packed row (one model call); at the default, GPUs size it from their free memory",
    )
    batch_size: int = option(DEFAULT_BATCH_SIZE, "max sequences per model call")
    precision: str = option(
        "auto",
        "compute precision. auto: bf16 on GPUs and on CPUs where it is faster "
        "(AMX; AMD's AVX512-BF16), else fp32; fp32 is the export's parity",
        choices=PRECISIONS,
    )
    backend: str = option(
        "auto",
        "auto: torch (its CPU threads follow the executor's idle cores); onnxruntime: the exported ONNX graph, fp32",
        choices=BACKENDS,
    )
    attention_kernel: str = option(
        "auto",
        "sliding-window attention over packed sequences. auto: varlen (flash "
        "attention; flex at fp32) on GPUs, blocks (the ONNX graph's form) on CPUs; "
        "flex: FlexAttention",
        choices=KERNEL_CHOICES,
    )
    global_attention: str = option(
        "none",
        "Longformer's global attention. none: local attention only, as "
        "LongformerModel without a global_attention_mask; cls: global attention on the "
        "<s> of every sequence (note, window or sentence); onnxruntime needs an artifact "
        "exported with --global-attention",
        choices=GLOBAL_ATTENTION,
    )
    device: str = option(
        "auto", "auto: the GPU Spark assigned the task when CUDA is usable, else the CPU", choices=DEVICES
    )
    max_chars: int = option(
        1_000_000, "longer texts go to the errors table (a 10 MB 'note' is a misfiled blob)", flag="--max-note-chars"
    )

    def __post_init__(self):
        """An unset overlap follows the max length (windows.default_overlap). The resolved value is stored,
        so `dataclasses.replace(options, max_length=...)` keeps it: pass window_overlap=None to re-derive."""
        check_types(self)  # ValueError naming the option: a wrongly typed value never reaches the model
        if self.window_overlap is None:
            object.__setattr__(self, "window_overlap", default_overlap(self.max_length))

    def validate(self, artifact: Artifact) -> "EmbedOptions":
        check_choice("context", self.context, CONTEXTS)
        check_choice("token vector", self.token_vector, TOKEN_VECTORS)
        if not 3 <= self.max_length <= artifact.max_length:
            raise ValueError(
                f"max length must be between 3 and the model's {artifact.max_length} "
                f"(max_length, --max-length), got {self.max_length}"
            )
        resolve_backend(self.backend, self.precision)
        check_choice("attention kernel", self.attention_kernel, KERNEL_CHOICES)
        if self.global_attention != "none":
            check_global_attention(artifact, self.backend, self.precision)
        if not 0 <= self.window_overlap < self.max_length - 2:
            raise ValueError(
                f"window overlap must be in [0, {self.max_length - 2}) for max length {self.max_length} "
                f"(window_overlap, --window-overlap; unset, it is {default_overlap(self.max_length)}), "
                f"got {self.window_overlap}"
            )
        return self


def text_sha256(text: str) -> str:
    """The hex sha256 of a note's UTF-8 text (lone surrogates kept), as written to `text_sha256`."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def skip_reason(text, max_chars: int = EmbedOptions.max_chars) -> str | None:
    """Why a text cannot be embedded, or None. Reasons never include the text."""
    if text is None:
        return "null text"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string"
    if not text:
        return "empty text"
    if not text.strip():
        return "whitespace-only text"
    if "\x00" in text:
        return "text contains NUL bytes"
    if len(text) > max_chars:
        return f"text longer than {max_chars} characters (--max-note-chars)"
    return None


SUM_BLOCK = 256  # piece vectors summed in float32 before float64 accumulation (span means)


def _block_sums(v: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Sums of v[starts[k]:stops[k]] for non-overlapping, ordered, non-empty ranges, by one reduceat:
    segment 2k of the interleaved bounds is [start_k, stop_k); the others are discarded."""
    bounds = np.stack([starts, stops], axis=1).ravel()
    if bounds[-1] == len(v):  # the last segment runs to the end; an index must be < len(v)
        bounds = bounds[:-1]
    return np.add.reduceat(v, bounds, axis=0)[0::2]


@dataclass
class NoteResult:
    """Everything one note yields; vectors are float32. Sentences and tokens (the text rules) are found
    when first asked for: the note granularity in note context never needs them."""

    skip_reason: str | None
    text_sha256: str | None
    piece_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    piece_ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    piece_vectors: np.ndarray | None = None
    n_windows: int = 0
    text: str | None = field(default=None, repr=False)  # never printed: notes carry PHI
    # For each character, the first character at or after it that some piece covers (len(text) where none
    # does); None where every character that is not whitespace is covered (byte-level BPE).
    next_covered: np.ndarray | None = field(default=None, repr=False)
    _sentences: list[Span] | None = field(default=None, repr=False)
    _tokens: list[tuple[int, int, int]] | None = field(default=None, repr=False)

    @property
    def sentences(self) -> list[Span]:
        if self._sentences is None:
            self._sentences = detect_sentences(self.text) if self.text else []
        return self._sentences

    @sentences.setter
    def sentences(self, value: list[Span]) -> None:
        self._sentences = value

    @property
    def tokens(self) -> list[tuple[int, int, int]]:
        if self._tokens is None:
            self._tokens = tokenize(self.text, self.sentences) if self.text else []
        return self._tokens

    @tokens.setter
    def tokens(self, value: list[tuple[int, int, int]]) -> None:
        self._tokens = value

    @classmethod
    def unusable(cls, reason: str, text) -> "NoteResult":
        """The result of a text that is not embedded: its reason and, for a string, its hash."""
        return cls(reason, text_sha256(text) if isinstance(text, str) else None)

    @property
    def n_tokens(self) -> int:
        """BPE pieces of the text (special tokens excluded)."""
        return len(self.piece_starts)

    def _span_means(self, begins: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean piece vector of each character span, and its piece count. Each span is summed in pieces
        of at most SUM_BLOCK vectors (float32, `np.add.reduceat`, no copy), whose sums are added in
        float64: the extra memory is a few rows per span, not a float64 copy of every piece vector
        (which took 1.5 GB for a 1M-character note)."""
        lo = np.searchsorted(self.piece_starts, begins, "left")
        hi = np.searchsorted(self.piece_starts, ends, "right")
        counts = hi - lo
        means = np.zeros((len(lo), self.piece_vectors.shape[1]), np.float32)
        spans = np.flatnonzero(counts > 0)
        if len(spans):
            blocks = -(-counts[spans] // SUM_BLOCK)
            first = np.repeat(np.cumsum(blocks) - blocks, blocks)  # each block's span's first block
            starts = np.repeat(lo[spans], blocks) + SUM_BLOCK * (np.arange(blocks.sum()) - first)
            stops = np.minimum(starts + SUM_BLOCK, np.repeat(hi[spans], blocks))
            if (starts[1:] < stops[:-1]).any():  # overlapping or unordered spans: one sum each
                partial = np.stack(
                    [self.piece_vectors[a:b].sum(axis=0) for a, b in zip(starts.tolist(), stops.tolist())]
                )
            else:
                partial = _block_sums(self.piece_vectors, starts, stops)
            sums = np.add.reduceat(partial.astype(np.float64), np.cumsum(blocks) - blocks, axis=0)
            means[spans] = sums / counts[spans][:, None]
        return means, counts

    def note_vector(self) -> np.ndarray | None:
        if self.piece_vectors is None or not self.n_tokens:
            return None
        return self.piece_vectors.mean(axis=0, dtype=np.float64).astype(np.float32)

    def sentence_vectors(self) -> np.ndarray:
        """(sentences, dim) float32: the mean of the pieces inside each sentence; NaN rows for sentences
        inside which no piece starts (see sentences_without_piece: they have no vector)."""
        spans = np.asarray(self.sentences, np.int64).reshape(-1, 2)
        means, counts = self._span_means(spans[:, 0], spans[:, 1])
        means[counts == 0] = np.nan
        return means

    def sentences_without_piece(self) -> np.ndarray:
        """Boolean per sentence: True where no piece starts inside it (its vector is null, SENTENCE_NO_PIECE)."""
        spans = np.asarray(self.sentences, np.int64).reshape(-1, 2)
        lo = np.searchsorted(self.piece_starts, spans[:, 0], "left")
        hi = np.searchsorted(self.piece_starts, spans[:, 1], "right")
        return hi == lo

    def first_pieces(self) -> np.ndarray:
        """Index of each token's first piece: the first piece containing the token's first character that the
        tokenizer keeps (its first character, unless the normalizer drops it); -1 for a token that no piece
        covers (every character dropped or made a space by the normalizer): it has no vector."""
        b = np.asarray([t[0] for t in self.tokens], np.int64)
        e = np.asarray([t[1] for t in self.tokens], np.int64)
        first = b if self.next_covered is None else self.next_covered[b]
        nz = np.flatnonzero(self.piece_ends > self.piece_starts)  # zero-width pieces contain no character
        out = np.full(len(b), -1, np.int64)
        if not len(nz) or not len(b):
            return out
        s, ends = self.piece_starts[nz], self.piece_ends[nz]
        last = np.searchsorted(s, first, "right") - 1  # the last piece starting at or before the character
        valid = (last >= 0) & (first <= e)
        last = np.maximum(last, 0)
        # Several pieces can share that start: a multi-byte character's byte pieces, or a SentencePiece marker
        # piece ("▁", moved to its word) before the word's first piece ("5." after "▁"). The first of them that
        # contains the character is the token's first piece.
        i = np.searchsorted(s, s[last], "left")
        ok = valid & (ends[i] > first)
        step = valid & ~ok & (i < last)
        while step.any():
            i[step] += 1
            ok |= step & (ends[i] > first)
            step &= ~ok & (i < last)
        out[ok] = nz[i[ok]]
        return out

    def tokens_without_piece(self) -> np.ndarray:
        """Boolean per token: True where no piece covers the token (its vector is null, TOKEN_NO_PIECE)."""
        return self.first_pieces() < 0

    def token_vectors(self, mode: str = "first") -> np.ndarray:
        """(tokens, dim) float32: each token's first piece's vector ("first") or the mean of the pieces
        starting inside it ("mean"); NaN rows for tokens that no piece covers (they have no vector)."""
        fp = self.first_pieces()
        missing = fp < 0
        first = (
            self.piece_vectors[np.maximum(fp, 0)]
            if len(self.piece_vectors)
            else np.zeros((len(fp), self.piece_vectors.shape[1]), np.float32)
        )
        if mode == "mean":
            tb = np.asarray([t[0] for t in self.tokens], np.int64)
            te = np.asarray([t[1] for t in self.tokens], np.int64)
            means, counts = self._span_means(tb, te)
            first = np.where(counts[:, None] > 0, means, first)
        first[missing] = np.nan
        return first


def _gpu_budget(artifact: Artifact, device: str, precision: str, kernel: str) -> int:
    """Token budget sized from the GPU's free memory (see devices.gpu_token_budget)."""
    import torch

    from clinlong.pipelines.core.devices import gpu_token_budget

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    cfg = artifact.encoder_config
    kernel = resolve_kernel(kernel, device, artifact.model_type, precision)
    if artifact.model_type == "big_bird" and kernel == "blocks":
        return MAX_LENGTH  # dense scores per row: rows of one longest sequence
    one_sided = max(cfg.attention_window, default=2 * cfg.block_size) // 2
    budget = gpu_token_budget(
        free,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        one_sided,
        dtype_bytes=4 if precision == "fp32" else 2,
        kernel=kernel,
    )
    # FlexAttention's rows are padded to a power of two (runtime._TorchModel.row_width): a budget that is one
    # keeps a full row within the memory it was sized for.
    return 1 << (budget.bit_length() - 1) if kernel == "flex" else budget


def word_starts(
    text: str, offsets: np.ndarray, tokens: list[str], marker: str, next_covered: np.ndarray | None = None
) -> np.ndarray:
    """Offsets of SentencePiece pieces with the word-boundary marker ("▁", "▁word") moved from the space
    the marker stands for to the word's first covered character (`next_covered`, see _Coverage; without
    it, the first character that is not whitespace): a word's first piece is then its marker piece (as the
    tokenizer's own word ids have it), and a sentence's span holds the pieces of its first word. Any other
    piece whose first character the normalizer dropped starts at its first covered character."""
    out = offsets.copy()
    n = len(text)
    if next_covered is None:
        for k, piece in enumerate(tokens):
            if piece.startswith(marker):
                s = int(out[k, 0])
                while s < n and text[s].isspace():
                    s += 1
                out[k, 0] = s
                out[k, 1] = max(int(out[k, 1]), min(s + 1, n))
        return out
    marked = np.fromiter((t.startswith(marker) for t in tokens), bool, len(tokens))
    moved = next_covered[np.minimum(out[:, 0], n)]
    inside = ~marked & (moved < out[:, 1])
    out[inside, 0] = moved[inside]
    out[marked, 0] = moved[marked]
    out[marked, 1] = np.maximum(out[marked, 1], np.minimum(moved[marked] + 1, n))
    return out


class _Coverage:
    """Which characters some piece covers, asked of the tokenizer's normalizer one distinct character at a
    time (cached): a character is covered when its normalized form holds a character that is not
    whitespace. Without a normalizer (byte-level BPE) every character that is not whitespace is."""

    def __init__(self, tokenizer):
        self.normalizer = tokenizer.normalizer
        self.cache: dict[str, bool] = {}

    def covered(self, c: str) -> bool:
        hit = self.cache.get(c)
        if hit is None:
            try:
                norm = self.normalizer.normalize_str(c) if self.normalizer is not None else c
            except Exception:  # noqa: BLE001 - a lone surrogate: encoded as U+FFFD bytes, a piece of its own
                norm = c
            hit = self.cache[c] = bool(norm.strip())
        return hit

    def next_covered(self, text: str) -> np.ndarray | None:
        """For each character, the first covered character at or after it (len(text) where none is), and
        one more entry for len(text); None where every non-whitespace character is covered and the text
        has no whitespace that the marker logic needs (byte-level BPE)."""
        odd = [c for c in set(text) if c.isspace() or not self.covered(c)]
        if self.normalizer is None and not odd:
            return None
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")
        uncovered = np.isin(codes, np.fromiter((ord(c) for c in odd), np.uint32, len(odd)))
        idx = np.where(uncovered, len(text), np.arange(len(text)))
        nxt = np.minimum.accumulate(np.append(idx, len(text))[::-1])[::-1]
        return nxt.astype(np.int64)


@dataclass
class _Plan:
    """The runs (model inputs) of one note and how their outputs map back to pieces."""

    run_ids: list[np.ndarray]
    piece_run: np.ndarray  # for each piece: index into run_ids (local to the note)
    piece_pos: np.ndarray  # position inside that run


class NoteEmbedder:
    """Embeds batches of note texts with one artifact; the model is loaded once per process."""

    def __init__(
        self,
        artifact: Artifact,
        options: EmbedOptions = EmbedOptions(),
        threads: int | None = None,
        device: str | None = None,
    ):
        from clinlong.pipelines.core.devices import choose_device

        self.artifact = artifact
        self.options = options.validate(artifact)
        self.tokenizer = artifact.tokenizer
        self.bos, self.eos = artifact.sequence_frame  # <s> ... </s>, [CLS] ... [SEP]
        self.word_marker = artifact.word_marker
        self.coverage = _Coverage(self.tokenizer)
        self.device = device or choose_device(options.device)
        self.precision = resolve_precision(options.precision, self.device, options.backend)
        budget = options.token_budget
        if self.device.startswith("cuda") and budget == DEFAULT_TOKEN_BUDGET:
            budget = _gpu_budget(artifact, self.device, self.precision, options.attention_kernel)
        self.token_budget = budget  # tokens per packed row (model call)
        self.encoder = Encoder(
            artifact,
            budget,
            options.batch_size,
            threads,
            self.precision,
            options.backend,
            self.device,
            options.attention_kernel,
            options.global_attention,
        )

    def _plan_segment(self, ids: np.ndarray, runs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        starts, width = window_plan(len(ids), self.options.max_length, self.options.window_overlap)
        first_run = len(runs)
        for s in starts:
            runs.append(np.concatenate([[self.bos], ids[s : s + width], [self.eos]]))
        w, pos = assign_pieces(len(ids), starts, width)
        return first_run + w, pos + 1  # +1: after <s>

    def _segments(self, result: NoteResult) -> list[tuple[int, int]]:
        """The character spans encoded and run alone: the note, or each of its sentences."""
        if self.options.context == "note":
            return [(0, len(result.text))]
        return [(b, e + 1) for b, e in result.sentences]

    def analyze_many(self, texts: list[str]) -> list[tuple[NoteResult, _Plan]]:
        """BPE and windows of usable texts: every span of every note encoded in one `encode_batch` call
        (tokenizers' Rust threads, RAYON_NUM_THREADS of them), offsets into each original text."""
        results = [NoteResult(None, text_sha256(t), text=t) for t in texts]
        bpe_texts = texts if self.options.case_sensitive else [lowercase_keep_offsets(t) for t in texts]
        if self.word_marker or self.coverage.normalizer is not None:
            for r, t in zip(results, bpe_texts):
                r.next_covered = self.coverage.next_covered(t)
        # A span with no covered character is not run: the normalizer leaves at most a marker piece of it
        # (its vector would be no character's; the note, or the sentence in sentence context, has no piece).
        spans = [
            (k, b, e)
            for k, r in enumerate(results)
            for b, e in self._segments(r)
            if r.next_covered is None or r.next_covered[b] < e
        ]
        pieces = [bpe_texts[k][b:e] for k, b, e in spans]
        encodings = self.tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else []
        parts: list[list] = [[] for _ in texts]
        for (k, b, _), enc in zip(spans, encodings):
            if enc.ids:
                parts[k].append((b, enc))
        out = []

        def cat(xs):
            return np.concatenate(xs) if xs else np.zeros(0, np.int64)

        for result, segs in zip(results, parts):
            runs: list[np.ndarray] = []
            starts, ends, piece_run, piece_pos = [], [], [], []
            for b, enc in segs:
                ids = np.asarray(enc.ids, np.int64)
                offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2) + b
                if self.word_marker:
                    offsets = word_starts(result.text, offsets, enc.tokens, self.word_marker, result.next_covered)
                r, p = self._plan_segment(ids, runs)
                starts.append(offsets[:, 0]), ends.append(offsets[:, 1]), piece_run.append(r), piece_pos.append(p)
            result.piece_starts, result.piece_ends = cat(starts), cat(ends)
            result.n_windows = len(runs)
            out.append((result, _Plan(runs, cat(piece_run), cat(piece_pos))))
        return out

    def analyze(self, text: str) -> tuple[NoteResult, _Plan]:
        """BPE and windows of one usable text (see analyze_many)."""
        return self.analyze_many([text])[0]

    def prepare(self, texts: list) -> "Prepared":
        """CPU-side work before the model: checks, BPE, windows (sentences first in sentence context)."""
        reasons = [skip_reason(t, self.options.max_chars) for t in texts]
        analyzed = iter(self.analyze_many([t for t, r in zip(texts, reasons) if r is None]))
        results: list[NoteResult] = []
        plans: list[_Plan | None] = []
        runs: list[np.ndarray] = []
        offsets: list[int] = []
        for text, reason in zip(texts, reasons):
            offsets.append(len(runs))
            if reason is not None:
                results.append(NoteResult.unusable(reason, text))
                plans.append(None)
                continue
            res, plan = next(analyzed)
            results.append(res)
            plans.append(plan)
            runs.extend(plan.run_ids)
        return Prepared(results, plans, runs, offsets)

    def finish(self, prep: "Prepared") -> list[NoteResult]:
        """Run the model on the prepared sequences and give every piece its vector."""
        hidden = self.encoder(prep.runs) if prep.runs else []
        dim = self.artifact.dimension
        for res, plan, off in zip(prep.results, prep.plans, prep.offsets):
            if plan is None:
                continue
            vecs = np.empty((res.n_tokens, dim), np.float32)
            for r in np.unique(plan.piece_run):
                sel = plan.piece_run == r
                vecs[sel] = hidden[off + r][plan.piece_pos[sel]]
            res.piece_vectors = vecs
            if not res.n_tokens:
                res.skip_reason = NOTE_NO_PIECE
        return prep.results

    def embed(self, texts: list) -> list[NoteResult]:
        """One result per text, in order; unusable texts come back with a skip reason."""
        return self.finish(self.prepare(texts))


@dataclass
class Stalls:
    """Seconds the model step waited for preparation, out of the seconds the whole stream took."""

    waited: float = 0.0
    total: float = 0.0

    @property
    def fraction(self) -> float:
        return self.waited / self.total if self.total else 0.0


def overlapped(
    prepare: Callable[[T], P], finish: Callable[[P], R], items: Iterable[T], stalls: Stalls | None = None
) -> Iterator[R]:
    """finish(prepare(item)) for each item, in order, preparing the next item on a helper thread while
    the current one finishes: the model (ONNX Runtime, torch, the GPU) releases the GIL while it computes,
    BPE runs in tokenizers' own threads. `stalls` collects how long finishing waited for preparation."""
    from concurrent.futures import ThreadPoolExecutor

    stalls = stalls if stalls is not None else Stalls()
    start = time.perf_counter()

    def ready(future):
        t = time.perf_counter()
        value = future.result()
        stalls.waited += time.perf_counter() - t
        return value

    with ThreadPoolExecutor(1, thread_name_prefix="clinlong-prepare") as pool:
        pending = None
        for item in items:
            nxt = pool.submit(prepare, item)
            if pending is not None:
                yield finish(ready(pending))
            pending = nxt
        if pending is not None:
            yield finish(ready(pending))
    stalls.total += time.perf_counter() - start


@dataclass
class Prepared:
    """A batch of notes ready for the model (see NoteEmbedder.prepare)."""

    results: list[NoteResult]
    plans: list[_Plan | None]
    runs: list[np.ndarray]
    offsets: list[int]
