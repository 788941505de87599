"""delta-spark and Spark's JARs for real (issue 21): the Delta and hadoop-aws JARs resolved once per machine
from the project's own files (pipelines/spark/jars.py), the job through Spark's Delta writer at every
granularity and mode with vectors equal to the delta-rs writer's, resume after a kill -9 of the driver, two
jobs on one table, Delta inputs delta-rs refuses (deletion vectors, column mapping), tables by name in a Hive
metastore, and interchange with delta-rs.

The suite's shared session (conftest `spark`) has no JARs, so the other tests keep the delta-rs default; the
checks that need a session with the JARs run in processes of their own (a JVM takes its JARs at start)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from deltalake import DeltaTable

from tests.conftest import ROOT
from tests.test_at_scale import job, short_notes


@pytest.fixture(scope="module")
def delta_jars():
    """The Delta JARs, resolved on first use on this machine (Spark's Ivy, else Maven), then cached."""
    from clinlong.pipelines.spark import jars

    start = time.perf_counter()
    paths = jars.resolve(("delta",))
    return paths, time.perf_counter() - start


def test_jar_coordinates_follow_the_installed_spark(delta_jars, tmp_path, monkeypatch):
    import pyspark

    from clinlong.pipelines.spark import jars

    coords = jars.coordinates()
    mm = ".".join(pyspark.__version__.split(".")[:2])
    assert coords[0].startswith(f"io.delta:delta-spark_{mm}_2.13:")
    assert coords[1].startswith("org.apache.hadoop:hadoop-aws:")
    assert coords[1].split(":")[-1] == jars._bundled("hadoop-client-api")  # Spark's own Hadoop line
    paths, _ = delta_jars
    assert any("delta-spark" in p for p in paths) and all(os.path.isfile(p) for p in paths)
    assert jars.job_kinds("auto", ("n.csv", "/x/out", "/x/out_errors")) == ()  # the embedded default: no JARs
    assert jars.job_kinds("delta-spark", ("s3a://b/n", "/x/o", "/x/e")) == ("delta", "s3a")
    assert jars.job_kinds("auto", ("n.csv", "db.emb", "db.emb_errors")) == ("delta",)
    with pytest.raises(jars.JarError, match="unknown JAR kind"):
        jars.coordinates(("kafka",))
    # Neither resolver can: one line naming the coordinates and both causes, never a silent skip.
    monkeypatch.setenv("CLINLONG_JARS", str(tmp_path / "jars"))
    monkeypatch.setattr(jars, "_ivy", lambda *a: (_ for _ in ()).throw(jars.JarError("unresolved dependency: x")))
    monkeypatch.setattr(jars.shutil, "which", lambda name: None)
    with pytest.raises(jars.JarError) as e:
        jars.resolve(("delta",))
    msg = str(e.value)
    assert "\n" not in msg and "io.delta:delta-spark" in msg and "Spark's Ivy" in msg and "mvn is not on PATH" in msg


@pytest.mark.slow
def test_delta_spark_writer_end_to_end(delta_jars, tiny_artifact, tmp_path, record_property):
    """One process with the JARs (tests/delta_spark_checks.py): every granularity through Spark's Delta
    writer (`auto` picks it) equals the delta-rs writer's table, commit info and numRecords match the
    summary, a rerun commits nothing; a Delta input with deletion vectors and one with column mapping;
    an output with deletion vectors merged; tables by name in a Hive metastore; a delta-rs table optimised
    and vacuumed by delta-spark."""
    notes = short_notes(tmp_path / "n.csv", 12)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "delta_spark_checks.py"), str(tmp_path), str(notes),
                           str(tiny_artifact)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for g, rows in (("note", 12), ("sentence", None), ("token", None)):
        f = r[g]
        assert f["keys_equal"] and f["max_diff"] <= 1e-6, (g, f)
        assert f["rows"] == f["summary_rows"] == f["add_records"] == f["history_rows"], (g, f)
        assert f["info"] == [0, 1] and f["ops"] == ["WRITE", "WRITE"]
        assert rows is None or f["rows"] == rows
    assert r["rerun"]["resumed_from"] == r["rerun"]["chunks"] == 2 and r["rerun"]["version"] == r["rerun"]["before"]
    assert r["auto_writer"] == "delta-spark"
    dv = r["incremental_dv"]
    assert dv["dv_feature"] and dv["input_rows"] == 10 and dv["first"] == 12
    assert dv["second"] == 2 and dv["stale"] == 2 and dv["ops"][-1] == "MERGE" and dv["ops"].count("MERGE") == 1
    assert dv["out_rows"] == 12  # the two changed notes replaced, each note once
    assert r["column_mapping"] == {"rows_in": 12, "embedded": 12}
    named = r["named"]
    assert named["first"] == 12 and named["again"] == 0 and named["third"] == 1
    assert {"note_embeddings", "note_embeddings_errors"} <= set(named["tables"]) and named["provider"] == "delta"
    assert named["schema"] == ["note_id", "n_tokens", "n_windows", "embedding", "model_id", "text_sha256"]
    assert r["interchange"]["rows"] == 12 and r["interchange"]["files_after"] == 1
    # A table delta-spark wrote, read by delta-rs, Polars and DuckDB.
    import polars as pl

    ds = str(tmp_path / "ds_note")
    want = DeltaTable(str(tmp_path / "rs_note")).to_pandas().sort_values("note_id")
    got = DeltaTable(ds).to_pandas().sort_values("note_id")
    np.testing.assert_allclose(np.stack(got.embedding), np.stack(want.embedding), atol=1e-6)
    assert pl.read_delta(ds).height == 12
    from tests.test_exactly_once import _duckdb

    assert _duckdb().sql(f"SELECT count(*) FROM delta_scan('{ds}')").fetchone()[0] == 12
    record_property("ci_figures", f"delta-spark checks: {time.perf_counter() - start:.0f} s in one process")


