"""`python -m clinlong.benchmarks.gpu`: the heavy step on a GPU against Hugging Face, in one run on the same notes.

Rows: Hugging Face `LongformerModel` eager with 8-row batches in table order (the pandas-UDF habit) and
with length-sorted batches; ours with the model step alone per precision and attention kernel (varlen,
flex); ours with preparation (checks, BPE, windows) overlapped on the host's cores, as the Spark task
runs it. Each row: tokens/s, useful TFLOP/s, fraction of the GEMM peak measured in the same run, GPU
memory, projected hours for MIMIC-III's ~1e9 tokens, and for ours the minimum cosine to Hugging Face
fp32 on a sample of notes. Needs torch, transformers, onnx and onnxruntime (for the export), no Spark.

    python -m clinlong.benchmarks.gpu [--work work/bench] [--notes 400] [--json OUT]
    python -m clinlong.benchmarks.gpu --device cpu --size tiny   # a smoke run without a GPU (12 notes, ~1 min)

Also, at the first precision: each kernel with global attention on every window's <s> (`--global-attention
cls`, issue 24: the windowed kernel plus a dense global part merged by log-sum-exp), and with `--profile
FILE` a torch.profiler table of the top kernels of our model step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

MIMIC_NOTES = 2_083_180
MIMIC_TOKENS = 1.0e9  # on the order of a billion BPE tokens (about 4 GB of text)
GPU_NOTES, SMOKE_NOTES = 400, 12  # the MIMIC-like mix on a GPU; a smoke run of the script on the CPU
NOTES_PER_BATCH = 64  # the job's Arrow batch of notes (spark.sql.execution.arrow.maxRecordsPerBatch)
GPU_KERNELS = ("varlen", "flex")  # the two fused kernels whose rows decide which one stays


def _sig(x: float) -> float:
    """Three significant digits (TFLOP/s of a GPU and of a CPU smoke run alike)."""
    return float(f"{x:.3g}")


def _min_cosine(ref: list, got: list) -> float:
    worst = 1.0
    for a, b in zip(ref, got):
        if a is None or b is None:
            continue
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
        worst = min(worst, float(cos.min()))
    return worst


def _profile(emb, prepared, cuda: bool, path: Path) -> None:
    """torch.profiler over one model step of the batch: the top kernels by device time (CPU time on a CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        emb.finish(prepared)
        if cuda:
            torch.cuda.synchronize()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90) + "\n")
    print(f"profile of the model step written to {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import torch

    from clinlong.benchmarks.baseline import hf_run
    from clinlong.benchmarks.inputs import ensure_artifact
    from clinlong.benchmarks.measure import Clock, flops_per_token, gemm_peak
    from clinlong.export.synthetic_notes import generate_notes
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder, Stalls, overlapped

    p = argparse.ArgumentParser(prog="python -m clinlong.benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--work", default="work/bench")
    p.add_argument(
        "--notes",
        type=int,
        help=f"notes to run (default {GPU_NOTES} on a GPU, {SMOKE_NOTES} on the CPU: a "
        "smoke run of the script that fits a minute on 2 cores)",
    )
    p.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a smoke run of this script")
    p.add_argument("--size", default="base", choices=("base", "tiny"), help="synthetic checkpoint size")
    p.add_argument("--precisions", help="comma-separated (default bf16,fp16 on a GPU, bf16 in a CPU smoke run)")
    p.add_argument("--json")
    p.add_argument(
        "--profile",
        help="write a torch.profiler table (top kernels by device time) of our model "
        "step at the first precision and kernel to this file",
    )
    args = p.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; run this on a GPU machine (or --device cpu --size tiny for a smoke run)")
        return 2
    cuda = device.startswith("cuda")
    n_notes = args.notes or (GPU_NOTES if cuda else SMOKE_NOTES)
    precisions = (args.precisions or ("bf16,fp16" if cuda else "bf16")).split(",")
    kernels = GPU_KERNELS if cuda else ("blocks",)  # varlen runs on CUDA only; eager FlexAttention on CPUs is dense
    ckpt, art_path = ensure_artifact(Path(args.work), args.size)
    art = Artifact.open(art_path, verify=False)
    fpt = flops_per_token(art.encoder_config)
    texts = [n.text for n in generate_notes(n_notes, seed=7)]
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))

    # The sequences every row runs: each note cut into windows as the pipeline cuts them.
    probe = NoteEmbedder(art, EmbedOptions(precision="fp32"), device="cpu", threads=threads)
    start = time.perf_counter()
    prepared = probe.prepare(texts)
    prep_seconds = time.perf_counter() - start
    sequences = prepared.runs
    tokens = sum(len(s) for s in sequences)
    useful = sum(r.n_tokens + 2 for r in prepared.results)
    sample = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))[:: max(1, len(sequences) // 24)]
    peaks = {prec: gemm_peak(prec, threads, device=device, repeat=8 if cuda else 2) for prec in ("fp32", *precisions)}

    rows: list[dict] = []

    def row(name: str, prec: str, seconds: float, **extra) -> dict:
        tps = useful / seconds
        r = {
            "name": name,
            "precision": prec,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tps),
            "tflops": _sig(tps * fpt / 1e12),
            "gemm_peak_tflops": _sig(peaks[prec] / 1e3),
            "fraction_of_peak": round(tps * fpt / 1e9 / peaks[prec], 3),
            "mimic_hours": round(MIMIC_TOKENS / tps / 3600, 3),
            **extra,
        }
        if cuda:
            r["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    _, reference = hf_run(ckpt, [sequences[i] for i in sample], device, "fp32", sort=True)
    for prec in precisions:
        for sort in (False, True):
            seconds, _ = hf_run(ckpt, sequences, device, prec, sort)
            row(f"hf_eager_{'sorted' if sort else '8_rows'}", prec, seconds)
    for prec in precisions:
        for kernel in kernels:
            emb = NoteEmbedder(
                art, EmbedOptions(precision=prec, attention_kernel=kernel), device=device, threads=threads
            )
            # Warm-up: one untimed pass compiles FlexAttention for each row length and fills torch's pinned
            # host-memory cache, as the first batches of a long job do; the timed pass is the steady state.
            emb.finish(prepared)
            cos = _min_cosine(reference, emb.encoder([sequences[i] for i in sample]))
            with Clock(device) as clock:
                emb.finish(prepared)
            row(
                f"ours_model_{kernel}",
                prec,
                clock.seconds,
                kernel=kernel,
                min_cosine_to_hf_fp32=round(cos, 6),
                token_budget=emb.encoder.token_budget,
            )
            local_seconds = clock.seconds
            if args.profile and prec == precisions[0] and kernel == kernels[0]:
                _profile(emb, prepared, cuda, Path(args.profile))
            if prec == precisions[0] and art.model_type == "longformer":
                glob = NoteEmbedder(
                    art,
                    EmbedOptions(precision=prec, attention_kernel=kernel, global_attention="cls"),
                    device=device,
                    threads=threads,
                )
                glob.finish(prepared)  # warm-up, as above
                with Clock(device) as clock:
                    glob.finish(prepared)
                row(
                    f"ours_model_{kernel}_global_cls",
                    prec,
                    clock.seconds,
                    kernel=kernel,
                    global_attention="cls",
                    seconds_vs_local=round(clock.seconds / local_seconds, 3),
                )
                del glob
            stalls = Stalls()
            batches = [texts[i : i + NOTES_PER_BATCH] for i in range(0, len(texts), NOTES_PER_BATCH)]
            with Clock(device) as clock:
                for _ in overlapped(emb.prepare, emb.finish, batches, stalls):
                    pass
            row(
                f"ours_with_preparation_{kernel}",
                prec,
                clock.seconds,
                kernel=kernel,
                model_waits_for_preparation=round(stalls.fraction, 3),
            )
            del emb
    hf_sorted = {r["precision"]: r["tokens_per_s"] for r in rows if r["name"] == "hf_eager_sorted"}
    for r in rows:
        if r["name"].startswith("ours"):
            r["x_hf_sorted"] = round(r["tokens_per_s"] / hf_sorted[r["precision"]], 2)
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "host_cores": threads,
        "torch": torch.__version__,
        "model": art.model_id,
        "notes": len(texts),
        "useful_tokens": useful,
        "model_tokens": tokens,
        "flops_per_token": fpt,
        "preparation_tokens_per_s_per_core": round(useful / prep_seconds / threads),
        "gemm_peak_tflops": {k: _sig(v / 1e3) for k, v in peaks.items()},
        "runs": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
