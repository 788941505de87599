"""What every benchmark starts from: a synthetic checkpoint, its exported artifact, and a local Spark session.

Shared by `python -m clinlong.benchmarks`, its peer rows (benchmarks/peer.py) and the GPU benchmark, so none
of them imports another's entry point.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("clinlong.benchmarks")


def native_artifact(ckpt: Path, art: Path, name: str) -> Path:
    """Our artifact of the checkpoint at `art` (export with its parity check), built once and reused while its
    format is the one this pipeline reads."""
    from clinlong.export.__main__ import run as export
    from clinlong.pipelines.core.artifact import MANIFEST_FILE, SUPPORTED_FORMAT

    manifest = json.loads((art / MANIFEST_FILE).read_text()) if (art / MANIFEST_FILE).exists() else {}
    if (manifest.get("format"), manifest.get("format_version")) != SUPPORTED_FORMAT:
        log.info("exporting %s (parity check included)", ckpt.name)
        export([str(ckpt), str(art), "--overwrite", "--name", name])
    return art


def ensure_artifact(work: Path, size: str = "base") -> tuple[Path, Path]:
    """A synthetic checkpoint (base: the real Clinical-Longformer dimensions) and its exported artifact under
    `work`, built once."""
    from clinlong.export.synthetic import write_synthetic_checkpoint

    ckpt, art = work / f"checkpoint-{size}", work / f"artifact-{size}"
    if not (ckpt / "config.json").exists():
        log.info("writing the %s-size synthetic checkpoint", size)
        write_synthetic_checkpoint(ckpt, size, seed=0)
    return ckpt, native_artifact(ckpt, art, f"synthetic-clinical-longformer-{size}")


def local_spark(cores: int):
    """A local Spark session on `cores` task slots (one core per task), quiet, with small Arrow batches."""
    from pyspark.sql import SparkSession

    from clinlong.pipelines.spark.java import ensure_java

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    ensure_java()
    spark = (
        SparkSession.builder.master(f"local[{cores}]")
        .appName("clinlong-benchmarks")
        .config("spark.ui.enabled", "false")
        .config("spark.task.cpus", "1")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark
