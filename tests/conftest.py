"""Shared fixtures: synthetic checkpoints and exported artifacts, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; fail fast, never hang
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from clinlong.export.synthetic import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-clinical-longformer", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory) -> Path:
    from clinlong.export.__main__ import run

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    run([str(tiny_checkpoint), str(out)])
    return out


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """family -> (checkpoint, artifact) of a tiny synthetic checkpoint of that family, built on first use."""
    from clinlong.export.__main__ import run
    from clinlong.export.synthetic import write_synthetic_checkpoint

    built: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            ck = write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{family}", "tiny", 0, family)
            out = tmp_path_factory.mktemp("artifacts") / family
            run([str(ck), str(out)])
            built[family] = (ck, out)
        return built[family]

    return get


HEAD_LABELS = {"sequence": ("PNEUMONIA", "SEPSIS", "CHF"), "token": ("O", "B-PROBLEM", "I-PROBLEM")}


@pytest.fixture(scope="session")
def head_model(tmp_path_factory):
    """(kind "sequence"|"token", multi_label, family) -> (checkpoint, artifact) of a tiny synthetic fine-tuned
    checkpoint (default family longformer; labels HEAD_LABELS[kind]), built on first use."""
    from clinlong.export.__main__ import run
    from clinlong.export.synthetic import write_synthetic_checkpoint

    built: dict[tuple, tuple[Path, Path]] = {}

    def get(kind: str, multi: bool = False, family: str = "longformer") -> tuple[Path, Path]:
        if (kind, multi, family) not in built:
            name = f"{family}-{kind}{'-multi' if multi else ''}"
            ck = tmp_path_factory.mktemp("ckpt") / name
            write_synthetic_checkpoint(ck, "tiny", 0, family, kind, HEAD_LABELS[kind], multi)
            out = tmp_path_factory.mktemp("artifacts") / name
            run([str(ck), str(out)])
            built[kind, multi, family] = (ck, out)
        return built[kind, multi, family]

    return get


def hf_reference(checkpoint: Path, ids: list[int]):
    """Hugging Face's model (LongformerModel or BigBirdModel, fp32, loaded by transformers' AutoModel)
    last_hidden_state for one unpadded sequence, as a freshly loaded model computes it (export.parity's
    reference_run undoes BigBird's switch to full attention)."""
    import numpy as np
    from transformers import AutoModel
    from transformers.utils import logging

    from clinlong.export.parity import reference_run

    model = _hf_models.get(checkpoint)
    if model is None:
        logging.set_verbosity_error()
        model = _hf_models[checkpoint] = AutoModel.from_pretrained(str(checkpoint), add_pooling_layer=False).eval()
    return reference_run(model, np.asarray(ids, dtype=np.int64))


_hf_models: dict = {}


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    s = (
        # local[2,2]: a task whose Python worker dies is retried once, as a cluster retries it (full-suite runs on
        # the 2-core machine saw a worker crash three times, in three different tests, never alone: README,
        # Troubleshooting); the faulthandler prints such a worker's Python traceback into the test's output.
        SparkSession.builder.master("local[2,2]")
        .appName("clinlong-tests")
        .config("spark.python.worker.faulthandler.enabled", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


PHI_MARKER = "Zebulonius Quatermaine"  # a fake name planted in test notes; must never reach logs


def write_test_notes(path: Path, long_note_pieces: int = 0) -> Path:
    """A small NOTEEVENTS.csv: synthetic notes, a planted fake name, bad rows, a duplicate id."""
    import csv

    from clinlong.export.synthetic_notes import NOTEEVENTS_COLUMNS, generate_notes

    notes = generate_notes(8, seed=21)
    # Texts cut to ~2,500 BPE pieces so that one Hugging Face run holds each note (windows: test_engine.py).
    rows = [
        [
            n.row_id,
            n.subject_id,
            n.hadm_id,
            n.chartdate,
            "",
            "",
            n.category,
            n.description,
            "",
            "",
            n.text[: n.text.rfind("\n", 0, 8000)] if len(n.text) > 8000 else n.text,
        ]
        for n in notes
    ]
    rows[0][-1] = f"Pt. {PHI_MARKER} seen today.\nHISTORY OF PRESENT ILLNESS:\n" + rows[0][-1]
    rows.append([101, 1, 1, "2101-1-1", "", "", "ECG", "Report", "", "", ""])  # empty text
    rows.append([102, 1, 1, "2101-1-1", "", "", "ECG", "Report", "", "", "   \n  "])  # whitespace only
    rows.append([2, 1, 1, "2101-1-1", "", "", "ECG", "Report", "", "", "Sinus rhythm. Duplicate id."])
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        w.writerow(NOTEEVENTS_COLUMNS)
        w.writerows(rows)
    return path


def pytest_terminal_summary(terminalreporter):
    """Figures tests recorded with `record_property("ci_figures", text)` (the quick benchmark's), printed at
    the end of the run so they reach the CI log, also from pytest-xdist workers."""
    for rep in terminalreporter.stats.get("passed", []):
        text = dict(getattr(rep, "user_properties", ())).get("ci_figures")
        if text and rep.when == "call":
            terminalreporter.write_sep("=", f"figures from {rep.nodeid}")
            terminalreporter.write_line(text)


# BigBird's lengths: both sides of its switch to full attention (704 = 11 blocks of 64), on and off the block size.
BIGBIRD_SWEEP = (1, 2, 63, 64, 65, 127, 703, 704, 705, 706, 767, 768, 769, 1000, 2049, 4095, 4096)


def family_sequences(checkpoint, lengths):
    """Framed token ids (the tokenizer's own framing) of synthetic note text cut to each length."""
    from transformers import AutoTokenizer

    from clinlong.export.synthetic_notes import generate_french_notes

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    texts = " ".join(generate_french_notes(300, seed=5))
    body = tok(texts, add_special_tokens=False)["input_ids"]
    framed = tok("x")["input_ids"]
    start, end = framed[0], framed[-1]
    assert len(body) >= max(lengths)
    return [[start] if n == 1 else [start, *body[: n - 2], end] for n in lengths]
