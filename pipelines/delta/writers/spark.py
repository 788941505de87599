"""The delta-spark writer, both ends of it: the task function whose one stream carries output rows, errors
rows and counts rows (told apart by `_kind`), and the driver side that splits that stream and writes each
table with Spark's own Delta writer (Databricks, clusters with delta-spark), for locations delta-rs cannot
write (`dbfs:/`, catalog tables); its resume checks read Spark's Delta log, not delta-rs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from clinlong.pipelines.core import batches, faults
from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.core.errors import OutputError
from clinlong.pipelines.core.head_runs import engine_class
from clinlong.pipelines.core.schema import OutputSpec, build_errors, null_vector_counts
from clinlong.pipelines.delta.sink import CommitConflict
from clinlong.pipelines.delta.writers.base import KEY_MATCH, Chunk, Embedded, Totals, Writer
from clinlong.pipelines.spark.executor import task_embedder
from clinlong.pipelines.spark.jars import is_table_name
from clinlong.pipelines.spark.progress import ProgressReporter
from clinlong.pipelines.spark.tasks import ArrowFn

log = logging.getLogger("clinlong.job")


def embed_rows_and_errors(
    artifact_path: str,
    options: EmbedOptions,
    spec: OutputSpec,
    error_schema: pa.Schema,
    run_id: str,
    progress: tuple | None = None,
    chunk: int = 0,
) -> ArrowFn:
    """For Spark-side writers: output rows, errors-table rows and one counts row per batch in one stream,
    told apart by `_kind` (row, error, meta; the counts as JSON in `_meta`). The columns are the output
    schema's, then the errors table's prefixed `err_`, then `_kind` and `_meta`. Counts travel as rows,
    so a re-executed task replaces its counts instead of adding them twice."""
    schema = combined_schema(spec.schema, error_schema)

    def run(rows: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        reporter = ProgressReporter(progress, chunk)
        with task_embedder(artifact_path, options, engine_class(spec.task)) as (emb, loads):
            for b in batches.embed_batches(emb, rows):
                table = batches.full_table(spec, b)
                b.warnings.update(null_vector_counts(table, spec.granularity))  # spans no piece covers
                errors = build_errors(error_schema, b.error_rows(), spec.model_id, run_id)
                counts = {**batches.counts(b, table.num_rows), **batches.where(emb), "model_loads": loads}
                loads = 0  # counted once per task
                reporter.add(counts["notes"], counts["tokens"])
                meta = pa.table({"_meta": [json.dumps(counts)]})
                for t, kind in ((table, "row"), (errors, "error"), (meta, "meta")):
                    if t.num_rows:
                        yield from _combined(t, kind, schema).to_batches()
        faults.point("task-after-part")
        reporter.send()

    return run


def _combined(t: pa.Table, kind: str, schema: pa.Schema) -> pa.Table:
    """Output, errors or counts rows (`kind` row, error, meta) in the combined schema: their own columns
    in place, nulls in the others."""

    def source(name: str) -> str | None:
        if kind == "error":
            return name[4:] if name.startswith("err_") else None
        if kind == "meta":
            return name if name == "_meta" else None
        return None if name.startswith("err_") or name == "_meta" else name

    cols = {
        f.name: t.column(source(f.name)) if source(f.name) else pa.nulls(t.num_rows, f.type)
        for f in schema
        if f.name != "_kind"
    }
    cols["_kind"] = pa.array([kind] * t.num_rows)
    return pa.table(cols, schema=schema)


def combined_schema(out: pa.Schema, errors: pa.Schema) -> pa.Schema:
    """Output columns, then the errors table's columns prefixed `err_`, then `_kind` and `_meta`."""
    return pa.schema(
        list(out)
        + [pa.field("err_" + f.name, f.type) for f in errors]
        + [pa.field("_kind", pa.string()), pa.field("_meta", pa.string())]
    )


