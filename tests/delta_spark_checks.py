"""Checks that need a Spark session with Delta's JARs, run by tests/test_delta_spark.py in a process of their own
(one JVM per process: the suite's shared session has no JARs, so its jobs keep the delta-rs default).

    python tests/delta_spark_checks.py WORK NOTES_CSV ARTIFACT   -> one JSON line of findings on stdout
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa


def session(tmp: str):
    from pyspark.sql import SparkSession

    from clinlong.pipelines.spark import jars

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (SparkSession.builder.master("local[2,4]").appName("clinlong-delta-spark-tests")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.databricks.delta.snapshotPartitions", "2")
               .config("spark.sql.sources.parallelPartitionDiscovery.parallelism", "2")
               .config("spark.sql.catalogImplementation", "hive").config("spark.sql.warehouse.dir", f"{tmp}/warehouse")
               .config("spark.hadoop.javax.jdo.option.ConnectionURL",
                       f"jdbc:derby:;databaseName={tmp}/metastore;create=true"))
    spark = jars.configure(builder, ("delta",)).getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def vectors(df, keys):
    pdf = df.toPandas().sort_values(keys)
    return pdf[keys].values.tolist(), np.stack(pdf.embedding.map(np.asarray))


def main(tmp: str, notes_csv: str, model: str) -> dict:
    from deltalake import DeltaTable

    from clinlong.pipelines.core.engine import EmbedOptions
    from clinlong.pipelines.delta.writers import make_writer
    from clinlong.pipelines.jobs.embed_notes import JobConfig, run

    spark = session(tmp)
    found: dict = {}
    fp32 = EmbedOptions(precision="fp32")
    base = dict(notes=notes_csv, model=model, id_type="long", progress_every=0, chunk_notes=6, options=fp32)
    keys = {"note": ["note_id"], "sentence": ["note_id", "sentence_index"],
            "token": ["note_id", "sentence_index", "token_index"]}
    # 1. every granularity: delta-spark (auto, the JAR is present) against delta-rs; overwrite, then append again
    for g in ("note", "sentence", "token"):
        ds, rs = f"{tmp}/ds_{g}", f"{tmp}/rs_{g}"
        a = run(JobConfig(out=ds, granularity=g, mode="overwrite", **base), spark)
        run(JobConfig(out=rs, granularity=g, mode="overwrite", writer="delta-rs", **base), spark)
        k1, v1 = vectors(spark.read.format("delta").load(ds), keys[g])
        k2, v2 = vectors(spark.read.format("delta").load(rs), keys[g])
        hist = spark.sql(f"DESCRIBE HISTORY delta.`{ds}`").orderBy("version").collect()
        adds = pa.table(DeltaTable(ds).get_add_actions(flatten=True)).to_pydict()
        found[g] = {"keys_equal": k1 == k2, "max_diff": float(np.abs(v1 - v2).max()), "rows": len(k1),
                    "summary_rows": a["rows_written"], "add_records": int(sum(adds["num_records"])),
                    "history_rows": sum(int(h["operationMetrics"].get("numOutputRows", 0)) for h in hist),
                    "info": [json.loads(h["userMetadata"])["chunk"] for h in hist if h["userMetadata"]],
                    "ops": [h["operation"] for h in hist]}
        if g == "note":
            again = run(JobConfig(out=ds, granularity=g, mode="overwrite", **base), spark)
            found["rerun"] = {"resumed_from": again["chunks_resumed_from"], "chunks": again["chunks"],
                              "version": again["version"], "before": hist[-1]["version"]}
    from clinlong.pipelines.core.schema import OutputSpec, error_schema, table_schema
    spec = OutputSpec("note", table_schema("note", pa.int64()), "m", 64)
    found["auto_writer"] = make_writer(spark, JobConfig(**{**base, "out": f"{tmp}/x"}), model, spec,
                                       error_schema(pa.int64())).name

    # 2. incremental over a Delta input with deletion vectors, then with column mapping (read by delta-spark)
    raw = spark.read.csv(notes_csv, header=True, multiLine=True, escape='"').selectExpr("CAST(ROW_ID AS LONG) ROW_ID",
                                                                                       "TEXT")
    inp = f"{tmp}/input_dv"
    raw.write.format("delta").option("delta.enableDeletionVectors", "true").save(inp)
    out = f"{tmp}/inc"
    inc = dict(base, notes=inp, out=out, mode="incremental")
    first = run(JobConfig(**inc), spark)
    spark.sql(f"ALTER TABLE delta.`{out}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    spark.sql(f"DELETE FROM delta.`{inp}` WHERE ROW_ID IN (3, 4)")
    spark.sql(f"UPDATE delta.`{inp}` SET TEXT = concat(TEXT, ' Addendum.') WHERE ROW_ID IN (5, 6)")
    dv_files = spark.sql(f"DESCRIBE DETAIL delta.`{inp}`").first()
    second = run(JobConfig(**inc), spark)
    ops = [r["operation"] for r in spark.sql(f"DESCRIBE HISTORY delta.`{out}`").orderBy("version").collect()]
    table = spark.read.format("delta").load(out).toPandas()
    found["incremental_dv"] = {"first": first["rows_in"], "second": second["rows_in"],
                               "stale": second["stale_rows_deleted"], "ops": ops,
                               "input_rows": spark.read.format("delta").load(inp).count(),
                               "out_rows": len(table), "out_ids": sorted(set(table.note_id.tolist())),
                               "dv_feature": "deletionVectors" in (dv_files["tableFeatures"] or [])}
    cm = f"{tmp}/input_cm"
    raw.withColumnRenamed("TEXT", "BODY").write.format("delta").save(cm)
    spark.sql(f"ALTER TABLE delta.`{cm}` SET TBLPROPERTIES ('delta.columnMapping.mode' = 'name', "
              "'delta.minReaderVersion' = '2', 'delta.minWriterVersion' = '5')")
    spark.sql(f"ALTER TABLE delta.`{cm}` RENAME COLUMN BODY TO TEXT")
    r = run(JobConfig(**dict(base, notes=cm, out=f"{tmp}/cm_out", mode="append")), spark)
    found["column_mapping"] = {"rows_in": r["rows_in"], "embedded": r["embedded"]}

    # 3. tables by name (Hive metastore, Derby): output and errors created on first run, input read by version
    spark.sql("CREATE DATABASE IF NOT EXISTS db")
    raw.write.format("delta").saveAsTable("db.noteevents")
    named = dict(base, notes="db.noteevents", out="db.note_embeddings", mode="incremental")
    n1 = run(JobConfig(**named), spark)
    n2 = run(JobConfig(**named), spark)
    spark.sql("INSERT INTO db.noteevents VALUES (9001, 'Short new note. Pt stable.')")
    n3 = run(JobConfig(**named), spark)
    found["named"] = {"first": n1["embedded"], "again": n2["rows_in"], "third": n3["rows_in"],
                      "tables": sorted(r["tableName"] for r in spark.sql("SHOW TABLES IN db").collect()),
                      "provider": spark.sql("DESCRIBE DETAIL db.note_embeddings").first()["format"],
                      "schema": [f.name for f in spark.table("db.note_embeddings").schema]}

    # 4. a delta-rs table read, described, optimised and vacuumed by delta-spark
    rs = f"{tmp}/rs_note"
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{rs}`").first()
    spark.sql(f"OPTIMIZE delta.`{rs}`")
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    spark.sql(f"VACUUM delta.`{rs}` RETAIN 0 HOURS")
    found["interchange"] = {"rows": spark.read.format("delta").load(rs).count(), "files_before": detail["numFiles"],
                            "files_after": spark.sql(f"DESCRIBE DETAIL delta.`{rs}`").first()["numFiles"]}
    spark.stop()
    return found


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4]), default=str))
