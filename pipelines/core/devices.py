"""Which device a Spark task may use: the GPU addresses Spark assigned it, never a hard-coded GPU 0."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

from clinlong.pipelines.core.options import check_choice

DEVICES = ("auto", "cpu", "cuda")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively


@dataclass(frozen=True)
class CpuInfo:
    vendor: str
    model: str
    flags: frozenset[str]


@functools.cache
def cpu_info() -> CpuInfo:
    """This CPU's vendor, model name and instruction-set flags (Linux /proc/cpuinfo; empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if key.strip() == "flags":
                    break
    except OSError:
        pass
    return CpuInfo(
        fields.get("vendor_id", ""),
        fields.get("model name", platform.processor() or "unknown"),
        frozenset(fields.get("flags", "").split()),
    )


def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 instruction-set flags this CPU reports."""
    return tuple(f for f in BF16_CPU_FLAGS if f in cpu_info().flags)


def cpu_bf16_pays() -> bool:
    """Whether this CPU runs bf16 matrix products faster than fp32: with AMX tiles, or AVX512-BF16 on AMD
    (Zen 4 and later). Intel's AVX512-BF16 without AMX (Cooper Lake, or a Sapphire/Emerald Rapids whose
    hypervisor hides AMX) is no faster than fp32, on matrix products or the whole model (figures: README,
    Performance)."""
    flags = cpu_bf16_flags()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and cpu_info().vendor == "AuthenticAMD")


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
    check_choice("device", device, DEVICES)
    if device == "cpu":
        return "cpu"
    gpus = assigned_gpus()
    if not cuda_available():
        if device == "cuda":
            raise RuntimeError(
                "--device cuda, but CUDA is not available to this Python worker; "
                "install a CUDA build of torch on the GPU nodes or use --device auto"
            )
        return "cpu"
    if gpus:
        return f"cuda:{gpus[0]}"
    if device == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"  # auto without an assigned GPU: do not take a GPU the scheduler did not give


MAX_GPU_ROW_TOKENS = 65536  # one packed row per model call: enough to fill an H100, bounded latency


def gpu_token_budget(
    free_bytes: int,
    hidden: int,
    intermediate: int,
    heads: int,
    one_sided: int,
    dtype_bytes: int = 2,
    fraction: float = 0.6,
    kernel: str = "varlen",
    cap: int = MAX_GPU_ROW_TOKENS,
) -> int:
    """Tokens per packed row that fit in `fraction` of free GPU memory: per token, the activations of
    about two layers alive at once and the fp32 output; the blocks kernel adds its fp32 scores
    (heads x 3 x one_sided), which the fused kernels never materialise."""
    per_token = 2 * (8 * hidden + intermediate) * dtype_bytes + 4 * hidden
    if kernel == "blocks":
        per_token += heads * 3 * one_sided * 4
    return max(512, min(cap, int(free_bytes * fraction // per_token)))
