"""Fine-tuned heads (issue 24): the classification layer a user trained on top of the encoder, run on the
encoder's last hidden state from either backend. numpy only (no torch, no Spark), so the ONNX executors run it.

Two kinds, as Hugging Face defines them:
- `sequence` (`LongformerForSequenceClassification`, `BigBirdForSequenceClassification`): the first token's
  vector (`<s>` / `[CLS]`) -> dense (hidden x hidden) -> tanh (Longformer) or the config's `hidden_act`
  (BigBird) -> out_proj (hidden x labels). Longformer's class puts global attention on `<s>` when it is not
  given a mask, so its encoder run must use global attention `cls` (`Head.global_attention`).
- `token` (`LongformerForTokenClassification`, `BigBirdForTokenClassification`): one linear layer
  (hidden x labels) applied to every token's vector; no global attention.
Scores: softmax over the labels (problem_type single_label_classification) or a sigmoid per label
(multi_label_classification).

The export (`clinlong.export`) writes the weights to `head.safetensors` (fp32, Hugging Face's names without
the `classifier.` prefix) and describes the head in the manifest's "head" entry; `Artifact.head` reads
that back as a `Head`, and `HeadModel.load(artifact)` loads the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clinlong.pipelines.core.options import check_choice

HEAD_FILE = "head.safetensors"
KINDS = ("sequence", "token")
# problem_type -> how logits become scores (Hugging Face's pipelines read them so).
ACTIVATIONS = {"single_label_classification": "softmax", "multi_label_classification": "sigmoid"}
SCORE_ACTIVATIONS = ("softmax", "sigmoid")  # how logits become scores (`probabilities`)
WINDOW_POOLINGS = ("mean", "max")  # how a long note's windows' logits become the note's (`pool_windows`)
# Architectures whose head this module computes exactly: name -> (kind, activation between dense and out_proj).
# "hidden_act": BigBird's head uses the config's hidden_act, recorded in the manifest as the head's `dense_act`.
ARCHITECTURES = {
    "LongformerForSequenceClassification": ("sequence", "tanh"),
    "LongformerForTokenClassification": ("token", None),
    "BigBirdForSequenceClassification": ("sequence", "hidden_act"),
    "BigBirdForTokenClassification": ("token", None),
}
# The weights of each kind (Hugging Face's names under `classifier.`), with their shapes.
WEIGHT_NAMES = {
    "sequence": ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"),
    "token": ("weight", "bias"),
}


def _gelu(x: np.ndarray) -> np.ndarray:
    """x * Phi(x) with the exact erf (torch's F.gelu default; Hugging Face's "gelu")."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1.0 + erf(x.astype(np.float64) / math.sqrt(2.0)))).astype(x.dtype)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """The tanh approximation (Hugging Face's "gelu_new", torch's approximate="tanh")."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# The dense layer's activation of sequence heads: tanh (Longformer) or a BigBird config's hidden_act (the
# encoder supports the same three, core.model).
DENSE_ACTIVATIONS = {"tanh": np.tanh, "gelu": _gelu, "gelu_new": _gelu_tanh, "relu": lambda x: np.maximum(x, 0)}


