"""Which device a Spark task may use: the GPU addresses Spark assigned it, never a hard-coded GPU 0."""
from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")


def assigned_gpus() -> list[str]:
    """GPU addresses Spark's scheduler gave the current task (empty outside tasks or without GPUs)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is None:
            return []
        gpu = ctx.resources().get("gpu")
        return list(gpu.addresses) if gpu is not None else []
    except Exception:
        return []


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def choose_device(device: str = "auto") -> str:
    """cpu, or cuda:<address> for the GPU this task was assigned.

    auto: the assigned GPU when CUDA is usable, else the CPU (same numbers, slower). cuda: the assigned
    GPU; outside Spark tasks, the process's current CUDA device (as CUDA_VISIBLE_DEVICES exposes it)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return "cpu"
    gpus = assigned_gpus()
    if not cuda_available():
        if device == "cuda":
            raise RuntimeError("--device cuda, but CUDA is not available to this Python worker; "
                               "install a CUDA build of torch on the GPU nodes or use --device auto")
        return "cpu"
    if gpus:
        return f"cuda:{gpus[0]}"
    if device == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"  # auto without an assigned GPU: do not take a GPU the scheduler did not give


def gpu_token_budget(free_bytes: int, hidden: int, heads: int, one_sided: int, layers_alive: int = 2,
                     dtype_bytes: int = 2, fraction: float = 0.6) -> int:
    """Tokens per batch that fit in `fraction` of free GPU memory: per token, the attention scores of
    one layer (heads x 3 x one_sided, fp32 softmax) and a few hidden-size activations per live layer."""
    per_token = heads * 3 * one_sided * 4 + layers_alive * 8 * hidden * dtype_bytes
    return max(512, int(free_bytes * fraction // per_token))
