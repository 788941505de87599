"""The job's writers: one interface (`base.Writer`), two implementations, chosen once per run.

- `rs.DeltaRsWriter`: executors write right-sized Parquet files into the output and errors tables (local
  or object stores, through delta-rs' storage layer), the driver commits them with delta-rs.
- `spark.DeltaSparkWriter`: Spark's own Delta writer (Databricks, clusters with delta-spark), for locations
  delta-rs cannot write (`dbfs:/`); its resume checks read Spark's Delta log, not delta-rs.

Each module holds both ends of its format (what its tasks emit, what the driver commits). Both commit each
chunk under the run's Delta transaction id (app id = run, version = chunk), errors table first. A chunk is
embedded (`embed_chunk`, returning its `Totals`: figures a retried task cannot add twice), then committed
(`commit_chunk`) with the run's summary so far in the commit info.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import SparkSession

from clinlong.pipelines.core.config import JobConfig
from clinlong.pipelines.core.errors import OutputError
from clinlong.pipelines.core.schema import OutputSpec
from clinlong.pipelines.delta.writers.base import KEY_MATCH, Chunk, Embedded, Totals, Writer
from clinlong.pipelines.delta.writers.rs import DeltaRsWriter
from clinlong.pipelines.delta.writers.spark import DeltaSparkWriter, delta_log_txn, split_rows
from clinlong.pipelines.spark.sources import delta_spark_available

__all__ = [
    "KEY_MATCH",
    "Chunk",
    "Embedded",
    "DeltaRsWriter",
    "DeltaSparkWriter",
    "Totals",
    "Writer",
    "delta_log_txn",
    "make_writer",
    "split_rows",
]


def make_writer(
    spark: SparkSession, cfg: JobConfig, artifact_path: str, spec: OutputSpec, err_schema: pa.Schema
) -> Writer:
    """The run's writer: `--writer`, or delta-spark where its JARs are on the classpath, else delta-rs.
    Raises InputError for --writer delta-spark without its JARs."""
    have = delta_spark_available(spark)
    name = cfg.writer if cfg.writer != "auto" else ("delta-spark" if have else "delta-rs")
    if name == "delta-spark" and not have:
        from clinlong.pipelines.spark.jars import coordinates

        raise OutputError(
            f"--writer delta-spark needs delta-spark's JARs on the classpath (spark-submit --packages "
            f"{coordinates(('delta',))[0]}; python -m adds them itself); or use --writer delta-rs"
        )
    return (DeltaSparkWriter if name == "delta-spark" else DeltaRsWriter)(spark, cfg, artifact_path, spec, err_schema)
