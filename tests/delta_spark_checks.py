"""Checks that need a Spark session with Delta's and hadoop-aws' JARs, run by tests/test_delta_spark.py in a
process of their own: one JVM for all of them (a JVM takes its JARs at start; the suite's shared session has none,
so its jobs keep the delta-rs default). Only what needs another driver runs in another process: the README's
spark-submit example (s3a:// in and out) and a `python -m` job killed with SIGKILL, both started first so that
their start-up overlaps this one's.

    python tests/delta_spark_checks.py WORK ARTIFACT BUCKET [HEADS]  -> one JSON line of findings on stdout

HEADS: JSON {"classify": ARTIFACT, "ner": ARTIFACT} of fine-tuned heads' exports, run as the job's tasks.

WORK holds the notes (n12.csv, n3.csv, n24.csv, b6.csv); the AWS_* variables point at an S3 server with BUCKET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "note": ["note_id"],
    "sentence": ["note_id", "sentence_index"],
    "token": ["note_id", "sentence_index", "token_index"],
}


def session(tmp: str):
    from pyspark.sql import SparkSession

    from clinlong.pipelines.spark import jars

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master("local[2,4]")
        .appName("clinlong-delta-spark-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.sql.sources.parallelPartitionDiscovery.parallelism", "2")
        .config("spark.sql.catalogImplementation", "hive")
        .config("spark.sql.warehouse.dir", f"{tmp}/warehouse")
        .config("spark.hadoop.javax.jdo.option.ConnectionURL", f"jdbc:derby:;databaseName={tmp}/metastore;create=true")
    )
    for k, v in jars.s3a_conf().items():
        builder = builder.config(k, v)
    spark = jars.configure(builder, ("delta", "s3a")).getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def vectors(df, keys):
    """Keys (note ids as text: a CSV read without --id-type keeps them strings) and vectors, in key order."""
    pdf = df.withColumn("note_id", df["note_id"].cast("string")).toPandas().sort_values(keys)
    return pdf[keys].values.tolist(), np.stack(pdf.embedding.map(np.asarray))


def same(spark, a: str, b: str, keys=("note_id",)) -> dict:
    """Keys and vectors of two tables (read by delta-spark, any location) compared."""
    k1, v1 = vectors(spark.read.format("delta").load(a), list(keys))
    k2, v2 = vectors(spark.read.format("delta").load(b), list(keys))
    return {"keys_equal": k1 == k2, "rows": len(k1), "max_diff": float(np.abs(v1 - v2).max()) if k1 == k2 else None}


class Stop(Exception):
    """The driver stopping right after its first chunk commit (an in-process stand-in for a crash there)."""


def stopped_after_first_commit(fn):
    """Run `fn` with the driver failpoint after a commit raising Stop (the job's own failpoint kills the process,
    which is checked with the python -m job); return what reached the table before."""
    from clinlong.pipelines.core import faults

    real = faults.point

    def point(name):
        if name == "driver-after-commit":
            raise Stop()

    faults.point = point
    try:
        fn()
    except Stop:
        return True
    finally:
        faults.point = real
    return False


def history(spark, uri: str) -> list:
    return spark.sql(f"DESCRIBE HISTORY delta.`{uri}`").orderBy("version").collect()


class Seconds(dict):
    """Seconds per section, also printed to stderr as each ends (the test shows them when it fails)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"[checks] {key}: {value} s", file=sys.stderr, flush=True)


def head_tables(spark, a: str, b: str, task: str) -> dict:
    """Two tables of a head task (read by delta-spark) compared: their keys and labels equal, the largest score
    difference."""
    keys = ["note_id"] if task == "classify" else ["note_id", "chunk_index"]
    exact = ["label", "labels", "n_windows"] if task == "classify" else ["begin", "end", "chunk", "entity"]
    score = "scores" if task == "classify" else "score"
    t1, t2 = (spark.read.format("delta").load(x).toPandas().sort_values(keys).reset_index(drop=True) for x in (a, b))
    same_rows = len(t1) == len(t2) and all(t1[c].astype(str).equals(t2[c].astype(str)) for c in keys + exact)
    diff = None
    if same_rows and len(t1):
        s1, s2 = (np.asarray(t[score].tolist(), np.float64) for t in (t1, t2))
        diff = float(np.nanmax(np.abs(s1 - s2))) if np.isfinite(s1).any() else 0.0
    return {"rows": len(t1), "same_rows": same_rows, "max_diff": diff}