@dataclass(frozen=True)
class Head:
    """A fine-tuned head as the artifact's manifest describes it.

    kind: "sequence" (one score vector per sequence, from its first token) or "token" (one per token).
    labels: the label names in id order (the checkpoint's id2label); logits' last axis follows it.
    problem_type: Hugging Face's, single_label_classification or multi_label_classification.
    activation: how logits become scores: "softmax" (single-label) or "sigmoid" (multi-label).
    global_attention: the encoder run the head was trained on: "cls" (Longformer's sequence head: global
        attention on <s>, as Hugging Face's class sets it by itself) or "none". Pass it to the Encoder.
    architecture: the checkpoint's class, e.g. LongformerForSequenceClassification.
    dense_act: a sequence head's activation between dense and out_proj (tanh, or BigBird's hidden_act).
    file: the weights file in the artifact (HEAD_FILE).
    """

    kind: str
    labels: tuple[str, ...]
    problem_type: str
    activation: str
    global_attention: str = "none"
    architecture: str = ""
    dense_act: str | None = None
    file: str = HEAD_FILE

    def __post_init__(self):
        check_choice("head kind", self.kind, KINDS)
        check_choice("head activation", self.activation, SCORE_ACTIVATIONS)
        if self.kind == "sequence":
            check_choice("sequence head activation", self.dense_act, sorted(DENSE_ACTIVATIONS))

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_manifest(self) -> dict:
        return {
            "kind": self.kind,
            "architecture": self.architecture,
            "labels": list(self.labels),
            "problem_type": self.problem_type,
            "activation": self.activation,
            "global_attention": self.global_attention,
            "dense_act": self.dense_act,
            "file": self.file,
        }

    @classmethod
    def from_manifest(cls, entry: Mapping) -> "Head":
        return cls(
            kind=entry["kind"],
            labels=tuple(entry["labels"]),
            problem_type=entry["problem_type"],
            activation=entry["activation"],
            global_attention=entry.get("global_attention", "none"),
            architecture=entry.get("architecture", ""),
            dense_act=entry.get("dense_act"),
            file=entry.get("file", HEAD_FILE),
        )


@dataclass(frozen=True)
class HeadOutput:
    """One sequence's result. Sequence heads: logits and probabilities of shape (labels,); token heads:
    (tokens, labels), one row per token of the sequence (special tokens included). float32."""

    logits: np.ndarray
    probabilities: np.ndarray