class DeltaSparkWriter(Writer):
    """Spark's Delta writer: output and errors rows come from one pass (persisted), each write is
    idempotent through txnAppId/txnVersion; counts come from the pass's own rows, not accumulators."""

    name = "delta-spark"

    def __init__(self, *args, fmt: str = "delta"):
        super().__init__(*args)
        self.fmt = fmt  # "parquet" lets tests run the split and writes where delta-spark's JARs are absent

    def committed_version(self, uri: str, app_id: str) -> int:
        where = self._location(uri)
        return -1 if where is None else delta_log_txn(self.spark, where, app_id)

    def _ref(self, uri: str) -> str:
        """The table in SQL: a catalog name as it is, a path as delta.`path`."""
        return uri if is_table_name(uri) else f"delta.`{uri}`"

    def _location(self, uri: str) -> str | None:
        """Where the table's Delta log is: the path, or a catalog table's location (None: no table yet)."""
        if not is_table_name(uri):
            return uri
        if not self.spark.catalog.tableExists(uri):
            return None
        return self.spark.sql(f"DESCRIBE DETAIL {uri}").first()["location"]

    def _load(self, uri: str, version: int | None = None) -> DataFrame:
        """The table's rows, at `version` when given (pinned: a later commit to the table does not change them)."""
        if is_table_name(uri):
            return (
                self.spark.table(uri)
                if version is None
                else self.spark.sql(f"SELECT * FROM {uri} VERSION AS OF {int(version)}")
            )
        reader = self.spark.read.format("delta")
        return (reader if version is None else reader.option("versionAsOf", int(version))).load(uri)

    def version(self, uri: str) -> int | None:
        where = self._location(uri)
        if where is None or not _hadoop_exists(self.spark, where.rstrip("/") + "/_delta_log"):
            return None
        try:
            return int(self.spark.sql(f"DESCRIBE HISTORY {self._ref(uri)} LIMIT 1").first()["version"])
        except Exception:  # noqa: BLE001 - no table there yet
            return None

    def read(self, uri: str, columns: list[str]) -> DataFrame | None:
        """The rows of the table's current version, pinned to it as delta-rs' reads are: Spark re-plans a Delta
        DataFrame on the latest version whenever it is recomputed, and a chunk commit recaches every cached plan
        over the table, so an unpinned read would make the run's pending notes lose those it just committed (and
        the retried `embed` errors to clear with them)."""
        version = self.version(uri)
        return None if version is None else self._load(uri, version).select(*columns)

    def existing_schema(self, uri: str) -> pa.Schema | None:
        from pyspark.sql.pandas.types import to_arrow_schema

        return None if self.version(uri) is None else to_arrow_schema(self._load(uri).schema)

    def check_outputs(self) -> None:
        for uri in (self.cfg.out, self.cfg.errors_path):
            if is_table_name(uri) and "." in uri.replace("`", ""):
                db = uri.rsplit(".", 1)[0]
                if not self.spark.catalog.databaseExists(db):
                    raise OutputError(
                        f"--out/--errors-out {uri}: Spark's catalog has no schema {db}; create it "
                        f"(CREATE SCHEMA {db}) or name another table"
                    )
        super().check_outputs()

    def embed(self, part: DataFrame, ctx: Chunk, profile=None, progress=None) -> tuple[DataFrame, list[dict]]:
        """The chunk's combined rows (persisted) and the counts of the pass that produced them."""
        from pyspark import StorageLevel
        from pyspark.sql.pandas.types import from_arrow_schema

        fn = embed_rows_and_errors(
            self.artifact_path, self.cfg.options, self.spec, self.err_schema, ctx.run_id, progress, ctx.index
        )
        rows = part.mapInArrow(
            fn, from_arrow_schema(combined_schema(self.spec.schema, self.err_schema)), profile=profile
        ).persist(StorageLevel.DISK_ONLY)
        counts = [json.loads(r["_meta"]) for r in rows.where(F.col("_kind") == "meta").select("_meta").collect()]
        return rows, counts

    def embed_chunk(self, part, ctx, profile=None, progress=None) -> Embedded:
        rows, counts = self.embed(part, ctx, profile, progress)
        return Embedded(ctx, Totals.of(counts), rows)

    def commit_chunk(self, chunk: Embedded, info: dict) -> int | None:
        ctx, rows = chunk.ctx, chunk.payload
        info = json.dumps(info)
        out_rows, error_rows = split_rows(rows, self.spec.schema, self.err_schema)
        faults.point("driver-before-commit")
        for uri, sel, parts in (
            (self.cfg.errors_path, error_rows, []),
            (self.cfg.out, out_rows, [self.cfg.partition_by] if self.cfg.partition_by else []),
        ):
            if uri == self.cfg.out:
                faults.point("driver-between-commits")
            self._save(
                sel.write.format(self.fmt)
                .mode(self._mode(ctx))
                .partitionBy(*parts)
                .option("txnAppId", ctx.app_id)
                .option("txnVersion", ctx.index)
                .option("userMetadata", info)
                .option("overwriteSchema", str(self._mode(ctx) == "overwrite").lower()),
                uri,
                ctx,
            )
        faults.point("driver-after-commit")
        rows.unpersist()
        version = self.version(self.cfg.out)
        log.info(
            "chunk %d/%d committed: %d notes in %d task(s)%s",
            ctx.index + 1,
            ctx.count,
            chunk.totals.notes,
            chunk.totals.tasks,
            f", table version {version}" if version is not None else "",
        )
        return version

    def _save(self, writer, uri: str, ctx: Chunk, attempts: int = 4) -> None:
        """One idempotent write (Delta skips it when (txnAppId, txnVersion) is already in the log). A blind
        append that lost a race to another writer (two jobs creating or appending to one table) is retried;
        an overwrite that lost one is a CommitConflict (exit 3: rerun the same command)."""
        for attempt in range(attempts):
            try:
                writer.saveAsTable(uri) if is_table_name(uri) else writer.save(uri)
                return
            except Exception as e:  # noqa: BLE001 - py4j wraps Delta's ConcurrentModificationException family
                text = _java_text(e)
                if not any(k in text for k in ("Concurrent", "ProtocolChanged", "FileAlreadyExists", "already exists")):
                    raise
                if self._mode(ctx) == "overwrite" or attempt == attempts - 1:
                    raise CommitConflict(
                        f"another writer changed {uri} during this commit ({_first_line(text)}); "
                        "committed chunks are kept: rerun the same command to finish"
                    ) from None
                log.info("chunk %d: another writer committed to %s first; retrying the commit", ctx.index, uri)

    def delete_matching(self, uri, keys, condition=""):
        view = "clinlong_delete_keys"
        if keys.isEmpty():
            return 0
        keys.createOrReplaceTempView(view)
        before = self.version(uri)
        try:
            self.spark.sql(
                f"MERGE INTO {self._ref(uri)} t USING {view} s ON {KEY_MATCH}"
                f"{' AND ' + condition if condition else ''} WHEN MATCHED THEN DELETE"
            )
        finally:
            self.spark.catalog.dropTempView(view)  # not left in the user's session (SHOW TABLES lists it)
        if self.version(uri) == before:
            return 0
        metrics = self.spark.sql(f"DESCRIBE HISTORY {self._ref(uri)} LIMIT 1").first()["operationMetrics"] or {}
        return int(metrics.get("numTargetRowsDeleted", 0))


