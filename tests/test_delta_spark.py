"""delta-spark and Spark's s3a:// for real (issue 21): the Delta and hadoop-aws JARs resolved once per machine
from the project's own files (pipelines/spark/jars.py), the job through Spark's Delta writer at every
granularity and mode with vectors equal to the delta-rs writer's, resume after a kill -9 of the driver, two
jobs on one table, Delta inputs delta-rs refuses (deletion vectors, column mapping), tables by name in a Hive
metastore, interchange with delta-rs, and s3a:// inputs and outputs on moto's S3 server, the README's
spark-submit example included.

The suite's shared session (conftest `spark`) has no JARs, so the other tests keep the delta-rs default; the
checks that need a session with the JARs run in one process of their own (a JVM takes its JARs at start),
which starts the two runs that need drivers of their own."""

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
from tests.test_at_scale import s3, short_notes  # noqa: F401 (fixture)


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
    # spark-submit's options: the resolved files, Delta's extension and catalog, the endpoint; never a secret
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-in-conf")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    args = jars.submit_args(("delta", "s3a"), endpoint="http://127.0.0.1:9000")
    assert args[:2] == ["--jars", ",".join(jars.resolve(("delta", "s3a")))] and "not-in-conf" not in " ".join(args)
    assert dict(a.split("=", 1) for a in args[3::2]) == {
        "spark.sql.extensions": jars.DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": jars.DELTA_CATALOG,
        "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9000",
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
        "spark.hadoop.fs.s3a.endpoint.region": "eu-west-1",
    }
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
@pytest.mark.usefixtures("s3")
def test_delta_spark_and_s3a_end_to_end(delta_jars, tiny_artifact, head_model, tmp_path, record_property):
    """One process with Delta's and hadoop-aws' JARs (tests/delta_spark_checks.py), which also starts the two runs
    that need drivers of their own: every granularity through Spark's Delta writer (`auto` picks it) equal to the
    delta-rs writer's table, commit info and numRecords equal to the summary, a rerun commits nothing; an input
    with deletion vectors and an output with them (MERGE), a task re-executed and an `embed` error cleared by the
    next incremental run; a column-mapped input; tables by name in a Hive metastore; a delta-rs table optimised
    and vacuumed by delta-spark; a job killed with SIGKILL between commits then resumed, while another job
    appended to its table; s3a:// for real (moto's S3 server): Parquet, Delta and CSV inputs read by Spark, each
    writer resuming a table the other began in the bucket, the README's spark-submit example. Then, here: the
    tables read by delta-rs, Polars and DuckDB, and `maintain` on an s3a:// table with --storage-option."""
    from tests.test_at_scale import BUCKET

    for name, n, seed in (("n12", 12, 3), ("n3", 3, 3), ("n24", 24, 3), ("b6", 6, 5)):
        short_notes(tmp_path / f"{name}.csv", n, seed=seed)
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "delta_spark_checks.py"),
            str(tmp_path),
            str(tiny_artifact),
            BUCKET,
            json.dumps({"classify": str(head_model("sequence")[1]), "ner": str(head_model("token")[1])}),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for g, rows, info in (("note", 12, [0, 1]), ("sentence", None, [0]), ("token", None, [0])):
        f = r[g]
        assert f["keys_equal"] and f["max_diff"] <= 1e-6, (g, f)
        assert f["rows"] == f["summary_rows"] == f["add_records"] == f["history_rows"], (g, f)
        assert f["info"] == info and f["ops"] == ["WRITE"] * len(info) and "Delta-Lake" in f["engine"], (g, f)
        assert rows is None or f["rows"] == rows
    assert r["sentence"]["rows"] > 3 and r["token"]["rows"] > r["sentence"]["rows"]
    for task in ("classify", "ner"):  # the heads' tasks (issue 24): delta-spark's table is delta-rs' table
        f = r[task]
        assert f["same_rows"] and f["max_diff"] <= 1e-6 and f["embedded"] == 3 and f["rows"] == f["summary_rows"], f
    assert r["classify"]["rows"] == 3 and r["ner"]["rows"] >= 3
    assert r["rerun"]["resumed_from"] == r["rerun"]["chunks"] == 2 and r["rerun"]["version"] == r["rerun"]["before"]
    assert r["auto_writer"] == "delta-spark"
    # A worker killed after its rows (the task re-executed) and a note the model step refused: the totals equal the
    # committed numRecords and numOutputRows; the refused note is an `embed` error row.
    f = r["faults"]
    assert (
        f["task_killed"]
        and f["rows_in"] == 12
        and f["embedded"] == 11
        and f["errors"] == {"embed: InjectedFault in the model step": 1}
    ), f
    assert f["rows_written"] == f["add_records"] == f["history_rows"] == 11 and f["error_rows"] == [[7, "embed"]]
    dv = r["incremental_dv"]
    assert dv["dv_feature"] and dv["input_rows"] == 10 and dv["first"] == 12
    assert dv["second"] == 3 and dv["stale"] == 2 and dv["retried"] == 1 and dv["errors_left"] == 0, dv
    assert dv["ops"][-1] == "MERGE" and dv["ops"].count("MERGE") == 1 and dv["error_ops"].count("MERGE") == 1, dv
    assert dv["out_rows"] == 12 and dv["out_ids"] == list(range(1, 13))  # 5 and 6 replaced, each note once
    assert r["column_mapping"] == {"rows_in": 12, "embedded": 12}
    named = r["named"]
    assert named["first"] == 12 and named["then"] == 1  # the inserted row alone: the input's version changed
    assert named["tables"] == ["note_embeddings", "note_embeddings_errors", "noteevents"]  # no temporary view left
    assert named["provider"] == "delta"
    assert named["schema"] == ["note_id", "n_tokens", "n_windows", "embedding", "model_id", "text_sha256"]
    assert r["interchange"]["rows"] == 12 and r["interchange"]["files_after"] == 1
    # Killed between chunk 1's errors and output commits: chunk 0 only; the rerun resumed at chunk 1. The partner
    # job committed its run into the same table meanwhile: 24 + 6 rows, each (note, text) once.
    k = r["kill9"]
    assert k["rc"] == -9 and k["txn_before"] == 0 and k["resumed_from"] == 1 and k["chunks"] == 3, k
    assert k["rows"] == 30 and k["duplicates"] == 0 and k["ids"] == list(range(1, 25)) and k["partner_txn"] == 0, k
    assert r["partner"]["rows_in"] == 6
    # s3a://: each writer resumed the other's table at chunk 1; both resume checks read the bucket's log
    for first, then in (("delta-spark", "delta-rs"), ("delta-rs", "delta-spark")):
        c = r["s3a"][first]
        assert c["stopped"] and c["resumed_from"] == 1 and c["chunks"] == 2 and c["rows_in"] < 12, c
        assert c["txn"] == {"delta-spark": 1, "delta-rs": 1}, c
        assert c["keys_equal"] and c["rows"] == 12 and c["max_diff"] <= 1e-6, c
        assert ("Delta-Lake" in c["first_engine"]) == (first == "delta-spark"), c
        assert ("Delta-Lake" in c["then_engine"]) == (then == "delta-spark"), c
    # The run fingerprint is what Spark lists in the bucket (the CSV: its s3a:// path and size) or the Delta version.
    kind, name, files = r["fingerprints"]["csv"]
    assert kind == "csv" and name == f"s3a://{BUCKET}/NOTEEVENTS/" and len(files) == 1
    assert files[0][:2] == [f"s3a://{BUCKET}/NOTEEVENTS/notes.csv", (tmp_path / "n12.csv").stat().st_size]
    assert r["fingerprints"]["delta"] == ["delta", f"s3a://{BUCKET}/notes_delta", 0]
    sub = r["submit"]
    assert sub["rc"] == 0 and sub["summary"] == ["rows in 12, embedded 12, errors 0 (none)"], sub
    assert "Delta-Lake" in sub["engine"] and sub["ops"] == ["WRITE"] and sub["keys_equal"] and sub["max_diff"] <= 1e-6

    # The tables delta-spark wrote, read by delta-rs (locally and in the bucket), Polars and DuckDB.
    import polars as pl

    from tests.test_exactly_once import _duckdb

    ds = str(tmp_path / "ds_note")
    want = DeltaTable(str(tmp_path / "rs_note")).to_pandas().sort_values("note_id")
    for got in (DeltaTable(ds).to_pandas(), DeltaTable(f"s3://{BUCKET}/delta/note_embeddings").to_pandas()):
        got = got.assign(note_id=got.note_id.astype("int64")).sort_values("note_id")
        assert got.note_id.tolist() == want.note_id.tolist()
        np.testing.assert_allclose(np.stack(got.embedding), np.stack(want.embedding), atol=1e-6)
    assert pl.read_delta(ds).height == 12
    assert _duckdb().sql(f"SELECT count(*) FROM delta_scan('{ds}')").fetchone()[0] == 12

    # maintain on an s3a:// table (opened as s3://), the endpoint given as --storage-option alone, as the job takes it
    from clinlong.pipelines.delta.maintain import main as maintain

    table = f"s3a://{BUCKET}/ds_then_rs"
    files_before = len(DeltaTable(f"s3://{BUCKET}/ds_then_rs").file_uris())
    endpoint = os.environ.pop("AWS_ENDPOINT_URL")
    try:
        assert maintain([table, "--compact", "--storage-option", "AWS_ENDPOINT_URL"]) == 2  # KEY=VALUE: one line
        assert (
            maintain(
                [
                    table,
                    "--compact",
                    "--vacuum",
                    "--retention-hours",
                    "0",
                    "--force",
                    "--storage-option",
                    f"AWS_ENDPOINT_URL={endpoint}",
                ]
            )
            == 0
        )
    finally:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    after = DeltaTable(f"s3://{BUCKET}/ds_then_rs")
    assert len(after.file_uris()) == 1 < files_before and len(after.to_pandas()) == 12
    record_property(
        "ci_figures", f"delta-spark and s3a checks: {time.perf_counter() - start:.0f} s, sections {r['seconds']}"
    )
