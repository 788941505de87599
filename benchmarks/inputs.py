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


def write_notes(work: Path, n: int, long_notes: int) -> tuple[Path, list[str]]:
    """n synthetic notes: `long_notes` discharge summaries (2,000-6,000 tokens) and short notes of the
    other MIMIC-III categories (ECG, nursing, radiology, physician), shuffled as one table."""
    import random

    import pandas as pd

    from clinlong.export.synthetic_notes import generate_notes

    pool = generate_notes(20 * n, seed=7)
    longs = [x for x in pool if x.category == "Discharge summary" and len(x.text) > 9000][:long_notes]
    shorts = [x for x in pool if x.category != "Discharge summary"][: n - long_notes]
    notes = longs + shorts
    random.Random(0).shuffle(notes)
    path = work / f"notes-{n}-{long_notes}.parquet"
    pd.DataFrame(
        {"ROW_ID": [x.row_id for x in notes], "CATEGORY": [x.category for x in notes], "TEXT": [x.text for x in notes]}
    ).to_parquet(path)
    return path, [x.text for x in notes]


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
