"""`python -m clinlong.benchmarks [--quick] [--json OUT]`: our job against the pandas-UDF baseline, side by side.

One run, one machine, one process tree: the baseline (Spark pandas UDF around Hugging Face
LongformerModel, fp32), our job at note granularity into Delta at fp32 (and bf16 where this CPU runs it
faster, or when asked with --precisions), our heavy step alone, a GEMM peak at each precision, scaling with
note length, memory on a stream of notes, and the peer rows: Spark NLP's own LongformerEmbeddings pipeline
against our job at sentence and note context (benchmarks/peer.py; skipped with a one-line reason where Spark NLP's
JVM cannot run, which fails the run under CI=1). The baseline and each job row run --repeat times (3) in one
Spark session each; the median counts and every run's seconds are reported. Base-size synthetic checkpoint
(the real Clinical-Longformer dimensions), MIMIC-III-like mix of note lengths.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from clinlong.benchmarks.inputs import ensure_artifact, local_spark, write_notes
from clinlong.benchmarks.measure import WorkerMemory, flops_per_token, gemm_peak, machine, peak_rss_mb, rss_mb

log = logging.getLogger("clinlong.benchmarks")


def short_mix(n: int) -> list[str]:
    """n notes of the short MIMIC-III categories (ECG, nursing, radiology, physician): where packing pays."""
    from clinlong.export.synthetic_notes import generate_notes

    return [x.text for x in generate_notes(20 * n, seed=8) if x.category != "Discharge summary"][:n]


def short_note_mix(ckpt: Path, art: Path, n: int, threads: int, precisions=("fp32", "bf16")) -> dict:
    """Our heavy step against Hugging Face eager (fp32, length-sorted batches) on short notes, in process."""
    import torch

    from clinlong.benchmarks.baseline import hf_run
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder

    texts = short_mix(n)
    embedder = NoteEmbedder(Artifact.open(art, verify=False), EmbedOptions(precision="fp32"), threads=threads)
    prepared = embedder.prepare(texts)
    tokens = sum(len(r) for r in prepared.runs)
    torch.set_num_threads(threads)
    hf_seconds, _ = hf_run(ckpt, prepared.runs, "cpu", "fp32", sort=True)
    hf_tps = tokens / hf_seconds
    result = {
        "notes": n,
        "bpe_tokens": tokens,
        "mean_tokens_per_note": round(tokens / n, 1),
        "hf_eager_sorted_fp32_tokens_per_s": round(hf_tps, 1),
    }
    for prec in precisions:
        secs, useful, _ = heavy_step(art, texts, prec, threads)
        result[f"ours_heavy_step_{prec}_tokens_per_s"] = round(useful / secs, 1)
        result[f"ours_heavy_step_{prec}_x_hf"] = round(useful / secs / hf_tps, 2)
    return result


def run_baseline(notes: Path, ckpt: Path, out: Path, cores: int, repeat: int) -> tuple[list[float], float]:
    """The baseline `repeat` times in one Spark session: the wall seconds of each run, and peak worker RSS."""
    from clinlong.benchmarks.baseline import embed_udf

    spark = local_spark(cores)
    try:
        seconds = []
        with WorkerMemory() as mem:
            for _ in range(repeat):
                start = time.perf_counter()
                df = spark.read.parquet(str(notes)).repartition(cores)
                df.select("ROW_ID", embed_udf(str(ckpt))("TEXT").alias("embedding")).write.mode("overwrite").parquet(
                    str(out)
                )
                seconds.append(time.perf_counter() - start)
        return seconds, round(mem.peak_mb, 1)
    finally:
        spark.stop()


def run_ours(
    notes: Path, art: Path, out: Path, cores: int, precision: str, repeat: int
) -> tuple[list[float], float, dict]:
    """Our job `repeat` times in one Spark session (each run a new run id, overwriting the table): the wall
    seconds of each run, peak worker RSS, and the last run's summary."""
    from clinlong.pipelines.core.engine import EmbedOptions
    from clinlong.pipelines.jobs.embed_notes import JobConfig, run

    spark = local_spark(cores)
    try:
        seconds = []
        with WorkerMemory() as mem:
            for _ in range(repeat):
                start = time.perf_counter()
                summary = run(
                    JobConfig(
                        notes=str(notes),
                        model=str(art),
                        out=str(out),
                        mode="overwrite",
                        run_id=f"bench-{time.time_ns()}",
                        partitions=cores,
                        options=EmbedOptions(precision=precision),
                    ),
                    spark,
                )
                seconds.append(time.perf_counter() - start)
        return seconds, round(mem.peak_mb, 1), summary
    finally:
        spark.stop()


