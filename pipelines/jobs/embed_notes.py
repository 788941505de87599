"""The batch job: embed a note table into a Delta table.

    python -m clinlong.pipelines.embed_notes --notes INPUT --model ARTIFACT --out DELTA_PATH [options]
    spark-submit pipelines/embed_notes.py --notes INPUT --model ARTIFACT --out DELTA_PATH [options]

Reading, embedding and writing run in Spark tasks over Arrow batches (`mapInArrow`); the model is
loaded once per Python worker, while the driver plans (spark.executor.Preload). The input is cut into chunks, each committed once under the run's
Delta transaction id (pipelines.delta.writers), so a rerun resumes and a finished run is never written
twice; what a run is and which notes it owes is pipelines.delta.run_plan. Nothing here logs or prints
note text.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from clinlong.pipelines.core.artifact import Artifact, ArtifactError
from clinlong.pipelines.core.batches import ModelStepFailed
from clinlong.pipelines.core.config import TASKS_PER_CORE, JobConfig
from clinlong.pipelines.core.options import add_arguments, from_arguments
from clinlong.pipelines.core.storage import StorageError
from clinlong.pipelines.delta.sink import CommitConflict
from clinlong.pipelines.spark.executor import Preload, share_executor_cores
from clinlong.pipelines.spark.jars import JarError, job_kinds
from clinlong.pipelines.spark.java import JavaNotFound
from clinlong.pipelines.spark.sources import InputError

log = logging.getLogger("clinlong.job")


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from JobConfig's and EmbedOptions' fields (their defaults, choices, help)."""
    p = argparse.ArgumentParser(prog="python -m clinlong.pipelines.embed_notes",
                                description="Embed a clinical-note table with a Clinical-Longformer-family model into a Delta table.")
    add_arguments(p, JobConfig)
    p.add_argument("--master", help="Spark master when run with python -m (default local[*]; spark-submit sets its own)")
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
    from clinlong.pipelines.core.logs import configure
    from clinlong.pipelines.core.runtime import files_to_verify

    configure()
    start = time.perf_counter()
    artifact = Artifact.open(cfg.model, verify=False)
    cfg.options.validate(artifact)
    opts = cfg.options
    spark = spark or spark_session()
    profile = gpu_profile(cfg)
    with Preload(spark, str(artifact.path), opts, profile), ThreadPoolExecutor(1) as pool:
        verified = pool.submit(artifact.verify, files_to_verify(artifact, opts.backend))
        return _run(cfg, spark, artifact, profile, verified, start)


