"""The batch job: embed a note table into a Delta table.

    python -m pipelines.embed_notes --notes INPUT --model ARTIFACT --out DELTA_PATH [options]
    spark-submit pipelines/embed_notes.py --notes INPUT --model ARTIFACT --out DELTA_PATH [options]

Reading, embedding and writing run in Spark tasks over Arrow batches (`mapInArrow`); the model is
loaded once per Python worker. Nothing here logs or prints note text.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # run as a file by spark-submit
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyspark.accumulators import AccumulatorParam  # noqa: E402

from pipelines.artifact import Artifact, ArtifactError  # noqa: E402
from pipelines.engine import EmbedOptions  # noqa: E402
from pipelines.schema import GRANULARITIES  # noqa: E402
from pipelines.sources import InputError  # noqa: E402

MODES = ("append", "overwrite")


@dataclass(frozen=True)
class JobConfig:
    notes: str
    model: str
    out: str
    id_col: str = "ROW_ID"
    text_col: str = "TEXT"
    id_type: str = "auto"
    input_format: str = "auto"
    granularity: str = "note"
    mode: str = "append"
    partitions: int = 0
    vector_dtype: str = "float32"
    writer: str = "auto"
    progress_every: float = 30.0
    gpus_per_task: float = 0.0
    options: EmbedOptions = EmbedOptions()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.embed_notes",
                                description="Embed a clinical-note table with Clinical-Longformer into a Delta table.")
    p.add_argument("--notes", required=True, help="Delta table path, Parquet or CSV path (NOTEEVENTS layout), or table name")
    p.add_argument("--model", required=True, help="native artifact directory written by `python -m export`")
    p.add_argument("--out", required=True, help="output Delta table path")
    p.add_argument("--id-col", default="ROW_ID", help="note id column (default ROW_ID)")
    p.add_argument("--text-col", default="TEXT", help="note text column (default TEXT)")
    p.add_argument("--id-type", choices=("auto", "long", "string"), default="auto",
                   help="auto keeps the id column's type (integers as long); long/string cast it")
    p.add_argument("--input-format", choices=("auto", "delta", "parquet", "csv", "table"), default="auto")
    p.add_argument("--granularity", choices=GRANULARITIES, default="note", help="one row per note, sentence or token")
    p.add_argument("--context", choices=("note", "sentence"), default="note",
                   help="note: the whole note is one sequence (windows past max length); sentence: each sentence alone")
    p.add_argument("--max-length", type=int, default=4096, help="BPE pieces per sequence incl. <s>, </s> (<= 4096)")
    p.add_argument("--case-insensitive", action="store_true", help="lowercase text before BPE (offsets stay original)")
    p.add_argument("--token-vector", choices=("first", "mean"), default="first",
                   help="token granularity: vector of the token's first BPE piece (default) or mean of its pieces")
    p.add_argument("--window-overlap", type=int, default=512, help="pieces shared by consecutive windows (default 512)")
    p.add_argument("--mode", choices=MODES + ("incremental",), default="append", help="Delta write mode")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute precision: fp32 (the export's parity), bf16 (AMX on recent Xeons), fp16")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch"), default="auto",
                   help="auto: onnxruntime for fp32 on CPUs, torch for bf16/fp16 and on GPUs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU Spark assigned the task when CUDA is usable, else the CPU")
    p.add_argument("--gpus-per-task", type=float, default=0.0,
                   help="GPUs the embedding stage's tasks ask for (fractions share a GPU); > 0 puts a "
                        "ResourceProfile on that stage only, so reading stays on CPU tasks")
    p.add_argument("--batch-size", type=int, default=32, help="max sequences per model call")
    p.add_argument("--token-budget", type=int, default=16384, help="max padded tokens per model call")
    p.add_argument("--partitions", type=int, default=0, help="repartition the input to N tasks (0: keep)")
    p.add_argument("--vector-dtype", choices=("float32", "float16"), default="float32",
                   help="float32: array<float>; float16: binary of little-endian halves (half the storage)")
    p.add_argument("--writer", choices=("auto", "delta-rs", "delta-spark"), default="auto",
                   help="auto: delta-spark when its JARs are on the classpath, else delta-rs")
    p.add_argument("--master", help="Spark master when run with python -m (default local[*])")
    p.add_argument("--progress-every", type=float, default=30.0,
                   help="seconds between progress logs (notes/s, tokens/s, ETA); 0 turns them off")
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    if args.mode not in MODES:
        raise InputError(f"--mode {args.mode} is not available in this version; use append or overwrite")
    opts = EmbedOptions(context=args.context, max_length=args.max_length, case_sensitive=not args.case_insensitive,
                        window_overlap=args.window_overlap, token_vector=args.token_vector,
                        token_budget=args.token_budget, batch_size=args.batch_size,
                        precision=args.precision, backend=args.backend, device=args.device)
    return JobConfig(notes=args.notes, model=args.model, out=args.out, id_col=args.id_col, text_col=args.text_col,
                     id_type=args.id_type, input_format=args.input_format, granularity=args.granularity,
                     mode=args.mode, partitions=args.partitions,
                     vector_dtype=args.vector_dtype, writer=args.writer, progress_every=args.progress_every,
                     gpus_per_task=args.gpus_per_task,
                     options=opts)


def _log(msg: str) -> None:
    print(f"[embed_notes] {msg}", file=sys.stderr, flush=True)


def spark_session(master: str | None = None):
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("clinlong-embed-notes").config("spark.ui.showConsoleProgress", "true")
    if master:
        builder = builder.master(master)
    elif "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit
        builder = builder.master("local[*]")
    return builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", "64").getOrCreate()


def run(cfg: JobConfig, spark=None) -> dict:
    """Run the job; return its summary (also stored in the Delta commit's info)."""
    from pyspark.sql.pandas.types import to_arrow_type

    from pipelines.schema import OutputSpec, table_schema
    from pipelines.sources import delta_spark_available, read_notes, select_notes

    start = time.perf_counter()
    artifact = Artifact.open(cfg.model)  # verifies every file's sha256 before any work
    cfg.options.validate(artifact)
    spark = spark or spark_session()
    notes = select_notes(read_notes(spark, cfg.notes, cfg.input_format), cfg.id_col, cfg.text_col, cfg.id_type)
    if cfg.partitions or cfg.gpus_per_task:
        # A shuffle boundary: reading runs in CPU tasks, only the embedding stage asks for GPUs.
        notes = notes.repartition(cfg.partitions or spark.sparkContext.defaultParallelism)
    schema = table_schema(cfg.granularity, to_arrow_type(notes.schema["note_id"].dataType), cfg.vector_dtype)
    spec = OutputSpec(cfg.granularity, schema, artifact.model_id, artifact.dimension,
                      cfg.options.token_vector, cfg.vector_dtype)
    writer = cfg.writer if cfg.writer != "auto" else ("delta-spark" if delta_spark_available(spark) else "delta-rs")
    _log(f"model {artifact.model_id} (dim {artifact.dimension}), granularity {cfg.granularity}, "
         f"context {cfg.options.context}, max length {cfg.options.max_length}, writer {writer}")
    if writer == "delta-spark" and not delta_spark_available(spark):
        raise InputError("--writer delta-spark needs delta-spark's JARs on the classpath "
                         "(e.g. --packages io.delta:delta-spark_2.13:4.0.0); or use --writer delta-rs")
    from pipelines.progress import JobProgress

    counters = {k: spark.sparkContext.accumulator(0) for k in ("notes", "tokens", "windows", "rows")}
    counters["skipped"] = spark.sparkContext.accumulator({}, _CounterParam())
    with JobProgress(spark, counters, cfg.progress_every):
        if writer == "delta-spark":
            parts, version = _write_delta_spark(spark, notes, artifact, cfg, spec, counters)
        else:
            parts, version = _write_delta_rs(notes, artifact, cfg, spec, counters)
    summary = _summary(parts, time.perf_counter() - start, artifact, cfg)
    if version is None:  # delta-rs: the summary goes into the one commit
        from pipelines.delta_sink import commit

        version = commit(cfg.out, [p for p in parts if p["path"]], schema, cfg.mode, summary)
    summary["version"] = version
    return summary


def _write_delta_rs(notes, artifact: Artifact, cfg: JobConfig, spec, counters: dict) -> tuple[list[dict], None]:
    """Executors write Parquet parts into the table folder; the caller commits them in one transaction."""
    from pipelines.delta_sink import META_SCHEMA, existing_table_schema
    from pipelines.tasks import embed_partition

    existing = existing_table_schema(cfg.out)
    if existing is not None and cfg.mode == "append" and existing != spec.schema:
        raise InputError(f"{cfg.out} holds a table with another schema; use --mode overwrite or another --out")
    if existing is None and os.path.isdir(cfg.out) and any(os.scandir(cfg.out)):
        raise InputError(f"{cfg.out} is a non-empty folder but not a Delta table; choose another --out")
    task = embed_partition(str(artifact.path), cfg.options, spec, cfg.out, counters)
    return [r.asDict() for r in notes.mapInArrow(task, META_SCHEMA, profile=gpu_profile(cfg)).collect()], None


def _write_delta_spark(spark, notes, artifact: Artifact, cfg: JobConfig, spec,
                       counters: dict) -> tuple[list[dict], int]:
    """Rows go to Spark's Delta writer (Databricks, clusters with delta-spark); counts via accumulators."""
    from pyspark.sql.pandas.types import from_arrow_schema

    from pipelines.tasks import embed_rows

    rows = notes.mapInArrow(embed_rows(str(artifact.path), cfg.options, spec, counters),
                            from_arrow_schema(spec.schema), profile=gpu_profile(cfg))
    rows.write.format("delta").mode(cfg.mode).option("userMetadata", "clinlong embed_notes").save(cfg.out)
    version = spark.sql(f"DESCRIBE HISTORY delta.`{cfg.out}` LIMIT 1").collect()[0]["version"]
    part = {k: c.value for k, c in counters.items()}
    part["skipped"] = json.dumps(part["skipped"])
    return [part], int(version)


def gpu_profile(cfg: JobConfig):
    """Stage-level scheduling: a task ResourceProfile asking for GPUs on the embedding stage alone."""
    if not cfg.gpus_per_task:
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    requests = TaskResourceRequests().cpus(1).resource("gpu", cfg.gpus_per_task)
    return ResourceProfileBuilder().require(requests).build


class _CounterParam(AccumulatorParam):
    """Spark accumulator of {reason: count} dictionaries."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        for k, v in b.items():
            a[k] = a.get(k, 0) + v
        return a


def _summary(parts: list[dict], seconds: float, artifact: Artifact, cfg: JobConfig) -> dict:
    skipped = Counter()
    for p in parts:
        skipped.update(json.loads(p["skipped"]))
    n_notes = sum(p["notes"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    devices = Counter(p.get("device") or "unknown" for p in parts)
    gpus = Counter(g for p in parts for g in (p.get("gpus") or "").split(",") if g)
    return {
        "devices": dict(devices), "gpu_addresses": dict(gpus),
        "notes_in": n_notes, "embedded": n_notes - sum(skipped.values()), "skipped": dict(skipped),
        "rows_written": sum(p["rows"] for p in parts), "bpe_tokens": tokens,
        "windows": sum(p["windows"] for p in parts), "seconds": round(seconds, 2),
        "notes_per_s": round(n_notes / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
        "model_id": artifact.model_id, "granularity": cfg.granularity, "context": cfg.options.context,
        "vector_dtype": cfg.vector_dtype, "precision": cfg.options.precision, "out": cfg.out, "mode": cfg.mode,
    }


def format_summary(s: dict) -> str:
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(s["skipped"].items())) or "none"
    return (f"notes in {s['notes_in']}, embedded {s['embedded']}, skipped {sum(s['skipped'].values())} ({skipped})\n"
            f"rows written {s['rows_written']} ({s['granularity']} granularity, {s['context']} context), "
            f"BPE tokens {s['bpe_tokens']}, windows {s['windows']}\n"
            f"{s['seconds']} s, {s['notes_per_s']} notes/s, {s['tokens_per_s']} tokens/s\n"
            f"devices: {_counted(s['devices'])}; GPU addresses assigned: {_counted(s['gpu_addresses']) or 'none'}\n"
            f"Delta table {s['out']} version {s['version']} (model {s['model_id']})")


def _counted(counts: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        spark = spark_session(args.master)
        summary = run(cfg, spark)
    except (InputError, ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
