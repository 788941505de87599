"""The model runtime inside Spark tasks: one ONNX Runtime session per Python worker, token-budget batches.

Sequences are sorted by length and packed so that batch_size x padded length stays within a token
budget: little padding, bounded memory, whatever the mix of note lengths.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from .artifact import Artifact

_SESSIONS: dict[tuple[str, int], object] = {}
_LOCK = threading.Lock()

DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_BATCH_SIZE = 32


def task_threads() -> int:
    """Intra-op threads: CLINLONG_THREADS, else the Spark task's cores, else all cores."""
    if os.environ.get("CLINLONG_THREADS"):
        return int(os.environ["CLINLONG_THREADS"])
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is not None:
            return max(1, int(ctx.cpus()))
    except Exception:
        pass
    return os.cpu_count() or 1


def session_for(artifact: Artifact, threads: int | None = None):
    """The process-wide ONNX Runtime session of this artifact, created on first use."""
    import onnxruntime as ort

    threads = threads or task_threads()
    key = (str(artifact.onnx_path.resolve()), threads)
    with _LOCK:
        if key not in _SESSIONS:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            _SESSIONS[key] = ort.InferenceSession(str(artifact.onnx_path), opts, providers=["CPUExecutionProvider"])
        return _SESSIONS[key]


def plan_batches(lengths: Sequence[int], token_budget: int = DEFAULT_TOKEN_BUDGET,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[int]]:
    """Indices of sequences grouped into batches, longest first, each within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > batch_size or (len(current) + 1) * width > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Encoder:
    """Runs id sequences through the artifact's encoder and returns one (n, dim) array per sequence."""

    def __init__(self, artifact: Artifact, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None):
        self.artifact = artifact
        self.session = session_for(artifact, threads)
        self.pad_id = artifact.token_id("pad")
        self.token_budget = token_budget
        self.batch_size = batch_size

    def __call__(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(sequences)
        lengths = [len(s) for s in sequences]
        for batch in plan_batches(lengths, self.token_budget, self.batch_size):
            width = max(lengths[i] for i in batch)
            ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = sequences[i]
                mask[row, : lengths[i]] = 1
            hidden = self.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
            for row, i in enumerate(batch):
                out[i] = hidden[row, : lengths[i]]
        return out  # type: ignore[return-value]
