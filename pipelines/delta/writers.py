"""The job's writers: one interface, two implementations, chosen once per run.

- `DeltaRsWriter`: executors write right-sized Parquet files into the output and errors tables (local
  or object stores, through delta-rs' storage layer), the driver commits them with delta-rs.
- `DeltaSparkWriter`: Spark's own Delta writer (Databricks, clusters with delta-spark), for locations
  delta-rs cannot write (`dbfs:/`); its resume checks read Spark's Delta log, not delta-rs.

Both commit each chunk under the run's Delta transaction id (app id = run, version = chunk), errors
table first, and return the counts of what they committed: figures a retried task cannot add twice.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from clinlong.pipelines.core import faults
from clinlong.pipelines.core.config import JobConfig
from clinlong.pipelines.core.schema import OutputSpec
from clinlong.pipelines.core.storage import StorageError, delta_rs_uri, is_local, local_path
from clinlong.pipelines.spark.jars import is_table_name
from clinlong.pipelines.spark.sources import InputError, delta_spark_available, read_delta_rs
from clinlong.pipelines.spark.tasks import COUNT_KEYS

log = logging.getLogger("clinlong.job")

# Rows of `keys` (aliased s) that the table's rows (t) are deleted by: the same note, text and model.
KEY_MATCH = "t.note_id = s.note_id AND t.text_sha256 = s.text_sha256 AND t.model_id = s.model_id"


@dataclass(frozen=True)
class Chunk:
    """One chunk of a run: its number, the run's Delta app id, the file-name prefix of this attempt."""

    index: int
    count: int
    run_id: str
    app_id: str
    prefix: str