def _run(cfg: JobConfig, spark, artifact: Artifact, profile, verified: Future, start: float) -> dict:
    """The job's plan and chunks (see run), while the executors load the model and the driver hashes the
    artifact's files (`verified`, awaited before the first chunk is written)."""
    from pyspark import StorageLevel
    from pyspark.sql.pandas.types import to_arrow_type

    from clinlong.pipelines.core.schema import OutputSpec, error_schema, table_schema
    from clinlong.pipelines.delta import run_plan
    from clinlong.pipelines.delta.writers import Chunk, Totals, make_writer
    from clinlong.pipelines.spark import sources
    from clinlong.pipelines.spark.progress import JobProgress

    keep = (cfg.partition_by,) if cfg.partition_by else ()
    source = sources.resolve(spark, cfg.notes, cfg.input_format, cfg.storage_options)
    raw = sources.read(spark, source)
    notes = sources.select_notes(raw, cfg.id_col, cfg.text_col, cfg.id_type, keep)
    id_type = to_arrow_type(notes.schema["note_id"].dataType)
    spec = OutputSpec(cfg.granularity, table_schema(cfg.granularity, id_type, cfg.vector_dtype, cfg.partition_by),
                      artifact.model_id, artifact.dimension, cfg.options.token_vector, cfg.vector_dtype, cfg.partition_by)
    writer = make_writer(spark, cfg, str(artifact.path), spec, error_schema(id_type))
    writer.check_outputs()
    log.info("model %s (dim %d), input %s (%s), granularity %s, context %s, max length %d, mode %s, writer %s",
             artifact.model_id, artifact.dimension, source.name, source.kind, cfg.granularity, cfg.options.context,
             cfg.options.max_length, cfg.mode, writer.name)

    all_notes = notes
    ident = _run_description(cfg, artifact.model_id, sources.fingerprint(spark, source, raw))
    if cfg.mode == "incremental":
        cols = ["note_id", "text_sha256", "model_id"]
        done = run_plan.done_keys(writer.read(cfg.out, cols), writer.read(cfg.errors_path, cols + ["stage"]),
                                  artifact.model_id)
        notes = run_plan.pending(notes, done)
        ident["tables"] = [writer.version(cfg.out), writer.version(cfg.errors_path)]
    with JobProgress(spark, cfg.progress_every) as progress:  # from the read on: a big input shows progress too
        total_in = None
        if cfg.mode == "incremental":  # the input's size, beside what is left of it (read once, reused)
            all_notes = all_notes.persist(StorageLevel.DISK_ONLY)
            total_in = all_notes.count()
        notes = notes.persist(StorageLevel.DISK_ONLY)  # read (and planned) once, reused by every chunk
        n_in = progress.total_notes = notes.count()
        # Nothing to embed: no commit at all (an overwrite still commits, to empty the table).
        chunks = 0 if n_in == 0 and cfg.mode != "overwrite" else run_plan.n_chunks(n_in, cfg.chunk_notes)
        ident["chunks"] = chunks
        rid = cfg.run_id or run_plan.run_id(ident)
        app_id = f"clinlong-{rid}"
        first = writer.committed_version(cfg.out, app_id) + 1
        if first and first >= chunks:
            log.info("run %s: all %d chunk(s) were committed by an earlier attempt; nothing to do", rid, chunks)
        elif first:
            log.info("run %s: chunks 0..%d of %d were committed by an earlier attempt; resuming", rid, first - 1, chunks)
        tasks = cfg.partitions or TASKS_PER_CORE * spark.sparkContext.defaultParallelism
        share_executor_cores(spark.sparkContext)
        log.info("run %s: %d input rows in %d chunk(s) of ~%d notes, up to %d task(s) per chunk", rid, n_in, chunks,
                 cfg.chunk_notes or n_in, tasks)

        verified.result()  # ArtifactError: nothing was written
        totals = Totals()
        chunked = run_plan.with_chunk(notes, chunks)
        attempt = uuid.uuid4().hex[:8]  # names this driver's files, so it only ever deletes its own
        version = writer.version(cfg.out)

        def summary(pending: list[dict] = ()) -> dict:
            """The run so far, with a chunk's counts not yet committed (for that chunk's commit info)."""
            t = Totals()
            t.merge(totals)
            t.add(list(pending))
            return _summary(t, time.perf_counter() - start, artifact, cfg, rid, chunks, n_in, first)

        for c in range(first, chunks):
            part = run_plan.balance(chunked.where(chunked["_chunk"] == c).drop("_chunk"), tasks)
            ctx = Chunk(c, chunks, rid, app_id, f"{rid}-c{c:05d}-{attempt}")
            v, counts = writer.write_chunk(part, ctx, summary, profile, progress.address)
            totals.add(counts)
            version = v if v is not None else version
    if first == 0 and totals.notes != n_in:  # a guard, never expected: every row in must be accounted for
        raise RuntimeError(f"rows in {n_in} but tasks accounted for {totals.notes}; the table was not left "
                           f"inconsistent (every chunk commit is whole), rerun to resume")
    result = summary()
    result["input_total"] = total_in if total_in is not None else n_in
    if cfg.mode == "incremental":
        result.update(_delete_stale(writer, all_notes, notes, cfg, artifact.model_id, rid))
        version = writer.version(cfg.out)
        all_notes.unpersist()
    notes.unpersist()
    result["version"] = version
    result["errors_version"] = writer.version(cfg.errors_path)  # None: no error row was ever written
    return result


def _run_description(cfg: JobConfig, model_id: str, fingerprint: list) -> dict:
    """What makes two invocations the same run: input data, columns, model, output, result-changing options."""
    from clinlong.pipelines.delta.run_plan import RESULT_OPTIONS

    return {"input": fingerprint, "format": cfg.input_format, "id": [cfg.id_col, cfg.id_type],
            "text": cfg.text_col, "model": model_id, "granularity": cfg.granularity, "mode": cfg.mode,
            "vector_dtype": cfg.vector_dtype, "chunk_notes": cfg.chunk_notes, "partition_by": cfg.partition_by,
            "options": {k: getattr(cfg.options, k) for k in RESULT_OPTIONS}}


def _delete_stale(writer, notes, pending, cfg: JobConfig, model_id: str, run_id: str) -> dict:
    """Incremental mode, after the new rows are committed, one merge commit per table and kind: rows
    (and error rows) of notes whose text changed, and `embed` error rows of earlier runs for notes this
    run embedded again. Idempotent, so a crash between the steps is finished by a rerun."""
    from pyspark.sql import functions as F

    from clinlong.pipelines.delta import run_plan

    cols = ["note_id", "text_sha256", "model_id"]
    out, errors = writer.read(cfg.out, cols), writer.read(cfg.errors_path, cols + ["stage", "run_id"])
    deleted = {"stale_rows_deleted": 0, "retried_error_rows_deleted": 0}
    model = F.lit(model_id).alias("model_id")
    if out is not None:
        deleted["stale_rows_deleted"] = writer.delete_matching(cfg.out, run_plan.stale(notes, out, model_id).select("*", model))
    if errors is not None:
        writer.delete_matching(cfg.errors_path, run_plan.stale(notes, errors, model_id).select("*", model))
        retried = run_plan.retried_errors(pending, errors, model_id).select("*", model)
        deleted["retried_error_rows_deleted"] = writer.delete_matching(
            cfg.errors_path, retried, f"t.stage = 'embed' AND t.run_id <> '{run_id}'")
    return deleted


