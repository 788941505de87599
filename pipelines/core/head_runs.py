"""Fine-tuned heads over notes (issue 24, point 3): the embedding engine's run (BPE, windows, packing, the model)
with the head's global attention, and the head's logits per sequence or per piece. No Spark here.

`HeadRunner` is a `NoteEmbedder` whose results also hold the head's logits, so the one batch loop
(`core.batches.embed_texts`, per-note fault isolation) runs it unchanged:
- sequence heads: `result.window_logits` (windows, labels): each window's first token (<s>, with global attention
  where the head was trained so) through the head (a text longer than the max length runs as the embedding
  windows; `result.n_windows` says how many); `core.heads.pool_windows` makes them the note's (labels,) (the
  job's `--window-pooling` chooses the rule, `note_scores`; the stages take the mean).
- token heads: `result.piece_logits` (pieces, labels), each piece's logits from the window where it sits farthest
  from an edge (the embeddings' rule); a token takes its first piece's (`token_logits`), as Spark NLP does.
Scores are `core.heads.probabilities(logits, activation)`: softmax or sigmoid, the head's unless a caller says.
What the job writes of a result: `note_scores` (classify: one label and the scores of every label) and
`note_entities` (ner: the chunks of the note's IOB tags, Spark NLP's NerConverter rules).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from clinlong.pipelines.core.artifact import Artifact, ArtifactError
from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder, NoteResult
from clinlong.pipelines.core.heads import Head, chunks_from_tags, pool_windows, probabilities

KIND_CLASSES = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}
TASK_KINDS = {"classify": "sequence", "ner": "token"}  # the job's --task -> the head kind it runs


def check_head(artifact: Artifact, kind: str, stage: str) -> None:
    """One-line ArtifactError unless `artifact` holds a fine-tuned head of `kind` ("sequence" or "token")."""
    head = artifact.head
    want = KIND_CLASSES[kind]
    if head is None:
        raise ArtifactError(
            f"{artifact.path} holds an embedding model with no fine-tuned head; {stage} needs a "
            f"*{want} export: python -m clinlong.export CHECKPOINT OUT on a fine-tuned *{want} "
            "checkpoint (or use LongformerEmbeddings for this model)"
        )
    if head.kind != kind:
        other = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}[head.kind]
        raise ArtifactError(
            f"{artifact.path} holds a {head.kind} head ({head.architecture or other}); {stage} runs "
            f"{kind} heads: use the {other} stage for this model"
        )


class _Recording:
    """The encoder, keeping the last call's hidden states (one array per sequence) for `HeadRunner.finish`."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.last: list = []

    def __call__(self, runs):
        self.last = self.encoder(runs)
        return self.last

    def __getattr__(self, name):
        return getattr(self.encoder, name)


class HeadRunner(NoteEmbedder):
    """The engine with the artifact's head: results carry `head_logits` (sequence) or `piece_logits` (token).
    The encoder runs with the head's global attention (Longformer's sequence head: `cls`), whatever `options` say."""

    def __init__(
        self,
        artifact: Artifact,
        options: EmbedOptions = EmbedOptions(),
        threads: int | None = None,
        device: str | None = None,
        verify: bool = True,
    ):
        head = artifact.head
        if head is None:
            raise ArtifactError(f"{artifact.path} holds no fine-tuned head")
        options = dataclasses.replace(options, global_attention=head.global_attention)
        super().__init__(artifact, options, threads, device)
        self.head = head
        self.head_model = artifact.load_head(verify)
        self.encoder = _Recording(self.encoder)

    def finish(self, prep) -> list[NoteResult]:
        self.encoder.last = []
        results = super().finish(prep)
        hidden, self.encoder.last = self.encoder.last, []
        for res, plan, off in zip(prep.results, prep.plans, prep.offsets):
            if plan is None or res.skip_reason is not None:
                continue
            if self.head.kind == "sequence":
                firsts = np.stack([hidden[off + r][0] for r in range(len(plan.run_ids))])
                res.window_logits = self.head_model.logits(firsts)  # (windows, labels)
            else:
                res.piece_logits = self.head_model.logits(res.piece_vectors)
        return results


def token_logits(result: NoteResult) -> np.ndarray:
    """(tokens, labels): each token's first piece's logits (`result.tokens` set by the caller); NaN rows for a
    token that no piece covers (it gets no tag)."""
    fp = result.first_pieces()
    logits = result.piece_logits
    out = logits[np.maximum(fp, 0)] if len(logits) else np.zeros((len(fp), logits.shape[1]), np.float32)
    out = out.astype(np.float32, copy=True)
    out[fp < 0] = np.nan
    return out


def engine_class(task: str) -> type[NoteEmbedder]:
    """The engine the job's `--task` runs: NoteEmbedder (embed) or HeadRunner (classify, ner)."""
    return HeadRunner if task in TASK_KINDS else NoteEmbedder


def note_scores(result: NoteResult, head: Head, pooling: str = "mean") -> tuple[str, np.ndarray]:
    """A classified note: (the top-scoring label, every label's score (labels,) float32 in id order), from its
    windows' logits pooled by `pooling` (core.heads.pool_windows) and the head's activation."""
    scores = probabilities(pool_windows(result.window_logits, pooling), head.activation)
    return head.labels[int(np.argmax(scores))], scores


def note_entities(result: NoteResult, head: Head) -> list[tuple[int, int, str, float]]:
    """A tagged note's entity chunks: (begin, end inclusive, entity, score), character offsets into the text as
    stored. Each token (the text rules' tokens) is tagged with the argmax label of its first piece's logits
    (`token_logits`), its confidence that label's score; the tags become chunks sentence by sentence by Spark
    NLP's NerConverter rules (core.heads.chunks_from_tags), a chunk's score the mean of its tokens'. A token that
    no piece covers has no tag (it ends a chunk); no tag is made up."""
    logits = token_logits(result)
    missing = np.isnan(logits).any(axis=1)
    scores = probabilities(np.nan_to_num(logits), head.activation)
    best = np.argmax(scores, axis=1)
    by_sentence: dict[int, list[tuple]] = {}
    for i, (b, e, s) in enumerate(result.tokens):
        tag, conf = ("", None) if missing[i] else (head.labels[best[i]], float(scores[i, best[i]]))
        by_sentence.setdefault(s, []).append((b, e, tag, "", conf))
    return [
        (b, e, entity, conf) for s in sorted(by_sentence) for b, e, entity, _, conf in chunks_from_tags(by_sentence[s])
    ]