def heavy_step(art: Path, texts: list[str], precision: str, threads: int) -> tuple[float, int, list[np.ndarray]]:
    """Our encoder alone on pre-tokenized, token-budget batches (tokenization excluded). Tokens are the
    notes' useful tokens (BPE pieces + <s>, </s>), as for every run; window overlaps are overhead."""
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder

    emb = NoteEmbedder(Artifact.open(art, verify=False), EmbedOptions(precision=precision), threads=threads)
    analyzed = [emb.analyze(t) for t in texts]
    runs = [r for _, plan in analyzed for r in plan.run_ids]
    emb.encoder([runs[0][:64]])  # warm-up
    start = time.perf_counter()
    out = emb.encoder(runs)
    return time.perf_counter() - start, sum(res.n_tokens + 2 for res, _ in analyzed), out


def scaling(art: Path, threads: int, repeat: int) -> dict:
    """Seconds and memory per note at 512..4096 tokens; the fitted exponent of time against length."""
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.runtime import Encoder

    encoder = Encoder(Artifact.open(art, verify=False), threads=threads)
    rng = np.random.default_rng(0)
    rows = []
    for n in (512, 1024, 2048, 4096):
        ids = np.concatenate([[0], rng.integers(4, 2000, n - 2), [2]]).astype(np.int64)
        best = min(_timed(lambda: encoder([ids])) for _ in range(repeat))
        rows.append({"tokens": n, "seconds": round(best, 3), "rss_mb": round(rss_mb(), 1)})
    slope = float(np.polyfit(np.log([r["tokens"] for r in rows]), np.log([r["seconds"] for r in rows]), 1)[0])
    return {"per_length": rows, "fitted_exponent": round(slope, 3)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def memory_stream(art: Path, threads: int, chunks: int) -> dict:
    """RSS after each chunk of a stream of notes through one embedder, passing twice over the same chunks:
    allocators keep what the largest shapes needed (the first pass), a leak keeps growing (the second)."""
    from clinlong.export.synthetic_notes import generate_notes
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.engine import NoteEmbedder

    emb = NoteEmbedder(Artifact.open(art, verify=False), threads=threads)
    batches = [[n.text for n in generate_notes(4, seed=10_000 + c)] for c in range(chunks)]
    rss = []
    for texts in batches + batches:
        emb.embed(texts)
        rss.append(round(rss_mb(), 1))
    return {"rss_mb_after_each_chunk": rss, "growth_second_pass_mb": round(max(rss[chunks:]) - max(rss[:chunks]), 1)}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = result["runs"]
    ax1.barh([r["name"] for r in runs], [r["tokens_per_s"] for r in runs], color="#4C72B0")
    for i, r in enumerate(runs):
        ax1.text(r["tokens_per_s"], i, f" {r['tokens_per_s']:.0f} ({r['ratio_vs_baseline']:.2f}x)", va="center")
    ax1.set_xlabel("BPE tokens / s")
    ax1.set_title(f"Throughput ({result['machine']['cores']} cores)")
    sc = result["scaling"]["per_length"]
    ax2.loglog([r["tokens"] for r in sc], [r["seconds"] for r in sc], "o-")
    ax2.set_xlabel("note length (BPE tokens)")
    ax2.set_ylabel("seconds per note")
    ax2.set_title(f"Heavy step, fp32: time ∝ length^{result['scaling']['fitted_exponent']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict) -> str:
    head = (
        f"{'run':<32} {'notes':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'x base':>6} {'GFLOP/s':>7} "
        f"{'of peak':>7} {'RSS MB':>7} {'cos fp32':>8}"
    )
    lines = [head]
    for r in result["runs"]:
        cos = r.get("cosine_to_fp32_min")
        lines.append(
            f"{r['name']:<32} {r['notes']:>5} {r['bpe_tokens']:>7} {r['wall_s']:>7.1f} "
            f"{r['tokens_per_s']:>7.0f} {r['ratio_vs_baseline']:>6.2f} {r['gflops']:>7.1f} "
            f"{r['fraction_of_peak']:>7.2f} {(r['peak_rss_mb_per_worker'] or 0):>7.0f} "
            f"{'' if cos is None else f'{cos:.5f}':>8}"
        )
    lines.append(
        f"wall s: median of {result['repeat']} runs per row ("
        + "; ".join(
            f"{r['name']}: {', '.join(map(str, r['wall_s_runs']))}" for r in result["runs"] if "wall_s_runs" in r
        )
        + ")"
    )
    if result["skipped"]:
        lines.append(result["skipped"])
    p = result["gemm_peak_gflops"]
    lines.append(
        f"GEMM peak ({result['threads']} threads): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in p.items())
        + f"; {result['flops_per_token'] / 1e6:.1f} MFLOP per token"
    )
    sm = result["short_note_mix"]
    lines.append(
        f"short-note mix ({sm['notes']} notes, {sm['mean_tokens_per_note']} tokens each): "
        f"Hugging Face eager fp32 {sm['hf_eager_sorted_fp32_tokens_per_s']:.0f} tok/s; our heavy step "
        + ", ".join(
            f"{k} {sm[f'ours_heavy_step_{k}_tokens_per_s']:.0f} ({sm[f'ours_heavy_step_{k}_x_hf']}x)"
            for k in result["precisions"]
        )
    )
    mc = result["machine"]
    lines.append(
        f"machine: {mc['cpu']}, {mc['cores']} cores; bf16 hardware: "
        f"{', '.join(k for k in ('avx512_bf16', 'amx_bf16') if mc[k]) or 'none'} -> precision auto = "
        f"{mc['precision_auto']}"
    )
    s = result["scaling"]
    lines.append(
        "scaling (fp32 heavy step): "
        + ", ".join(f"{r['tokens']}: {r['seconds']:.2f} s" for r in s["per_length"])
        + f"; fitted exponent {s['fitted_exponent']}"
    )
    m = result["memory_stream"]
    lines.append(
        f"memory on a stream: RSS {m['rss_mb_after_each_chunk'][0]} -> {m['rss_mb_after_each_chunk'][-1]} MB, "
        f"growth over a second pass through the same notes {m['growth_second_pass_mb']} MB"
    )
    if result.get("peer"):
        from clinlong.benchmarks.peer import format_peer

        lines.append(format_peer(result["peer"]))
    for key in ("peer_skipped", "peer_failed"):
        if result.get(key):
            lines.append(result[key])
    t = result["seconds"]
    lines.append(f"took {t['benchmark']} s (+ {t['setup_checkpoint_and_export']} s one-time checkpoint and export)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinlong.benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer notes and repeats; under 5 minutes on 2 cores")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="PNG path (default: next to --json, else WORK/benchmark.png)")
    p.add_argument("--work", default="work/bench", help="folder for the checkpoint, artifact, notes and outputs")
    p.add_argument("--repeat", type=int, default=3, help="runs of the baseline and of each job row; the median counts")
    p.add_argument(
        "--precisions",
        help="fp32,bf16 (default: bf16 too only where precision auto picks it, i.e. "
        "where this CPU's bf16 hardware is faster)",
    )
    p.add_argument(
        "--no-peer",
        action="store_true",
        help="leave out the peer rows (Spark NLP's own pipeline; "
        "benchmarks/peer.py), said in the output; under CI=1 the run then fails",
    )
    args = p.parse_args(argv)
    from clinlong.pipelines.core.logs import configure

    configure()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    n_notes, n_long = (8, 1) if args.quick else (40, 8)
    auto = machine()["precision_auto"]
    precisions = args.precisions.split(",") if args.precisions else ["fp32", *(["bf16"] if auto == "bf16" else [])]
    skipped = (
        ""
        if "bf16" in precisions
        else (
            "bf16 rows skipped: precision auto picks fp32 on this CPU (no bf16 hardware that is faster here); "
            "pass --precisions fp32,bf16 to run them"
        )
    )
    started = time.perf_counter()
    ckpt, art = ensure_artifact(work)
    setup_s = time.perf_counter() - started
    from clinlong.pipelines.core.artifact import Artifact

    fpt = flops_per_token(Artifact.open(art, verify=False).encoder_config)
    notes_path, texts = write_notes(work, n_notes, n_long)
    peaks = {prec: gemm_peak(prec, cores) for prec in precisions}
    log.info(
        f"{n_notes} notes, {args.repeat} runs per row; GEMM peak "
        + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        + f" GFLOP/s on {cores} threads"
    )
    if skipped:
        log.info(skipped)

    from clinlong.benchmarks.baseline import tokens_processed

    runs = []
    log.info("baseline: Spark pandas UDF + Hugging Face LongformerModel, fp32")
    secs, rss = run_baseline(notes_path, ckpt, work / "baseline.parquet", cores, args.repeat)
    base_tokens = tokens_processed(str(ckpt), texts)
    runs.append(
        {
            "name": "baseline_pandas_udf_hf_fp32",
            "precision": "fp32",
            "notes": n_notes,
            "bpe_tokens": base_tokens,
            "wall_s": float(np.median(secs)),
            "wall_s_runs": [round(x, 2) for x in secs],
            "peak_rss_mb_per_worker": rss,
        }
    )
    job_tables = {}
    for prec in precisions:
        log.info(f"our job, note granularity into Delta, {prec}")
        out = work / f"delta-{prec}"
        secs, rss, summary = run_ours(notes_path, art, out, cores, prec, args.repeat)
        job_tables[prec] = out
        runs.append(
            {
                "name": f"ours_job_delta_{prec}",
                "precision": prec,
                "notes": summary["rows_in"],
                "bpe_tokens": summary["bpe_tokens"] + 2 * summary["embedded"],
                "wall_s": float(np.median(secs)),
                "wall_s_runs": [round(x, 2) for x in secs],
                "peak_rss_mb_per_worker": rss,
            }
        )
    heavy = {}
    for prec in precisions:
        log.info(f"our heavy step alone, {prec}")
        secs, tokens, out = heavy_step(art, texts, prec, cores)
        heavy[prec] = out
        runs.append(
            {
                "name": f"ours_heavy_step_{prec}",
                "precision": prec,
                "notes": n_notes,
                "bpe_tokens": tokens,
                "wall_s": secs,
                "peak_rss_mb_per_worker": round(peak_rss_mb(), 1),
            }
        )

    token_cos = note_cos = None
    if "bf16" in precisions:
        from clinlong.pipelines.delta.sink import read_table

        token_cos = float(min(cosine_rows(a, b).min() for a, b in zip(heavy["fp32"], heavy["bf16"])))
        t32, t16 = (
            read_table(str(job_tables[p]), ["note_id", "embedding"]).to_pandas().sort_values("note_id")
            for p in ("fp32", "bf16")
        )
        note_cos = float(cosine_rows(np.stack(t32.embedding), np.stack(t16.embedding)).min())
    base_tps = runs[0]["bpe_tokens"] / runs[0]["wall_s"]
    for r in runs:
        r["wall_s"] = round(r["wall_s"], 2)
        r["tokens_per_s"] = round(r["bpe_tokens"] / r["wall_s"], 1)
        r["notes_per_s"] = round(r["notes"] / r["wall_s"], 3)
        r["ratio_vs_baseline"] = round(r["tokens_per_s"] / base_tps, 2)
        r["gflops"] = round(r["tokens_per_s"] * fpt / 1e9, 1)
        r["fraction_of_peak"] = round(r["gflops"] / peaks[r["precision"]], 3)
        if r["precision"] == "bf16":
            r["cosine_to_fp32_min"] = round(token_cos if "heavy" in r["name"] else note_cos, 6)
    log.info("short-note mix: our heavy step against Hugging Face eager")
    short = short_note_mix(ckpt, art, 12 if args.quick else 120, cores, precisions)
    log.info("scaling and memory")
    result = {
        "machine": machine(),
        "threads": cores,
        "quick": args.quick,
        "flops_per_token": fpt,
        "flops_formula": "per layer 2*(4*d^2 + 2*d*d_ff) + 4*d*(w+1), summed over layers",
        "gemm_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "runs": runs,
        "repeat": args.repeat,
        "precisions": precisions,
        "skipped": skipped,
        "cosine_bf16_vs_fp32": (
            {"per_token_min": round(token_cos, 6), "per_note_min": round(note_cos, 6)}
            if token_cos is not None
            else None
        ),
        "short_note_mix": short,
        "scaling": scaling(art, cores, 1 if args.quick else 3),
        "memory_stream": memory_stream(art, cores, 3 if args.quick else 8),
    }
    result.update(peer_rows(work, args.quick, cores, args.no_peer))
    result["seconds"] = {
        "setup_checkpoint_and_export": round(setup_s, 1),
        "benchmark": round(time.perf_counter() - started - setup_s, 1),
    }
    png = Path(args.plot) if args.plot else Path(args.json).with_suffix(".png") if args.json else work / "benchmark.png"
    plot(result, png)
    result["plot"] = str(png)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"plot: {png}")
    return 1 if result.get("peer_failed") or (result.get("peer_skipped") and os.environ.get("CI")) else 0


def peer_rows(work: Path, quick: bool, cores: int, no_peer: bool) -> dict:
    """Spark NLP's own pipeline beside our job (benchmarks/peer.py): {"peer": rows}, or a one-line reason why
    not ({"peer_skipped": ...}, which fails the run under CI=1), or the failure ({"peer_failed": ...})."""
    from clinlong.benchmarks import peer

    if no_peer:
        return {"peer": None, "peer_skipped": "peer rows skipped: --no-peer"}
    reason = peer.unavailable()
    if reason:
        return {"peer": None, "peer_skipped": f"peer rows skipped: Spark NLP's JVM: {reason}"}
    log.info("peer: Spark NLP's LongformerEmbeddings pipeline against our job")
    try:
        return {"peer": peer.peer_benchmark(work, quick, cores)}
    except RuntimeError as e:
        return {
            "peer": None,
            "peer_failed": f"peer rows failed: {str(e).splitlines()[0]}",
            "peer_failure": str(e)[-3000:],
        }


if __name__ == "__main__":
    raise SystemExit(main())