def gpu_profile(cfg: JobConfig):
    """Stage-level scheduling: a task ResourceProfile asking for GPUs on the embedding stage alone."""
    if not cfg.gpus_per_task:
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    requests = TaskResourceRequests().cpus(1).resource("gpu", cfg.gpus_per_task)
    return ResourceProfileBuilder().require(requests).build


def _summary(t, seconds: float, artifact: Artifact, cfg: JobConfig, run_id: str, chunks: int,
             input_rows: int, first_chunk: int) -> dict:
    """What this invocation did: rows in = embedded + errors (by stage and reason), tokens, throughput."""
    return {
        "rows_in": t.notes, "embedded": t.embedded, "errors": dict(t.errors), "warnings": dict(t.warnings),
        "tasks": t.tasks, "model_loads_in_tasks": t.model_loads,
        "input_rows": input_rows, "chunks_resumed_from": first_chunk, "chunks": chunks, "run_id": run_id,
        "devices": dict(t.devices), "gpu_addresses": dict(t.gpus),
        "rows_written": t.rows, "bpe_tokens": t.tokens, "windows": t.windows, "seconds": round(seconds, 2),
        "notes_per_s": round(t.notes / seconds, 2), "tokens_per_s": round(t.tokens / seconds, 1),
        "model_id": artifact.model_id, "granularity": cfg.granularity, "context": cfg.options.context,
        "vector_dtype": cfg.vector_dtype, "precision": cfg.options.precision, "out": cfg.out,
        "errors_out": cfg.errors_path, "mode": cfg.mode,
    }


def task_failure(e: BaseException) -> str | None:
    """The one-line cause of a job that failed because a Spark task kept failing (our ModelStepFailed,
    found in the Python traceback Spark forwards), or None for other exceptions."""
    text = str(e)
    marker = f"{ModelStepFailed.__name__}: "
    if marker not in text:
        return None
    line = text[text.rindex(marker):].splitlines()[0]
    return f"a Spark task failed after its retries: {line}"


def format_summary(s: dict) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none"
    warnings = ", ".join(f"{k}: {v}" for k, v in sorted(s["warnings"].items()))
    resumed = f" (resumed at chunk {s['chunks_resumed_from']})" if s["chunks_resumed_from"] else ""
    if s["input_rows"] == 0 and s["chunks"] == 0:
        resumed = f" (nothing to do: no input rows{' left to embed' if s['mode'] == 'incremental' else ''})"
    elif s["chunks_resumed_from"] == s["chunks"]:
        resumed = (f" (nothing to do: run {s['run_id']} had committed all {s['chunks']} chunk(s); "
                   "pass --run-id to write the same input again)")
    total = s.get("input_total", s["input_rows"])
    of_input = (f" of {total} input rows, {total - s['input_rows']} already embedded or recorded"
                if s["mode"] == "incremental" else "")
    errors_out = (f"errors in {s['errors_out']}" if s.get("errors_version") is not None
                  else "no errors table (no error rows)")
    return (f"rows in {s['rows_in']}{of_input}{resumed}, embedded {s['embedded']}, errors {sum(s['errors'].values())} "
            f"({errors}){'; warnings: ' + warnings if warnings else ''}\n"
            f"rows written {s['rows_written']} ({s['granularity']} granularity, {s['context']} context), "
            f"BPE tokens {s['bpe_tokens']}, windows {s['windows']}\n"
            f"{s['seconds']} s, {s['notes_per_s']} notes/s, {s['tokens_per_s']} tokens/s\n"
            f"devices: {_counted(s['devices']) or 'none'}; GPU addresses assigned: {_counted(s['gpu_addresses']) or 'none'}"
            + (f"; models loaded by the embedding tasks: {s['model_loads_in_tasks']} (the others were preloaded)"
               if s["tasks"] else "") + "\n"
            + (f"stale rows deleted: {s['stale_rows_deleted']}, retried embed errors cleared: "
               f"{s['retried_error_rows_deleted']}\n" if "stale_rows_deleted" in s else "")
            + f"Delta table {s['out']} version {s['version']}, {errors_out} (model {s['model_id']})")


def _counted(counts: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        spark = spark_session(args.master, job_kinds(cfg.writer, (cfg.notes, cfg.out, cfg.errors_path)))
        summary = run(cfg, spark)
    except (InputError, ArtifactError, StorageError, ValueError, JarError, JavaNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CommitConflict as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - a Spark task failed past its retries: one line, then exit 4
        cause = task_failure(e)
        if cause is None:
            raise
        print(f"error: {cause}; nothing of the failed chunk was committed, committed chunks are kept: "
              "fix the cause and rerun the same command to resume", file=sys.stderr)
        return 4
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