def main(tmp: str, model: str, bucket: str, heads: str = "{}") -> dict:
    from clinlong.pipelines.spark import jars

    t0 = time.perf_counter()
    seconds = Seconds()
    found: dict = {"seconds": seconds}
    w = Path(tmp)
    n12, n3, n24, b6 = (str(w / n) for n in ("n12.csv", "n3.csv", "n24.csv", "b6.csv"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable}

    # The README's spark-submit example (section "Running on a cluster"), as written but for the master (local) and
    # the JARs/endpoint: Spark reads the CSV folder on s3a://, delta-spark writes the output to s3a://.
    import boto3

    boto3.client("s3").upload_file(n12, bucket, "NOTEEVENTS/notes.csv")
    submit_out = f"s3a://{bucket}/delta/note_embeddings"
    submit = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("spark-submit")),
            "--master",
            "local[1]",
            *jars.submit_args(("delta", "s3a")),
            "--conf",
            "spark.databricks.delta.snapshotPartitions=2",
            str(ROOT / "pipelines" / "embed_notes.py"),
            "--notes",
            f"s3a://{bucket}/NOTEEVENTS/",
            "--model",
            model,
            "--out",
            submit_out,
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(w / "submit.err", "w"),
        text=True,
    )
    # A python -m job with --writer delta-spark, killed (SIGKILL) between its second chunk's errors and output
    # commits; it shares its table with this process's first job, started at the same time (two jobs, one table).
    both = f"{tmp}/both"
    killed_args = [
        "--notes",
        n24,
        "--model",
        model,
        "--out",
        both,
        "--id-type",
        "long",
        "--writer",
        "delta-spark",
        "--progress-every",
        "0",
        "--chunk-notes",
        "8",
    ]
    killed = subprocess.Popen(
        [sys.executable, "-m", "clinlong.pipelines.embed_notes", *killed_args, "--master", "local[1]"],
        cwd=ROOT,
        env={**env, "CLINLONG_FAULTPOINT": "driver-between-commits:2"},
        stdout=subprocess.DEVNULL,
        stderr=open(w / "killed.err", "w"),
    )

    from deltalake import DeltaTable

    from clinlong.pipelines.delta.writers import DeltaRsWriter, DeltaSparkWriter, delta_log_txn, make_writer
    from clinlong.pipelines.jobs.embed_notes import JobConfig, build_parser, config_from_args, run

    spark = session(tmp)
    seconds["session"] = round(time.perf_counter() - t0, 1)
    base = dict(model=model, id_type="long", progress_every=0)

    # 1. two jobs on one table: this one (another input, its own run id) appends while the killed job runs
    tick = time.perf_counter()
    partner = run(JobConfig(notes=b6, out=both, writer="delta-spark", run_id="b", **base), spark)
    found["partner"] = {"rows_in": partner["rows_in"], "version": partner["version"]}
    seconds["two_jobs"] = round(time.perf_counter() - tick, 1)

    # 2. every granularity through delta-spark (auto: the JAR is present) against delta-rs: note granularity in
    # full (12 notes, 2 chunks, then a rerun that commits nothing), sentence and token on 3 notes in one chunk
    tick = time.perf_counter()
    for g, notes, chunk in (("note", n12, 6), ("sentence", n3, 0), ("token", n3, 0)):
        ds, rs = f"{tmp}/ds_{g}", f"{tmp}/rs_{g}"
        cfg = dict(base, notes=notes, granularity=g, mode="overwrite", chunk_notes=chunk)
        a = run(JobConfig(out=ds, **cfg), spark)
        run(JobConfig(out=rs, writer="delta-rs", **cfg), spark)
        hist = history(spark, ds)
        adds = pa.table(DeltaTable(ds).get_add_actions(flatten=True)).to_pydict()
        found[g] = {
            **same(spark, ds, rs, KEYS[g]),
            "summary_rows": a["rows_written"],
            "add_records": int(sum(adds["num_records"])),
            "history_rows": sum(int(h["operationMetrics"].get("numOutputRows", 0)) for h in hist),
            "info": [json.loads(h["userMetadata"])["chunk"] for h in hist if h["userMetadata"]],
            "ops": [h["operation"] for h in hist],
            "engine": hist[-1]["engineInfo"],
        }
        if g == "note":
            again = run(JobConfig(out=ds, **cfg), spark)
            found["rerun"] = {
                "resumed_from": again["chunks_resumed_from"],
                "chunks": again["chunks"],
                "version": again["version"],
                "before": hist[-1]["version"],
            }
    # 2b. the fine-tuned heads' tasks (issue 24) through delta-spark against delta-rs: the same rows and scores
    for task, art in json.loads(heads).items():
        ds, rs = f"{tmp}/ds_{task}", f"{tmp}/rs_{task}"
        cfg = dict(base, model=art, notes=n3, task=task, mode="overwrite")
        a = run(JobConfig(out=ds, **cfg), spark)
        run(JobConfig(out=rs, writer="delta-rs", **cfg), spark)
        found[task] = {**head_tables(spark, ds, rs, task), "summary_rows": a["rows_written"], "embedded": a["embedded"]}
    from clinlong.pipelines.core.schema import OutputSpec, error_schema, table_schema

    spec = OutputSpec("note", table_schema("note", pa.int64()), "m", 64)
    found["auto_writer"] = make_writer(
        spark, JobConfig(**base, notes=n12, out=f"{tmp}/x"), model, spec, error_schema(pa.int64())
    ).name
    seconds["granularities"] = round(time.perf_counter() - tick, 1)

    # 3. incremental over a Delta input with deletion vectors, the output with deletion vectors too. The first run
    # has a note the model step refuses (an `embed` error) and a Python worker killed after its task's rows (Spark
    # re-executes the task); the second, after DELETE and UPDATE on the input, embeds the changed notes and the
    # refused one again, removes the stale rows and the retried error in MERGE commits.
    tick = time.perf_counter()
    raw = spark.read.csv(n12, header=True, multiLine=True, escape='"').selectExpr("CAST(ROW_ID AS LONG) ROW_ID", "TEXT")
    inp, out = f"{tmp}/input_dv", f"{tmp}/inc"
    raw.write.format("delta").option("delta.enableDeletionVectors", "true").save(inp)
    inc = dict(base, notes=inp, out=out, mode="incremental", chunk_notes=6)
    workers = spark.sparkContext.environment  # the Python workers' environment (a new daemon when it changes)
    workers.update({"CLINLONG_FAULT_RAISE": "note:7", "CLINLONG_FAULTPOINT": f"task-after-part:1:{tmp}/task-killed"})
    try:
        first = run(JobConfig(**inc), spark)
    finally:
        workers.pop("CLINLONG_FAULT_RAISE"), workers.pop("CLINLONG_FAULTPOINT")
    adds = pa.table(DeltaTable(out).get_add_actions(flatten=True)).to_pydict()
    errs = spark.read.format("delta").load(f"{out}_errors").select("note_id", "stage").collect()
    found["faults"] = {
        "task_killed": os.path.exists(f"{tmp}/task-killed"),
        "rows_in": first["rows_in"],
        "embedded": first["embedded"],
        "errors": first["errors"],
        "rows_written": first["rows_written"],
        "add_records": int(sum(adds["num_records"])),
        "history_rows": sum(int(h["operationMetrics"].get("numOutputRows", 0)) for h in history(spark, out)),
        "error_rows": sorted([r["note_id"], r["stage"]] for r in errs),
    }
    spark.sql(f"ALTER TABLE delta.`{out}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    spark.sql(f"DELETE FROM delta.`{inp}` WHERE ROW_ID IN (3, 4)")
    spark.sql(f"UPDATE delta.`{inp}` SET TEXT = concat(TEXT, ' Addendum.') WHERE ROW_ID IN (5, 6)")
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{inp}`").first()
    second = run(JobConfig(**inc), spark)
    table = spark.read.format("delta").load(out).toPandas()
    found["incremental_dv"] = {
        "first": first["rows_in"],
        "second": second["rows_in"],
        "stale": second["stale_rows_deleted"],
        "retried": second["retried_error_rows_deleted"],
        "ops": [h["operation"] for h in history(spark, out)],
        "error_ops": [h["operation"] for h in history(spark, f"{out}_errors")],
        "errors_left": spark.read.format("delta").load(f"{out}_errors").count(),
        "input_rows": spark.read.format("delta").load(inp).count(),
        "out_rows": len(table),
        "out_ids": sorted(set(table.note_id.tolist())),
        "dv_feature": "deletionVectors" in (detail["tableFeatures"] or []),
    }
    cm = f"{tmp}/input_cm"
    raw.withColumnRenamed("TEXT", "BODY").write.format("delta").save(cm)
    spark.sql(
        f"ALTER TABLE delta.`{cm}` SET TBLPROPERTIES ('delta.columnMapping.mode' = 'name', "
        "'delta.minReaderVersion' = '2', 'delta.minWriterVersion' = '5')"
    )
    spark.sql(f"ALTER TABLE delta.`{cm}` RENAME COLUMN BODY TO TEXT")
    r = run(JobConfig(**dict(base, notes=cm, out=f"{tmp}/cm_out", mode="append", chunk_notes=0)), spark)
    found["column_mapping"] = {"rows_in": r["rows_in"], "embedded": r["embedded"]}
    seconds["deletion_vectors_faults_column_mapping"] = round(time.perf_counter() - tick, 1)

    # 4. tables by name (Hive metastore, Derby): output and errors created on first run, input read by version
    tick = time.perf_counter()
    spark.sql("CREATE DATABASE IF NOT EXISTS db")
    raw.write.format("delta").saveAsTable("db.noteevents")
    named = dict(base, notes="db.noteevents", out="db.note_embeddings", mode="incremental", chunk_notes=0)
    n1 = run(JobConfig(**named), spark)
    spark.sql("INSERT INTO db.noteevents VALUES (9001, 'Short new note. Pt stable.')")
    n3r = run(JobConfig(**named), spark)
    found["named"] = {
        "first": n1["embedded"],
        "then": n3r["rows_in"],
        "tables": sorted(r["tableName"] for r in spark.sql("SHOW TABLES IN db").collect()),
        "provider": spark.sql("DESCRIBE DETAIL db.note_embeddings").first()["format"],
        "schema": [f.name for f in spark.table("db.note_embeddings").schema],
    }

    # 5. a delta-rs table read, described, optimised and vacuumed by delta-spark
    rs = f"{tmp}/rs_note"
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{rs}`").first()
    spark.sql(f"OPTIMIZE delta.`{rs}`")
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    spark.sql(f"VACUUM delta.`{rs}` RETAIN 0 HOURS")
    found["interchange"] = {
        "rows": spark.read.format("delta").load(rs).count(),
        "files_before": detail["numFiles"],
        "files_after": spark.sql(f"DESCRIBE DETAIL delta.`{rs}`").first()["numFiles"],
    }
    seconds["named_interchange"] = round(time.perf_counter() - tick, 1)

    # 6. the killed job: its second chunk never reached the output; rerun (here, the same command's config) it
    # resumes at chunk 1 from the txn actions in Spark's Delta log, every note once next to the partner's rows
    tick = time.perf_counter()
    rc = killed.wait(600)
    app_ids = [json.loads(h["userMetadata"])["run_id"] for h in history(spark, both) if h["userMetadata"]]
    txn_killed = delta_log_txn(spark, both, next(f"clinlong-{a}" for a in app_ids if a != "b"))
    resumed = run(config_from_args(build_parser().parse_args(killed_args)), spark)
    rows = spark.read.format("delta").load(both).select("note_id", "text_sha256").toPandas()
    found["kill9"] = {
        "rc": rc,
        "txn_before": txn_killed,
        "resumed_from": resumed["chunks_resumed_from"],
        "chunks": resumed["chunks"],
        "rows": len(rows),
        "duplicates": int(rows.duplicated().sum()),
        "ids": sorted(set(rows.note_id.tolist())),
        "partner_txn": delta_log_txn(spark, both, "clinlong-b"),
    }
    seconds["kill9_resume"] = round(time.perf_counter() - tick, 1)

    # 7. s3a:// for real: Parquet and Delta inputs read by Spark through hadoop-aws; delta-spark and delta-rs write
    # the same bucket, and each resumes a table the other began; the resume checks and the run fingerprint read
    # the bucket (s3a:// through Spark's filesystem, s3:// through delta-rs)
    tick = time.perf_counter()
    s3 = f"s3a://{bucket}"
    raw.write.parquet(f"{s3}/parquet/")
    raw.write.format("delta").save(f"{s3}/notes_delta")
    writers = {"delta-spark": DeltaSparkWriter, "delta-rs": DeltaRsWriter}
    cross = {}
    for first_w, then_w, notes, out in (
        ("delta-spark", "delta-rs", f"{s3}/parquet/", f"{s3}/ds_then_rs"),
        ("delta-rs", "delta-spark", f"{s3}/notes_delta", f"{s3}/rs_then_ds"),
    ):
        cfg = dict(base, notes=notes, out=out, chunk_notes=6)
        stopped = stopped_after_first_commit(lambda: run(JobConfig(writer=first_w, **cfg), spark))
        hist = history(spark, out)
        done = run(JobConfig(writer=then_w, **cfg), spark)
        app = f"clinlong-{done['run_id']}"
        txn = {
            name: cls(spark, JobConfig(writer=name, **cfg), model, spec, error_schema(pa.int64())).committed_version(
                out, app
            )
            for name, cls in writers.items()
        }
        cross[first_w] = {
            "stopped": stopped,
            "versions_before": len(hist),
            "first_engine": hist[-1]["engineInfo"],
            "resumed_from": done["chunks_resumed_from"],
            "chunks": done["chunks"],
            "rows_in": done["rows_in"],
            "txn": txn,
            "then_engine": history(spark, out)[-1]["engineInfo"],
            **same(spark, out, f"{tmp}/rs_note"),
        }
    found["s3a"] = cross
    from clinlong.pipelines.spark import sources

    fps = {}
    for name in (f"{s3}/NOTEEVENTS/", f"{s3}/notes_delta"):
        src = sources.resolve(spark, name)
        fps[src.kind] = sources.fingerprint(spark, src, sources.read(spark, src))
    found["fingerprints"] = fps
    seconds["s3a"] = round(time.perf_counter() - tick, 1)

    # 8. the spark-submit run: its table on s3a:// equals the local delta-rs table
    tick = time.perf_counter()
    stdout, _ = submit.communicate(timeout=600)
    hist = history(spark, submit_out) if submit.returncode == 0 else []
    found["submit"] = {
        "rc": submit.returncode,
        "summary": [ln for ln in stdout.splitlines() if ln.startswith("rows in")],
        "engine": hist[-1]["engineInfo"] if hist else None,
        "ops": [h["operation"] for h in hist],
        **(same(spark, submit_out, f"{tmp}/rs_note") if hist else {}),
    }
    seconds["submit_wait"] = round(time.perf_counter() - tick, 1)
    spark.stop()
    seconds["total"] = round(time.perf_counter() - t0, 1)
    return found


if __name__ == "__main__":
    findings = json.dumps(main(*sys.argv[1:5]), default=str)
    Path(sys.argv[1], "findings.json").write_text(findings)
    print(findings)
