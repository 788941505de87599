"""The batch job: embed a note table into a Delta table.

    python -m clinlong.pipelines.embed_notes --notes INPUT --model ARTIFACT --out DELTA_PATH [options]
    spark-submit pipelines/embed_notes.py --notes INPUT --model ARTIFACT --out DELTA_PATH [options]

Reading, embedding and writing run in Spark tasks over Arrow batches (`mapInArrow`); the model is
loaded once per Python worker, while the driver plans (spark.executor.Preload). The input is cut into
chunks, each committed once under the run's Delta transaction id (pipelines.delta.writers), so a rerun
resumes and a finished run is never written twice; what a run is and which notes it owes is
pipelines.delta.run_plan (`RunPlan`), what it did is pipelines.jobs.summary. Nothing here logs or prints
note text.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.config import TASKS_PER_CORE, JobConfig
from clinlong.pipelines.core.errors import ModelStepFailed, UserError
from clinlong.pipelines.core.options import add_arguments, from_arguments
from clinlong.pipelines.jobs.summary import format_summary, summary
from clinlong.pipelines.spark.executor import Preload, share_executor_cores
from clinlong.pipelines.spark.jars import job_kinds

log = logging.getLogger("clinlong.job")


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from JobConfig's and EmbedOptions' fields (their defaults, choices, help)."""
    p = argparse.ArgumentParser(
        prog="python -m clinlong.pipelines.embed_notes",
        description="Embed a clinical-note table with a Clinical-Longformer-family model into a Delta table.",
    )
    add_arguments(p, JobConfig)
    p.add_argument(
        "--master", help="Spark master when run with python -m (default local[*]; spark-submit sets its own)"
    )
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    return from_arguments(JobConfig, args)


def spark_session(master: str | None = None, jar_kinds: tuple[str, ...] = ()):
    """The job's session; with python -m it adds the JARs of `jar_kinds` (spark.jars.job_kinds: Delta for
    --writer delta-spark, hadoop-aws for s3a://), resolved once per machine; spark-submit brings its own."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    from clinlong.pipelines.spark import jars
    from clinlong.pipelines.spark.java import ensure_java

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    running = SparkContext._active_spark_context is not None  # a running JVM: used as it is, takes no new JARs
    if "PYSPARK_GATEWAY_PORT" not in os.environ and not running:
        ensure_java()  # python -m starts the JVM: Java 17+ from JAVA_HOME, PATH or /usr/lib/jvm, else one line
    builder = SparkSession.builder.appName("clinlong-embed-notes").config("spark.ui.showConsoleProgress", "true")
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:  # python -m (spark-submit sets its own master)
        master = master or "local[*]"
        builder = builder.master(master)
        if not running:
            builder = jars.configure(builder, jar_kinds)
            for k, v in (jars.s3a_conf() if "s3a" in jar_kinds else {}).items():
                builder = builder.config(k, v)
        if master.startswith("local"):  # a few shuffle partitions for incremental mode's joins, not 200
            builder = builder.config("spark.sql.shuffle.partitions", str(2 * (os.cpu_count() or 1)))
    spark = builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", "64").getOrCreate()
    if not spark.sparkContext.getConf().contains("spark.log.level"):  # spark-submit's INFO lines, as python -m does
        spark.sparkContext.setLogLevel("WARN")
    return spark


def run(cfg: JobConfig, spark=None) -> dict:
    """Run the job chunk by chunk, each chunk one idempotent commit; return the run's summary (also
    stored in every chunk's Delta commit info, cumulatively)."""
    from clinlong.pipelines.core.head_runs import engine_class
    from clinlong.pipelines.core.logs import configure
    from clinlong.pipelines.core.runtime import files_to_verify

    configure()
    start = time.perf_counter()
    artifact = Artifact.open(cfg.model, verify=False)
    cfg.validate(artifact)
    opts = cfg.options
    spark = spark or spark_session()
    profile = gpu_profile(cfg)
    with Preload(spark, str(artifact.path), opts, profile, engine_class(cfg.task)), ThreadPoolExecutor(1) as pool:
        files = files_to_verify(artifact, opts.backend) + ([artifact.head.file] if cfg.task != "embed" else [])
        verified = pool.submit(artifact.verify, files)
        return _run(cfg, spark, artifact, profile, verified, start)


def _run(cfg: JobConfig, spark, artifact: Artifact, profile, verified: Future, start: float) -> dict:
    """The job: read -> plan -> write chunks -> finish, while the executors load the model and the driver
    hashes the artifact's files (`verified`, awaited before the first chunk is written)."""
    from clinlong.pipelines.delta import run_plan
    from clinlong.pipelines.delta.writers import Totals
    from clinlong.pipelines.spark import sources
    from clinlong.pipelines.spark.progress import JobProgress

    source, raw, notes, writer = _read(cfg, spark, artifact)
    with JobProgress(spark, cfg.progress_every) as progress:  # from the read on: a big input shows progress too
        plan = run_plan.plan(
            cfg,
            notes,
            writer,
            artifact.model_id,
            sources.fingerprint(spark, source, raw),
            TASKS_PER_CORE * spark.sparkContext.defaultParallelism,
        )
        progress.total_notes = plan.input_rows
        share_executor_cores(spark.sparkContext)
        verified.result()  # ArtifactError: nothing was written
        totals, version = Totals(), writer.version(cfg.out)
        for ctx, part in plan.parts():
            chunk = writer.embed_chunk(part, ctx, profile, progress.address)
            so_far = summary(totals + chunk.totals, time.perf_counter() - start, artifact.model_id, cfg, plan)
            v = writer.commit_chunk(chunk, {**so_far, "chunk": ctx.index})
            totals += chunk.totals
            version = v if v is not None else version
    return _finish(cfg, writer, plan, totals, version, artifact.model_id, start)


