"""The model runtime inside Spark tasks: one model per Python worker, token-budget batches.

Two backends run the same encoder: ONNX Runtime on `encoder.onnx` (fp32) and torch on the exported
weights with `export.encoder` (the one shared definition; fp32, bf16, fp16 — bf16 uses AMX where the
CPU has it). Sequences are sorted by length and packed so that batch size x padded length stays
within a token budget: little padding and bounded memory, whatever the mix of note lengths.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

from clinlong.pipelines.core.artifact import Artifact

DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_BATCH_SIZE = 32
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "onnxruntime", "torch")


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


def resolve_backend(backend: str, precision: str) -> str:
    """auto: onnxruntime for fp32, torch for bf16/fp16 (ONNX Runtime's CPU kernels are fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "onnxruntime" if precision == "fp32" else "torch"
    if backend == "onnxruntime" and precision != "fp32":
        raise ValueError(f"the onnxruntime backend runs fp32 only; use backend torch for {precision}")
    return backend


class _OrtModel:
    def __init__(self, artifact: Artifact, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(artifact.onnx_path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower()


class _TorchModel:
    _DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

    def __init__(self, artifact: Artifact, threads: int, precision: str, device: str = "cpu"):
        import torch
        from safetensors.torch import load_file

        from clinlong.pipelines.core.model import EncoderConfig, LongformerEncoder

        cfg = artifact.encoder_config
        cfg["attention_window"] = tuple(cfg["attention_window"])
        model = LongformerEncoder(EncoderConfig(**cfg), fused_attention=device.startswith("cuda"))
        model.load_state_dict(load_file(str(artifact.torch_weights_path)), strict=True)
        self.dtype = getattr(torch, self._DTYPES[precision])
        self.device = torch.device(device)
        self.model = model.eval().to(self.device, self.dtype)
        self.torch = torch

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = self.torch
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
            if cuda:  # pinned host memory, asynchronous copies
                t_ids, t_mask = t_ids.pin_memory(), t_mask.pin_memory()
            out = self.model(t_ids.to(self.device, non_blocking=cuda), t_mask.to(self.device, non_blocking=cuda))
            return out.float().cpu().numpy()


def load_model(artifact: Artifact, precision: str = "fp32", backend: str = "auto", threads: int | None = None,
               device: str = "cpu"):
    """A model of this artifact for this precision and device (ONNX Runtime or torch). Callers cache it:
    the process's one cache is `pipelines.tasks.embedder`, keyed by the artifact's model_id."""
    if device != "cpu" and backend == "auto":
        backend = "torch"
    backend = resolve_backend(backend, precision)
    if device != "cpu" and backend != "torch":
        raise ValueError("GPUs run the torch backend; use --backend auto or torch with --device cuda")
    threads = threads or task_threads()
    return _OrtModel(artifact, threads) if backend == "onnxruntime" else _TorchModel(artifact, threads, precision, device)


def set_task_threads(threads: int | None = None) -> int:
    """Give torch's CPU kernels the task's cores (ONNX Runtime sessions take theirs when created); called
    where a Spark task or an in-process call starts, never as a side effect of building a model."""
    threads = threads or task_threads()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


def plan_batches(lengths: Sequence[int], token_budget: int = DEFAULT_TOKEN_BUDGET,
                 batch_size: int = DEFAULT_BATCH_SIZE, multiple: int = 1) -> list[list[int]]:
    """Indices of sequences grouped into batches, longest first.

    A batch holds sequences of the same length bucket (lengths rounded up to `multiple`, the length
    the encoder pads to anyway), so no padding beyond the window multiple is added; each batch stays
    within `batch_size` sequences and `token_budget` padded tokens."""
    bucket = [-(-n // multiple) * multiple for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (bucket[i] != bucket[current[0]] or len(current) + 1 > batch_size
                        or (len(current) + 1) * bucket[current[0]] > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Encoder:
    """Runs id sequences through the artifact's encoder and returns one (n, dim) float32 array each."""

    def __init__(self, artifact: Artifact, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None,
                 precision: str = "fp32", backend: str = "auto", device: str = "cpu"):
        self.artifact = artifact
        self.device = device
        self.model = load_model(artifact, precision, backend, threads, device)
        self.pad_id = artifact.token_id("pad")
        self.multiple = int(artifact.manifest.get("pad_multiple", 1))
        self.token_budget = token_budget
        self.batch_size = batch_size

    def __call__(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(sequences)
        lengths = [len(s) for s in sequences]
        for batch in plan_batches(lengths, self.token_budget, self.batch_size, self.multiple):
            width = max(lengths[i] for i in batch)
            ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = sequences[i]
                mask[row, : lengths[i]] = 1
            for rows, hidden in self._run_splitting(batch, ids, mask):
                for k, r in enumerate(rows):
                    out[batch[r]] = hidden[k, : lengths[batch[r]]]
        return out  # type: ignore[return-value]

    def _run_splitting(self, batch: list[int], ids: np.ndarray, mask: np.ndarray, rows: list[int] | None = None):
        """Run rows of a batch; on out-of-memory split it in halves and retry, so no sequence is lost.
        A single sequence that does not fit fails the task (Spark retries it) with a clear error."""
        rows = list(range(len(batch))) if rows is None else rows
        try:
            return [(rows, self.model(ids[rows], mask[rows]))]
        except Exception as e:
            if not _is_oom(e):
                raise
            if len(rows) == 1:
                raise MemoryError(f"one sequence of {int(mask[rows[0]].sum())} tokens does not fit on {self.device}; "
                                  "lower --max-length or use a larger device") from None
            half = len(rows) // 2
            return (self._run_splitting(batch, ids, mask, rows[:half])
                    + self._run_splitting(batch, ids, mask, rows[half:]))
