"""The model runtime inside Spark tasks: one model per Python worker, packed rows of a token budget.

Two backends run the same encoder: torch on the exported weights with core.model (the one shared
definition; fp32, bf16, fp16; the default) and ONNX Runtime on `encoder.onnx` (fp32). bf16 is `auto`'s
choice on GPUs and on CPUs where it is faster (devices.cpu_bf16_pays). Sequences are packed end to end into rows
(core.packing) with their own positions; attention stays inside each sequence (on GPUs through a
fused windowed kernel), so a call costs the tokens it holds and no sequence is padded to a block.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clinlong.pipelines.core.artifact import Artifact, reading
from clinlong.pipelines.core.devices import cpu_bf16_pays
from clinlong.pipelines.core.options import GLOBAL_ATTENTION, check_choice
from clinlong.pipelines.core.packing import BIG_BIRD_KERNELS, KERNEL_CHOICES, pack, packed_rows

DEFAULT_TOKEN_BUDGET = 4096  # CPUs: smaller rows stay in cache (figures: README, Performance); GPUs size theirs
DEFAULT_BATCH_SIZE = 32
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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


def resolve_precision(precision: str, device: str, backend: str = "auto") -> str:
    """auto: bf16 on GPUs (fp16 where a GPU lacks bf16) and on CPUs where bf16 is faster (AMX, or AMD's
    AVX512-BF16: devices.cpu_bf16_pays), fp32 on other CPUs and with the onnxruntime backend (fp32 kernels)."""
    check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    if resolve_backend(backend) == "onnxruntime":
        return "fp32"
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_pays() else "fp32"


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def resolve_backend(backend: str, precision: str = "auto") -> str:
    """auto: torch where it is installed, at every precision: its CPU threads follow the cores a Spark
    executor has idle (CoreShare), where an ONNX Runtime session keeps the threads it was built with,
    and its fp32 runs as fast (figures: README, Performance). Else onnxruntime: the exported graph, fp32
    only, on the base install."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if torch_installed():
            return "torch"
        if precision not in ("auto", "fp32"):
            raise ValueError(f"{precision} runs on torch, which is not installed here: pip install 'clinlong[torch]'")
        return "onnxruntime"
    if backend == "onnxruntime" and precision not in ("auto", "fp32"):
        raise ValueError(f"the onnxruntime backend runs fp32 only; use backend torch for {precision}")
    return backend


def files_to_verify(artifact: Artifact, backend: str) -> list[str]:
    """The artifact's files executors may read with this backend option, for the driver to verify: with
    auto, both backends' (each executor runs torch where it is installed, ONNX Runtime elsewhere)."""
    backends = ("onnxruntime", "torch") if backend == "auto" else (resolve_backend(backend),)
    return sorted({f for b in backends for f in model_files(artifact, b)})