def _read(cfg: JobConfig, spark, artifact: Artifact):
    """The input (its source, raw rows, and the (note_id, text[, partition column]) rows) and the run's
    writer, its outputs checked before any work."""
    from pyspark.sql.pandas.types import to_arrow_type

    from clinlong.pipelines.core.schema import OutputSpec, error_schema, head_table_schema, table_schema
    from clinlong.pipelines.delta.writers import make_writer
    from clinlong.pipelines.spark import sources

    keep = (cfg.partition_by,) if cfg.partition_by else ()
    source = sources.resolve(spark, cfg.notes, cfg.input_format, cfg.storage_options)
    raw = sources.read(spark, source)
    notes = sources.select_notes(raw, cfg.id_col, cfg.text_col, cfg.id_type, keep)
    id_type = to_arrow_type(notes.schema["note_id"].dataType)
    if cfg.task == "embed":
        schema = table_schema(cfg.granularity, id_type, cfg.vector_dtype, cfg.partition_by)
    else:
        schema = head_table_schema(cfg.task, id_type, cfg.partition_by)
    spec = OutputSpec(
        cfg.granularity,
        schema,
        artifact.model_id,
        artifact.dimension,
        cfg.options.token_vector,
        cfg.vector_dtype,
        cfg.partition_by,
        task=cfg.task,
        head=artifact.head if cfg.task != "embed" else None,
        window_pooling=cfg.window_pooling,
    )
    writer = make_writer(spark, cfg, str(artifact.path), spec, error_schema(id_type))
    writer.check_outputs()
    log.info(
        "model %s (dim %d), input %s (%s), task %s, granularity %s, context %s, max length %d, mode %s, writer %s",
        artifact.model_id,
        artifact.dimension,
        source.name,
        source.kind,
        cfg.task,
        cfg.granularity,
        cfg.options.context,
        cfg.options.max_length,
        cfg.mode,
        writer.name,
    )
    return source, raw, notes, writer


def _finish(cfg: JobConfig, writer, plan, totals, version: int | None, model_id: str, start: float) -> dict:
    """The run's summary, after incremental mode's deletes; the persisted notes released."""
    from clinlong.pipelines.delta import run_plan

    if plan.first == 0 and totals.notes != plan.input_rows:  # a guard, never expected: every row must be accounted
        raise RuntimeError(
            f"rows in {plan.input_rows} but tasks accounted for {totals.notes}; the table was not "
            f"left inconsistent (every chunk commit is whole), rerun to resume"
        )
    result = summary(totals, time.perf_counter() - start, model_id, cfg, plan)
    result["input_total"] = plan.input_total
    if cfg.mode == "incremental":
        result.update(run_plan.delete_stale(writer, plan, cfg, model_id))
        version = writer.version(cfg.out)
    plan.release()
    result["version"] = version
    result["errors_version"] = writer.version(cfg.errors_path)  # None: no error row was ever written
    return result


def gpu_profile(cfg: JobConfig):
    """Stage-level scheduling: a task ResourceProfile asking for GPUs on the embedding stage alone."""
    if not cfg.gpus_per_task:
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    requests = TaskResourceRequests().cpus(1).resource("gpu", cfg.gpus_per_task)
    return ResourceProfileBuilder().require(requests).build


def task_failure(e: BaseException) -> str | None:
    """The one-line cause of a job that failed because a Spark task kept failing (our ModelStepFailed,
    found in the Python traceback Spark forwards), or None for other exceptions."""
    text = str(e)
    marker = f"{ModelStepFailed.__name__}: "
    if marker not in text:
        return None
    line = text[text.rindex(marker) :].splitlines()[0]
    return f"a Spark task failed after its retries: {line}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        spark = spark_session(args.master, job_kinds(cfg.writer, (cfg.notes, cfg.out, cfg.errors_path)))
        summary = run(cfg, spark)
    except (UserError, ValueError) as e:  # input, output, artifact, storage, JARs, Java: 2; a commit conflict: 3
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except Exception as e:  # noqa: BLE001 - a Spark task failed past its retries: one line, then exit 4
        cause = task_failure(e)
        if cause is None:
            raise
        print(
            f"error: {cause}; nothing of the failed chunk was committed, committed chunks are kept: "
            "fix the cause and rerun the same command to resume",
            file=sys.stderr,
        )
        return ModelStepFailed.exit_code
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
