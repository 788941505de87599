"""Measurements shared by the benchmark runs: GEMM peak, useful FLOPs, memory, machine."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clinlong.pipelines.core.encoder_config import EncoderConfig


def flops_per_token(cfg: EncoderConfig) -> float:
    """Useful FLOPs per token: dense layers plus windowed attention, per layer, times layers.

    per layer = 2 * (4 d^2 + 2 d d_ff)          Q, K, V, output projections and the feed-forward
              + 2 * 2 * d * (w + 1)             QK^T and PV over the w + 1 keys of a window w
    (embeddings, LayerNorm, softmax and GELU are ignored; Clinical-Longformer: 188.8 MFLOP/token).
    BigBird counts the 8 key blocks a block-sparse query block reads (3 sliding, 2 global, 3 random) as w + 1."""
    d, dff = cfg.hidden_size, cfg.intermediate_size
    windows = cfg.attention_window or (8 * cfg.block_size - 1,) * cfg.num_hidden_layers
    return float(sum(2 * (4 * d * d + 2 * d * dff) + 4 * d * (w + 1) for w in windows))


def gemm_peak(
    precision: str, threads: int, m: int = 4096, k: int = 768, n: int = 3072, repeat: int = 8, device: str = "cpu"
) -> float:
    """Best-of GFLOP/s of a (m x k) @ (k x n) GEMM, the encoder's FFN shape, at this precision and thread count."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        m *= 8  # enough work to fill a GPU
    try:
        a, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
        torch.nn.functional.linear(a, w)
        sync()
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            torch.nn.functional.linear(a, w)
            sync()
            best = min(best, time.perf_counter() - t)
        return 2 * m * k * n / best / 1e9
    finally:
        torch.set_num_threads(old)


class Clock:
    """Wall seconds of a block, the device synchronised at both ends."""

    def __init__(self, device: str):
        import torch

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WorkerMemory:
    """Samples the RSS of Spark's local Python workers (processes running pyspark's daemon/worker
    modules) from /proc while a run is in flight; `peak_mb` is the largest seen in any one worker."""

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                if int(pid) == me:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                    if b"pyspark" not in cmd or b"python" not in cmd:
                        continue
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
                except OSError:
                    continue
            self._stop.wait(self.interval)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict:
    """The CPU the run measured: model, vendor, cores, bf16 flags and what `--precision auto` picks on it."""
    from clinlong.pipelines.core.devices import cpu_info
    from clinlong.pipelines.core.runtime import resolve_precision

    cpu = cpu_info()
    return {
        "cpu": cpu.model,
        "vendor": cpu.vendor,
        "cores": os.cpu_count(),
        "amx_bf16": "amx_bf16" in cpu.flags,
        "avx512_bf16": "avx512_bf16" in cpu.flags,
        "avx512f": "avx512f" in cpu.flags,
        "precision_auto": resolve_precision("auto", "cpu"),
    }