@pytest.mark.slow
def test_kill9_resume_and_two_jobs_on_one_table(delta_jars, tiny_artifact, tmp_path):
    """--writer delta-spark: the driver killed (SIGKILL) between a chunk's errors and output commits, then
    rerun: every note exactly once, resumed from the committed txn actions. Two jobs started together append
    to one table that neither has created: both commit, the table is their union."""
    notes = short_notes(tmp_path / "n.csv", 24)
    out = tmp_path / "emb"
    args = ["--notes", str(notes), "--model", str(tiny_artifact), "--out", str(out), "--id-type", "long",
            "--writer", "delta-spark", "--master", "local[2]", "--progress-every", "0", "--chunk-notes", "8"]
    killed = job(args, {"CLINLONG_FAULTPOINT": "driver-between-commits:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert DeltaTable(str(out)).transaction_version(_app_id(out)) == 0  # chunk 0 only
    again = job(args)
    assert again.returncode == 0 and "resumed at chunk 1" in again.stdout, again.stderr[-3000:]
    ids = DeltaTable(str(out)).to_pandas().note_id.tolist()
    assert sorted(ids) == list(range(1, 25))  # 0 duplicates, 0 missing

    a, b = short_notes(tmp_path / "a.csv", 6), short_notes(tmp_path / "b.csv", 6, seed=5)
    both = tmp_path / "both"
    procs = [subprocess.Popen([sys.executable, "-m", "clinlong.pipelines.embed_notes", "--notes", str(n), "--model",
                               str(tiny_artifact), "--out", str(both), "--writer", "delta-spark", "--master",
                               "local[1]", "--progress-every", "0", "--run-id", n.stem], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in (a, b)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    table = DeltaTable(str(both))
    assert len(table.to_pandas()) == 12 and {table.transaction_version("clinlong-a"),
                                             table.transaction_version("clinlong-b")} == {0}


def _app_id(out) -> str:
    info = [json.loads(h["userMetadata"]) for h in DeltaTable(str(out)).history() if h.get("userMetadata")]
    return f"clinlong-{info[0]['run_id']}"