def probabilities(logits: np.ndarray, activation: str) -> np.ndarray:
    """Scores over the last axis: softmax (each row sums to 1) or an independent sigmoid per label."""
    check_choice("activation", activation, SCORE_ACTIVATIONS)
    x = np.asarray(logits, np.float64)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    e = np.exp(-np.abs(x))  # sigmoid: no overflow for large |x|, full relative precision on both sides
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def read_head_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The head's tensors (safetensors file) as float32 numpy arrays, read by the safetensors package's numpy
    loader (no torch)."""
    from safetensors.numpy import load_file

    return {name: arr.astype(np.float32) for name, arr in load_file(str(path)).items()}


class HeadModel:
    """A head with its weights; calls take the encoder's last hidden state (from the Encoder of either backend,
    run with `head.global_attention`)."""

    def __init__(self, head: Head, weights: Mapping[str, np.ndarray]):
        self.head = head
        names = WEIGHT_NAMES[head.kind]
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"the {head.kind} head's weights lack {missing}")
        self.weights = {n: np.ascontiguousarray(weights[n], np.float32) for n in names}
        out = self.weights["out_proj.weight" if head.kind == "sequence" else "weight"]
        if out.shape[0] != head.num_labels:
            raise ValueError(f"the head's weights give {out.shape[0]} logits but it names {head.num_labels} labels")
        self.dimension = out.shape[1]
        self._dense_act = DENSE_ACTIVATIONS[head.dense_act] if head.kind == "sequence" else None

    @classmethod
    def load(cls, artifact, verify: bool = True) -> "HeadModel":
        """The head of `artifact` (a core.artifact.Artifact) with its weights: `artifact.load_head(verify)`."""
        return artifact.load_head(verify)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """The head's logits, float32.

        Sequence heads: `hidden` (k, dim) holds the first token's (<s>'s) last hidden state of k sequences
        -> (k, labels). Token heads: `hidden` (n, dim), any tokens' last hidden states -> (n, labels)."""
        x = np.asarray(hidden, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dimension:
            raise ValueError(f"hidden states must be (n, {self.dimension}), got {x.shape}")
        w = self.weights
        if self.head.kind == "sequence":
            x = self._dense_act(x @ w["dense.weight"].T + w["dense.bias"])
            return (x @ w["out_proj.weight"].T + w["out_proj.bias"]).astype(np.float32)
        return (x @ w["weight"].T + w["bias"]).astype(np.float32)

    def __call__(self, hidden_states: Sequence[np.ndarray]) -> list[HeadOutput]:
        """One HeadOutput per sequence. `hidden_states`: each sequence's last hidden state (n_i, dim), as the
        Encoder returns it (first token <s>/[CLS] first). Sequence heads read each one's first row (n_i >= 1)
        and give logits/probabilities of shape (labels,); token heads give (n_i, labels). One matrix product
        for the whole batch."""
        if not len(hidden_states):
            return []
        if self.head.kind == "sequence":
            if any(len(h) == 0 for h in hidden_states):
                raise ValueError("a sequence head needs at least the first token of every sequence")
            logits = self.logits(np.stack([np.asarray(h)[0] for h in hidden_states]))
            probs = probabilities(logits, self.head.activation)
            return [HeadOutput(logits[i], probs[i]) for i in range(len(hidden_states))]
        sizes = [len(h) for h in hidden_states]
        logits = self.logits(np.concatenate([np.asarray(h).reshape(-1, self.dimension) for h in hidden_states]))
        probs = probabilities(logits, self.head.activation)
        bounds = np.cumsum(sizes)[:-1]
        return [HeadOutput(a, b) for a, b in zip(np.split(logits, bounds), np.split(probs, bounds))]


def pool_windows(window_logits: np.ndarray, rule: str = "mean") -> np.ndarray:
    """A sequence head's logits for a note run as several windows (each with global attention on its own <s>):
    `window_logits` (windows, labels) -> (labels,), float32.

    - "mean" (the default): the mean of the windows' logits, label by label; the scores are then taken of the
      mean (softmax or sigmoid), so every window weighs the same, as in the usual chunk-and-average practice
      for long clinical notes.
    - "max": each label's largest logit over the windows, then the scores: a label is as likely as in the
      window most sure of it (for multi-label heads, a finding stated once in a long note is not averaged away).
    One window: its own logits under either rule.

    Raises:
        ValueError: another rule, or no window.
    """
    check_choice("window pooling", rule, WINDOW_POOLINGS)
    x = np.asarray(window_logits, np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"window logits must be (windows >= 1, labels), got {x.shape}")
    if rule == "max":
        return x.max(axis=0)
    return x.mean(axis=0, dtype=np.float64).astype(np.float32)


def chunks_from_tags(tags: list[tuple[int, int, str, str, float | None]], no_schema: bool = False) -> list[tuple]:
    """(begin, end, entity, first word, confidence) of each chunk of one sentence's tagged tokens
    (begin, end, tag, word, confidence), by Spark NLP's NerConverter rules (its NerTagsEncoding.fromIOB):

    - "B-X" closes the open chunk and opens an X chunk; "O" (and an empty tag: a token with no tag) closes it;
      "I-X" continues the open chunk (whatever its entity, as Spark NLP does) or opens an X chunk after "O";
      a tag without a prefix opens a chunk of the whole tag;
    - `no_schema` (tags without B-/I- prefixes): each run of tokens with the same tag other than "O" is one
      chunk of that entity.
    A chunk's begin/end are its first token's begin and its last token's end (end inclusive); its confidence
    is the mean of its tokens' confidences that are not None (None when none has one).
    """
    out = []
    start = entity = None

    def flush(last: int) -> None:
        conf = [c for _, _, _, _, c in tags[start : last + 1] if c is not None]
        out.append((tags[start][0], tags[last][1], entity, tags[start][3], sum(conf) / len(conf) if conf else None))

    for i, (_, _, tag, _, _) in enumerate(tags):
        outside = tag in ("O", "")
        if no_schema:
            if entity is not None and tag != entity:
                flush(i - 1)
                entity = None
            if entity is None and not outside:
                start, entity = i, tag
            continue
        if entity is not None and (tag.startswith("B-") or outside):
            flush(i - 1)
            entity = None
        if entity is None and not outside:
            start, entity = i, tag[2:] if tag[1:2] == "-" else tag
    if entity is not None:
        flush(len(tags) - 1)
    return out
