"""Fine-tuned heads over notes (issue 24, point 3): the embedding engine's run (BPE, windows, packing, the model)
with the head's global attention, and the head's logits per sequence or per piece. No Spark here.

`HeadRunner` is a `NoteEmbedder` whose results also hold the head's logits, so the one batch loop
(`core.batches.embed_texts`, per-note fault isolation) runs it unchanged:
- sequence heads: `result.head_logits` (labels,): each window's first token (<s>, with global attention where the
  head was trained so) through the head; a text longer than the max length runs as the embedding windows and its
  windows' logits are averaged (the rule the job's `--window-pooling mean` names); `result.n_windows` says how many.
- token heads: `result.piece_logits` (pieces, labels), each piece's logits from the window where it sits farthest
  from an edge (the embeddings' rule); a token takes its first piece's (`token_logits`), as Spark NLP does.
Scores are `core.heads.probabilities(logits, activation)`: softmax or sigmoid, the head's unless a caller says.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from clinlong.pipelines.core.artifact import Artifact, ArtifactError
from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder, NoteResult

KIND_CLASSES = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}


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
                res.head_logits = self.head_model.logits(firsts).mean(axis=0, dtype=np.float64).astype(np.float32)
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


def head_runner(artifact_path: str, options: EmbedOptions) -> HeadRunner:
    """The process's HeadRunner for this artifact, options and device: `core.batches.embedder`'s cache (loaded
    and sha256-verified once, the head's file too, then reused across batches and tasks)."""
    from clinlong.pipelines.core.batches import embedder

    return embedder(artifact_path, options, engine=HeadRunner)