class Totals:
    """Counts summed over the tasks' metadata rows of the chunks this invocation committed."""

    def __init__(self):
        self.notes = self.embedded = self.tokens = self.windows = self.rows = self.model_loads = self.tasks = 0
        self.errors, self.warnings, self.devices, self.gpus = Counter(), Counter(), Counter(), Counter()

    def add(self, counts: list[dict]) -> None:
        for m in counts:
            for k in COUNT_KEYS:
                setattr(self, k, getattr(self, k) + int(m.get(k) or 0))
            self.errors.update(_as_dict(m.get("errors")))
            self.warnings.update(_as_dict(m.get("warnings")))
            self.tasks += 1
            self.devices[m.get("device") or "unknown"] += 1
            self.gpus.update(g for g in (m.get("gpus") or "").split(",") if g)

    def merge(self, other: "Totals") -> None:
        for k in (*COUNT_KEYS, "tasks"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k in ("errors", "warnings", "devices", "gpus"):
            getattr(self, k).update(getattr(other, k))


def _as_dict(v) -> dict:
    return v if isinstance(v, dict) else json.loads(v or "{}")


class Writer:
    """What the job needs of a Delta writer: resume checks, reads, chunk commits, deletes."""

    name = ""

    def __init__(self, spark: SparkSession, cfg: JobConfig, artifact_path: str, spec: OutputSpec, err_schema: pa.Schema):
        self.spark, self.cfg, self.artifact_path, self.spec, self.err_schema = spark, cfg, artifact_path, spec, err_schema
        self.options = cfg.storage_options

    def committed_version(self, uri: str, app_id: str) -> int:
        """The last chunk committed to `uri` under `app_id`, or -1."""
        raise NotImplementedError

    def version(self, uri: str) -> int | None:
        """The table's current version, or None when there is no table."""
        raise NotImplementedError

    def read(self, uri: str, columns: list[str]) -> DataFrame | None:
        """The table's current rows (these columns), or None when there is no table."""
        raise NotImplementedError

    def existing_schema(self, uri: str) -> pa.Schema | None:
        raise NotImplementedError

    def write_chunk(self, part: DataFrame, ctx: Chunk, summary: Callable[[list[dict]], dict], profile=None,
                    progress: tuple | None = None) -> tuple[int | None, list[dict]]:
        """Embed and commit one chunk; return (output table version or None, the tasks' counts)."""
        raise NotImplementedError

    def delete_matching(self, uri: str, keys: DataFrame, condition: str = "") -> int:
        """Delete the rows of `uri` matching (note_id, text_sha256, model_id) of `keys` [and `condition`
        on the table's row `t`] in one commit; return how many."""
        raise NotImplementedError

    def check_outputs(self) -> None:
        """Refuse before any work: a non-Delta folder as output, or a table of another schema to append to."""
        for uri, want in ((self.cfg.out, self.spec.schema), (self.cfg.errors_path, self.err_schema)):
            if is_local(uri):
                path = local_path(uri)
                foreign = not os.path.isdir(os.path.join(path, "_delta_log")) and os.path.isdir(path) and any(
                    not (e.name.startswith("part-") and ".zstd.parquet" in e.name) for e in os.scandir(path))
                if foreign:  # (uncommitted parts of a killed first chunk are ours: the folder is a table in the making)
                    raise InputError(f"{uri} is a non-empty folder but not a Delta table; choose another --out/--errors-out")
            existing = self.existing_schema(uri)
            if existing is not None and self.cfg.mode != "overwrite" and existing != want:
                raise InputError(f"{uri} holds a table with another schema; use --mode overwrite or another --out")
            if existing is not None and self.cfg.mode != "overwrite":
                self._check_one_model(uri)

    def _check_one_model(self, uri: str) -> None:
        """A table holds one model's rows: appending or incrementally adding another model's (a changed
        checkpoint, another family) would leave a note with rows of two models. Refused in one line; --mode
        overwrite replaces the table. (Re-exporting an unchanged checkpoint keeps its model_id.)"""
        from pyspark.sql import functions as F

        rows = self.read(uri, ["model_id"])
        other = rows.where(F.col("model_id") != self.spec.model_id).limit(1).collect() if rows is not None else []
        if other:
            raise InputError(f"{uri} holds rows of model {other[0].model_id}, not of this run's model "
                             f"{self.spec.model_id}; a table holds one model's vectors: use --mode overwrite to "
                             "replace them, or another --out/--errors-out")

    def _mode(self, ctx: Chunk) -> str:
        return "overwrite" if self.cfg.mode == "overwrite" and ctx.index == 0 else "append"


class DeltaRsWriter(Writer):
    name = "delta-rs"

    def __init__(self, *args):
        super().__init__(*args)
        for uri in (self.cfg.out, self.cfg.errors_path):
            if is_table_name(uri):
                raise InputError(f"{uri} names a catalog table, which delta-rs cannot write: use --writer delta-spark "
                                 "(python -m adds its JARs) or a path")
            try:
                delta_rs_uri(uri)
            except StorageError as e:
                raise InputError(str(e)) from None

    def committed_version(self, uri: str, app_id: str) -> int:
        from clinlong.pipelines.delta.sink import committed_version

        return committed_version(uri, app_id, self.options)

    def version(self, uri: str) -> int | None:
        from clinlong.pipelines.delta.sink import open_table

        dt = open_table(uri, self.options)
        return None if dt is None else dt.version()

    def read(self, uri: str, columns: list[str]) -> DataFrame | None:
        return None if self.version(uri) is None else read_delta_rs(self.spark, uri, self.options, columns)

    def existing_schema(self, uri: str) -> pa.Schema | None:
        from clinlong.pipelines.delta.sink import existing_table_schema

        return existing_table_schema(uri, self.options)

    def write_chunk(self, part, ctx, summary, profile=None, progress=None):
        from pyspark.sql.pandas.types import from_arrow_schema

        from clinlong.pipelines.core.files import WrittenFile, remove_unreferenced
        from clinlong.pipelines.delta.sink import commit
        from clinlong.pipelines.spark.tasks import META_SCHEMA, PartTarget, embed_partition

        cfg = self.cfg
        target = PartTarget(cfg.out, cfg.errors_path, ctx.prefix, ctx.run_id, self.err_schema,
                            int(cfg.target_file_mb * (1 << 20)), self.options, ctx.index, progress)
        task = embed_partition(self.artifact_path, cfg.options, self.spec, target)
        metas = [r.asDict() for r in part.mapInArrow(task, from_arrow_schema(META_SCHEMA), profile=profile).collect()]
        counts = [m for m in metas if not m["table"]]
        info = {**summary(counts), "chunk": ctx.index}
        files = {t: [WrittenFile(m["path"], m["size"], m["stats"], json.loads(m["partition_values"]))
                     for m in metas if m["table"] == t] for t in ("out", "err")}
        mode, txn = self._mode(ctx), (ctx.app_id, ctx.index)
        faults.point("driver-before-commit")
        if files["err"] or mode == "overwrite":
            commit(cfg.errors_path, files["err"], self.err_schema, mode, info, txn, storage_options=self.options)
        faults.point("driver-between-commits")
        version = commit(cfg.out, files["out"], self.spec.schema, mode, info, txn, partition_by=cfg.partition_by,
                         storage_options=self.options)
        faults.point("driver-after-commit")
        if version is None:
            log.info("chunk %d: already committed by another attempt of run %s; its files are discarded",
                     ctx.index, ctx.run_id)
        remove_unreferenced(cfg.out, ctx.prefix, {f.path for f in files["out"]} if version is not None else set(),
                            self.options)
        remove_unreferenced(cfg.errors_path, ctx.prefix, {f.path for f in files["err"]}, self.options)
        log.info("chunk %d/%d committed: %d notes in %d task(s), %d output file(s)%s", ctx.index + 1, ctx.count,
                 sum(m["notes"] for m in counts), len(counts), len(files["out"]),
                 f", table version {version}" if version is not None else "")
        return version, counts

    def delete_matching(self, uri, keys, condition=""):
        from clinlong.pipelines.delta.sink import delete_matching

        predicate = KEY_MATCH + (f" AND {condition}" if condition else "")
        return delete_matching(uri, keys.toArrow(), predicate, self.options, {"operation": "clinlong delete"})


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
            return self.spark.table(uri) if version is None else self.spark.sql(
                f"SELECT * FROM {uri} VERSION AS OF {int(version)}")
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
                    raise InputError(f"--out/--errors-out {uri}: Spark's catalog has no schema {db}; create it "
                                     f"(CREATE SCHEMA {db}) or name another table")
        super().check_outputs()

    def embed(self, part: DataFrame, ctx: Chunk, profile=None, progress=None) -> tuple[DataFrame, list[dict]]:
        """The chunk's combined rows (persisted) and the counts of the pass that produced them."""
        from pyspark import StorageLevel
        from pyspark.sql.pandas.types import from_arrow_schema

        from clinlong.pipelines.spark.tasks import combined_schema, embed_rows_and_errors

        fn = embed_rows_and_errors(self.artifact_path, self.cfg.options, self.spec, self.err_schema, ctx.run_id,
                                   progress, ctx.index)
        rows = part.mapInArrow(fn, from_arrow_schema(combined_schema(self.spec.schema, self.err_schema)),
                               profile=profile).persist(StorageLevel.DISK_ONLY)
        counts = [json.loads(r["_meta"]) for r in rows.where(F.col("_kind") == "meta").select("_meta").collect()]
        return rows, counts

    def write_chunk(self, part, ctx, summary, profile=None, progress=None):
        rows, counts = self.embed(part, ctx, profile, progress)
        info = json.dumps({**summary(counts), "chunk": ctx.index})
        out_rows, error_rows = split_rows(rows, self.spec.schema, self.err_schema)
        faults.point("driver-before-commit")
        for uri, sel, parts in ((self.cfg.errors_path, error_rows, []),
                                (self.cfg.out, out_rows, [self.cfg.partition_by] if self.cfg.partition_by else [])):
            if uri == self.cfg.out:
                faults.point("driver-between-commits")
            self._save(sel.write.format(self.fmt).mode(self._mode(ctx)).partitionBy(*parts)
                       .option("txnAppId", ctx.app_id).option("txnVersion", ctx.index).option("userMetadata", info)
                       .option("overwriteSchema", str(self._mode(ctx) == "overwrite").lower()), uri, ctx)
        faults.point("driver-after-commit")
        rows.unpersist()
        version = self.version(self.cfg.out)
        log.info("chunk %d/%d committed: %d notes in %d task(s)%s", ctx.index + 1, ctx.count,
                 sum(int(m.get("notes") or 0) for m in counts), len(counts),
                 f", table version {version}" if version is not None else "")
        return version, counts

    def _save(self, writer, uri: str, ctx: Chunk, attempts: int = 4) -> None:
        """One idempotent write (Delta skips it when (txnAppId, txnVersion) is already in the log). A blind
        append that lost a race to another writer (two jobs creating or appending to one table) is retried;
        an overwrite that lost one is a CommitConflict (exit 3: rerun the same command)."""
        from clinlong.pipelines.delta.sink import CommitConflict

        for attempt in range(attempts):
            try:
                writer.saveAsTable(uri) if is_table_name(uri) else writer.save(uri)
                return
            except Exception as e:  # noqa: BLE001 - py4j wraps Delta's ConcurrentModificationException family
                text = _java_text(e)
                if not any(k in text for k in ("Concurrent", "ProtocolChanged", "FileAlreadyExists",
                                               "already exists")):
                    raise
                if self._mode(ctx) == "overwrite" or attempt == attempts - 1:
                    raise CommitConflict(f"another writer changed {uri} during this commit ({_first_line(text)}); "
                                         "committed chunks are kept: rerun the same command to finish") from None
                log.info("chunk %d: another writer committed to %s first; retrying the commit", ctx.index, uri)

    def delete_matching(self, uri, keys, condition=""):
        view = "clinlong_delete_keys"
        if keys.isEmpty():
            return 0
        keys.createOrReplaceTempView(view)
        before = self.version(uri)
        try:
            self.spark.sql(f"MERGE INTO {self._ref(uri)} t USING {view} s ON {KEY_MATCH}"
                           f"{' AND ' + condition if condition else ''} WHEN MATCHED THEN DELETE")
        finally:
            self.spark.catalog.dropTempView(view)  # not left in the user's session (SHOW TABLES lists it)
        if self.version(uri) == before:
            return 0
        metrics = self.spark.sql(f"DESCRIBE HISTORY {self._ref(uri)} LIMIT 1").first()["operationMetrics"] or {}
        return int(metrics.get("numTargetRowsDeleted", 0))


def make_writer(spark: SparkSession, cfg: JobConfig, artifact_path: str, spec: OutputSpec, err_schema: pa.Schema) -> Writer:
    """The run's writer: `--writer`, or delta-spark where its JARs are on the classpath, else delta-rs."""
    have = delta_spark_available(spark)
    name = cfg.writer if cfg.writer != "auto" else ("delta-spark" if have else "delta-rs")
    if name == "delta-spark" and not have:
        from clinlong.pipelines.spark.jars import coordinates

        raise InputError(f"--writer delta-spark needs delta-spark's JARs on the classpath (spark-submit --packages "
                         f"{coordinates(('delta',))[0]}; python -m adds them itself); or use --writer delta-rs")
    return (DeltaSparkWriter if name == "delta-spark" else DeltaRsWriter)(spark, cfg, artifact_path, spec, err_schema)


def split_rows(rows: DataFrame, schema, err_schema) -> tuple[DataFrame, DataFrame]:
    """The combined stream of `tasks.embed_rows_and_errors` as (output rows, errors rows) DataFrames."""
    return tuple(rows.where(F.col("_kind") == kind).select(
        *[F.col(("err_" if kind == "error" else "") + f.name).alias(f.name) for f in names])
        for kind, names in (("row", schema), ("error", err_schema)))


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
    for r in commits.where((F.col("txn.appId") == app_id) & (version > F.lit(start if last else -1))).select(
            "txn.version").collect():
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