class CoreShare:
    """One executor's cores shared by the tasks running on it now, for torch's CPU threads: a task left
    alone (its siblings finished) takes all of them, so a chunk's heaviest task does not finish on one
    core while the others idle. Each running task is a file named by its worker's pid in `folder`, which
    the executor's Python workers share; files of dead workers are ignored and removed."""

    def __init__(self, folder: Path, cores: int, own: int):
        self.folder, self.cores, self.own = Path(folder), cores, own
        self.entry = self.folder / str(os.getpid())

    def __enter__(self) -> "CoreShare":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entry.touch()
        return self

    def __exit__(self, *exc) -> None:
        self.entry.unlink(missing_ok=True)

    def threads(self) -> int:
        """The task's cores, or the executor's cores divided among its running tasks where that is more."""
        running = 0
        for f in self.folder.iterdir():
            try:
                os.kill(int(f.name), 0)
                running += 1
            except (ValueError, ProcessLookupError):
                f.unlink(missing_ok=True)
            except PermissionError:  # alive, another user's
                running += 1
        return max(self.own, self.cores // max(running, 1))


class _OrtModel:
    """ONNX Runtime on the exported graph; `with_global`: the global-attention graph (export --global-attention),
    which takes the global tokens' row indices as a third input."""

    @staticmethod
    def row_width(used: int) -> int:
        return used  # the graph pads each row to whole attention blocks itself

    def __init__(self, artifact: Artifact, threads: int, with_global: bool = False):
        import onnxruntime as ort

        self.with_global = with_global
        path = artifact.path / artifact.manifest["onnx_global"]["file"] if with_global else artifact.onnx_path

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        with reading(path):
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(
        self, ids: np.ndarray, positions: np.ndarray, global_positions: np.ndarray | None = None
    ) -> np.ndarray:
        feed = {"input_ids": ids, "position_ids": positions}
        if self.with_global:  # no global token: one unused slot per row
            feed["global_positions"] = (
                global_positions if global_positions is not None else np.full((len(ids), 1), -1, np.int64)
            )
        elif global_positions is not None:
            raise ValueError("this ONNX graph runs local attention only; re-export with --global-attention")
        return self.session.run(["last_hidden_state"], feed)[0]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower()


def resolve_kernel(kernel: str, device: str, model_type: str = "longformer", precision: str = "bf16") -> str:
    """auto: flash attention over the packed sequences (`varlen`) on GPUs, the blocked form on CPUs;
    BigBird (no sliding window for varlen) and fp32 (flash attention computes in bf16/fp16 only):
    FlexAttention on GPUs. Refused in one line: varlen on a CPU, at fp32, or for BigBird."""
    cuda = device.startswith("cuda")
    if kernel == "auto":
        if not cuda:
            return "blocks"
        return "flex" if model_type == "big_bird" or precision == "fp32" else "varlen"
    check_choice("attention kernel", kernel, KERNEL_CHOICES)  # "auto" is resolved above
    if model_type == "big_bird" and kernel not in BIG_BIRD_KERNELS:
        raise ValueError("BigBird's block-sparse attention has no varlen form; use --attention-kernel flex or blocks")
    if kernel == "varlen" and not cuda:
        raise ValueError("the varlen attention kernel runs on CUDA GPUs only; use --attention-kernel blocks or flex")
    if kernel == "varlen" and precision == "fp32":
        raise ValueError(
            "the varlen attention kernel (flash attention) computes in bf16 or fp16 only; "
            "use --precision bf16/fp16, or --attention-kernel flex at fp32"
        )
    return kernel


class _TorchModel:
    _DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    # Compiled FlexAttention compiles once per row length: rows are padded to a power of two from 4,096, so a
    # GPU's budget of 65,536 tokens makes 5 lengths per precision (rows padded to multiples of 4,096 made 16
    # and hit torch._dynamo's recompile limit on the H200 run of 2026-11-29, falling back to dense attention).
    FLEX_MIN_ROW = 4096

    def __init__(self, artifact: Artifact, threads: int, precision: str, device: str = "cpu", kernel: str = "auto"):
        import torch
        from safetensors.torch import load_file

        from clinlong.pipelines.core.model import PackedEncoder

        self.kernel = resolve_kernel(kernel, device, artifact.model_type, precision)
        with reading(artifact.torch_weights_path):
            weights = load_file(str(artifact.torch_weights_path))
        # Artifacts exported before the global projections were kept run local attention only.
        self.with_global = any(".query_global." in k for k in weights)
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            model = PackedEncoder(artifact.encoder_config, kernel=self.kernel, with_global=self.with_global)
        model.load_state_dict(weights, strict=True, assign=True)
        self.dtype = getattr(torch, self._DTYPES[precision])
        self.device = torch.device(device)
        self.model = model.eval().to(self.device, self.dtype)
        self.pow2_rows = self.kernel == "flex" and self.device.type == "cuda"
        self.torch = torch
        self.share: CoreShare | None = None  # set for the duration of a Spark task on a CPU executor

    def row_width(self, used: int) -> int:
        """The padded length of a packed row holding `used` tokens."""
        return max(self.FLEX_MIN_ROW, 1 << (used - 1).bit_length()) if self.pow2_rows else used

    def __call__(
        self, ids: np.ndarray, positions: np.ndarray, global_positions: np.ndarray | None = None
    ) -> np.ndarray:
        """`global_positions` (B, G): row indices of global tokens, -1 in unused slots (None: local only)."""
        torch = self.torch
        cuda = self.device.type == "cuda"
        if self.share is not None and not cuda:
            torch.set_num_threads(self.share.threads())
        with torch.inference_mode():
            t_ids, t_pos = torch.from_numpy(ids), torch.from_numpy(positions)
            if cuda:  # pinned host memory, asynchronous copies
                t_ids, t_pos = t_ids.pin_memory(), t_pos.pin_memory()
            t_glob = None if global_positions is None else torch.from_numpy(global_positions).to(self.device)
            out = self.model(t_ids.to(self.device, non_blocking=cuda), t_pos.to(self.device, non_blocking=cuda), t_glob)
            if not cuda:
                return out.float().numpy()
            # The vectors leave the GPU through page-locked host memory (torch's caching host allocator reuses
            # it): the copy to pageable memory was 78% of the model step's device time on the H200 run of
            # 2026-11-29 (benchmarks/gpu_check.sh's profile.txt).
            host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(out.float(), non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return host.numpy()


def choose_backend(precision: str, backend: str, device: str) -> tuple[str, str]:
    """The backend and precision a model of these options runs with on this device."""
    precision = resolve_precision(precision, device, backend)
    backend = resolve_backend(backend, precision)
    if device != "cpu" and backend != "torch":
        raise ValueError("GPUs run the torch backend; use --backend auto or torch with --device cuda")
    return backend, precision


def model_files(artifact: Artifact, backend: str) -> list[str]:
    """The artifact's files a model of this backend reads (what a worker verifies before loading)."""
    m = artifact.manifest
    if backend == "onnxruntime":
        return [m["tokenizer"], m["onnx"]["file"], *([m["onnx_global"]["file"]] if "onnx_global" in m else [])]
    return [m["tokenizer"], m["torch"]["file"]]


def check_global_attention(artifact: Artifact, backend: str, precision: str = "auto") -> None:
    """Refuse, in one line, global attention where it cannot run: a family without it (BigBird) or the
    ONNX Runtime backend on an artifact exported without the global-attention graph."""
    if artifact.model_type != "longformer":
        raise ValueError(
            f"global attention is Longformer's; this {artifact.model_type} model has none (use --global-attention none)"
        )
    if resolve_backend(backend, precision) == "onnxruntime" and "onnx_global" not in artifact.manifest:
        raise ValueError(
            "global attention on the onnxruntime backend needs the artifact's global-attention graph: "
            "re-export with python -m clinlong.export --global-attention, or use --backend torch"
        )


def load_model(
    artifact: Artifact,
    precision: str = "fp32",
    backend: str = "auto",
    threads: int | None = None,
    device: str = "cpu",
    kernel: str = "auto",
    global_attention: str = "none",
):
    """A model of this artifact for this precision and device (ONNX Runtime or torch). Callers cache it:
    the process's one cache is `core.batches.embedder`, keyed by the artifact's model_id."""
    backend, precision = choose_backend(precision, backend, device)
    threads = threads or task_threads()
    if backend == "onnxruntime":
        if kernel not in ("auto", "blocks"):
            raise ValueError(f"the ONNX graph has the blocks attention kernel; {kernel} runs with --backend torch")
        return _OrtModel(artifact, threads, with_global=global_attention != "none")
    return _TorchModel(artifact, threads, precision, device, kernel)


def set_task_threads(threads: int | None = None) -> int:
    """Give torch's CPU kernels the task's cores (ONNX Runtime sessions take theirs when created); called
    where a Spark task or an in-process call starts, never as a side effect of building a model."""
    threads = threads or task_threads()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    # tokenizers' encode_batch threads (read when its pool starts, so the first task of a worker sizes it).
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    return threads


class Encoder:
    """Runs id sequences through the artifact's encoder and returns one (n, dim) float32 array each.

    Sequences are packed end to end into one row per model call (core.packing): at most `token_budget`
    tokens and `batch_size` sequences, longest first, so a call costs the tokens it holds, whatever the
    mix of lengths, and memory stays bounded.

    `global_attention` (Longformer): "none", or "cls": global attention on the first token (<s>) of every
    sequence; a call may instead name each sequence's global tokens (`globals`)."""

    def __init__(
        self,
        artifact: Artifact,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
        precision: str = "fp32",
        backend: str = "auto",
        device: str = "cpu",
        kernel: str = "auto",
        global_attention: str = "none",
    ):
        check_choice("global attention", global_attention, GLOBAL_ATTENTION)
        if global_attention != "none":
            check_global_attention(artifact, backend, precision)
        self.artifact = artifact
        self.device = device
        self.global_attention = global_attention
        self.model = load_model(artifact, precision, backend, threads, device, kernel, global_attention)
        self.row_width = self.model.row_width  # the padded length of a row holding n tokens (the kernel's rule)
        if global_attention != "none" and not getattr(self.model, "with_global", False):
            raise ValueError(
                "this artifact lacks the global-attention weights (exported before they were kept); "
                "re-export it with python -m clinlong.export for --global-attention"
            )
        self.pad_id = artifact.token_id("pad")
        self.padding_idx = artifact.encoder_config.pad_token_id  # packed rows' position padding (core.packing)
        self.token_budget = token_budget
        self.batch_size = batch_size

    def __call__(
        self, sequences: Sequence[np.ndarray], globals: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """One (n, dim) array per sequence; `globals`: each sequence's global token offsets (overrides
        `global_attention`)."""
        if globals is None and self.global_attention == "cls":
            globals = [np.zeros(1 if len(s) else 0, np.int64) for s in sequences]
        out: list[np.ndarray | None] = [None] * len(sequences)
        for row in pack([len(s) for s in sequences], self.token_budget, self.batch_size):
            for i, hidden in self._run_splitting(sequences, row, globals):
                out[i] = hidden
        return out  # type: ignore[return-value]

    def _run_splitting(
        self, sequences: Sequence[np.ndarray], row: list[int], globals: Sequence[np.ndarray] | None = None
    ) -> list[tuple[int, np.ndarray]]:
        """Run one packed row; on out-of-memory split its sequences in halves and retry, so none is lost.
        A single sequence that does not fit fails the task (Spark retries it) with a clear error."""
        used = sum(len(sequences[i]) for i in row)
        ids, pos, spans = packed_rows(sequences, [row], self.pad_id, self.padding_idx, self.row_width(used))
        glob = None
        if globals is not None:
            found = [s + np.asarray(globals[i], np.int64) for i, (s, _) in zip(row, spans[0])]
            flat = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
            if len(flat):
                glob = flat[None]
        try:
            hidden = (self.model(ids, pos) if glob is None else self.model(ids, pos, glob))[0]
        except Exception as e:
            if not _is_oom(e):
                raise
            if len(row) == 1:
                raise MemoryError(
                    f"one sequence of {used} tokens does not fit on {self.device}; "
                    "lower --max-length or use a larger device"
                ) from None
            hidden = None
        if hidden is None:
            # Retried outside the except clause: the exception's traceback holds the failed attempt's
            # activations, and retrying inside it ran every half out of GPU memory too (H200 run, 2026-11-29).
            half = len(row) // 2
            return self._run_splitting(sequences, row[:half], globals) + self._run_splitting(
                sequences, row[half:], globals
            )
        return [(i, hidden[s : s + n]) for i, (s, n) in zip(row, spans[0])]