def split_rows(rows: DataFrame, schema, err_schema) -> tuple[DataFrame, DataFrame]:
    """The combined stream of `embed_rows_and_errors` as (output rows, errors rows) DataFrames."""
    return tuple(
        rows.where(F.col("_kind") == kind).select(
            *[F.col(("err_" if kind == "error" else "") + f.name).alias(f.name) for f in names]
        )
        for kind, names in (("row", schema), ("error", err_schema))
    )


def delta_log_txn(spark: SparkSession, uri: str, app_id: str) -> int:
    """The last version committed under `app_id` in the Delta log at `uri`, read with Spark's own readers
    (any location Spark opens, dbfs:/ included): the latest checkpoint's `txn` actions, then those of
    the commits after it, as the Delta protocol defines. -1 when there is none (or no table)."""
    log_dir = uri.rstrip("/") + "/_delta_log"
    if not _hadoop_exists(spark, log_dir):
        return -1
    last = _hadoop_read_json(spark, f"{log_dir}/_last_checkpoint")
    found = -1
    start = 0
    if last is not None and last["version"] is not None:
        start = int(last["version"])
        ckpt = spark.read.parquet(f"{log_dir}/{start:020d}.checkpoint*.parquet")
        if "txn" in ckpt.columns:
            for r in ckpt.where(F.col("txn.appId") == app_id).select("txn.version").collect():
                found = max(found, int(r["version"]))
    try:
        commits = spark.read.json(f"{log_dir}/*.json").withColumn("_file", F.input_file_name())
    except Exception:  # noqa: BLE001 - no commit files (no table)
        return found
    if "txn" not in commits.columns:
        return found
    version = F.regexp_extract("_file", r"(\d{20})\.json$", 1).cast("long")
    for r in (
        commits.where((F.col("txn.appId") == app_id) & (version > F.lit(start if last else -1)))
        .select("txn.version")
        .collect()
    ):
        found = max(found, int(r["version"]))
    return found


def _hadoop_read_json(spark: SparkSession, uri: str) -> dict | None:
    """The JSON object in the small file at `uri`, read through Spark's own filesystem for it, or None where
    there is no such file. (Spark's file readers skip names starting with "_", such as `_last_checkpoint`,
    as hidden: Spark 4.1 reads none of it.)"""
    if not _hadoop_exists(spark, uri):
        return None
    path = spark._jvm.org.apache.hadoop.fs.Path(uri)
    stream = path.getFileSystem(spark._jsc.hadoopConfiguration()).open(path)
    try:
        text = spark._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
    finally:
        stream.close()
    return json.loads(text)


def _hadoop_exists(spark: SparkSession, uri: str) -> bool:
    """Whether `uri` exists, asked of Spark's own filesystem for it (no exception logged when it does not)."""
    try:
        path = spark._jvm.org.apache.hadoop.fs.Path(uri)
        return bool(path.getFileSystem(spark._jsc.hadoopConfiguration()).exists(path))
    except Exception:  # noqa: BLE001 - no filesystem for the scheme: Spark's reads would fail the same way
        return False


def _java_text(e: Exception) -> str:
    java = getattr(e, "java_exception", None)
    return java.toString() if java is not None else str(e)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]
