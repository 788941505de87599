"""`python -m clinlong.benchmarks --quick` runs in CI: its figures are printed, never asserted as times."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


def test_flops_formula_gives_clinical_longformers_189_mflop():
    from clinlong.benchmarks.measure import flops_per_token
    from clinlong.export.synthetic import CLINICAL_LONGFORMER_CONFIG

    assert abs(flops_per_token(CLINICAL_LONGFORMER_CONFIG) / 1e6 - 188.8) < 0.1


@pytest.fixture(scope="module")
def bench_work(tmp_path_factory):
    """The benchmark's folder with the base-size (real Clinical-Longformer config) synthetic checkpoint
    exported once in this run: the export's parity is tested below, then the benchmark reuses it."""
    from clinlong.benchmarks.__main__ import ensure_artifact

    work = tmp_path_factory.mktemp("bench")
    start = time.perf_counter()
    ensure_artifact(work)
    print(f"\nbase checkpoint and export {time.perf_counter() - start:.1f} s")
    return work


@pytest.mark.slow
def test_base_size_parity(bench_work):
    """The real Clinical-Longformer dimensions: 12 layers, hidden 768, windows 512, at every parity length."""
    from clinlong.export.parity import PARITY_LENGTHS

    art = bench_work / "artifact-base"
    report = json.loads((art / "parity.json").read_text())
    manifest = json.loads((art / "manifest.json").read_text())
    print(f"base export: max|diff| {report['max_abs_diff']:.2e}, min cosine {report['min_cosine']:.7f}")
    assert report["passed"] and report["max_abs_diff"] <= 1e-3 and report["min_cosine"] >= 0.99999
    assert {r["length"] for r in report["results"]} == set(PARITY_LENGTHS)
    assert manifest["dimension"] == 768 and manifest["attention_windows"] == [512] * 12


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the base-size export (the bench_work fixture) counts against it too
def test_benchmark_quick_reports_every_figure(bench_work, tmp_path, record_property):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable}
    # Two runs per side keep the suite's time down (the CLI's default is three); the median is still taken.
    proc = subprocess.run([sys.executable, "-m", "clinlong.benchmarks", "--quick", "--repeat", "2", "--json",
                           str(out), "--work", str(bench_work)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1500)
    record_property("ci_figures", proc.stdout)  # printed at the end of the run (conftest), for the CI log
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["runs"]]
    bf16 = result["machine"]["precision_auto"] == "bf16"  # bf16 rows only where this CPU runs bf16 faster
    assert result["precisions"] == (["fp32", "bf16"] if bf16 else ["fp32"])
    assert bf16 or "bf16 rows skipped: precision auto picks fp32" in proc.stdout
    assert names == ["baseline_pandas_udf_hf_fp32", *[f"ours_job_delta_{p}" for p in result["precisions"]],
                     *[f"ours_heavy_step_{p}" for p in result["precisions"]]]
    for r in result["runs"]:  # the median of the runs of each side
        if "wall_s_runs" in r:
            assert len(r["wall_s_runs"]) == 2 and r["wall_s"] == pytest.approx(sum(r["wall_s_runs"]) / 2, abs=0.02)
    assert "median of 2 runs per row" in proc.stdout
    for r in result["runs"]:
        for key in ("notes", "bpe_tokens", "wall_s", "tokens_per_s", "ratio_vs_baseline", "gflops",
                    "fraction_of_peak", "peak_rss_mb_per_worker"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
    assert all("cosine_to_fp32_min" in r for r in result["runs"] if r["precision"] == "bf16")
    assert [s["tokens"] for s in result["scaling"]["per_length"]] == [512, 1024, 2048, 4096]
    assert math.isfinite(result["scaling"]["fitted_exponent"])
    assert len(result["memory_stream"]["rss_mb_after_each_chunk"]) >= 4
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_gpu_benchmark_runs_without_a_gpu_or_spark(tmp_path):
    """`python -m clinlong.benchmarks.gpu` on the CPU (tiny model, few notes): every row it reports on a GPU,
    Hugging Face and ours from one run, with ours agreeing with Hugging Face fp32 — and no pyspark imported."""
    script = ("import sys, json; from clinlong.benchmarks.gpu import main; "  # the README's smoke run, as written
              f"rc = main(['--device', 'cpu', '--size', 'tiny', "
              f"'--work', {str(tmp_path)!r}, '--json', {str(tmp_path / 'gpu.json')!r}]); "
              "assert 'pyspark' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    names = [r["name"] for r in result["runs"]]
    assert names == ["hf_eager_8_rows", "hf_eager_sorted", "ours_model_blocks", "ours_with_preparation_blocks"]
    for r in result["runs"]:
        for key in ("tokens_per_s", "tflops", "fraction_of_peak", "mimic_hours"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
    ours = [r for r in result["runs"] if r["name"].startswith("ours")]
    assert ours[0]["min_cosine_to_hf_fp32"] >= 0.999 and 0 <= ours[1]["model_waits_for_preparation"] <= 1
    assert all(r["x_hf_sorted"] > 0 for r in ours)
    assert result["preparation_tokens_per_s_per_core"] > 0 and result["useful_tokens"] > 0
