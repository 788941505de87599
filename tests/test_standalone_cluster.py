"""spark-submit to a real standalone cluster (master + two workers on 127.0.0.1) whose Python does not have
clinlong installed, the project shipped as the README says: the wheel with --py-files, or a packed venv with
--archives; the Delta tables must equal the engine's vectors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from tests.cluster import spark_home, standalone_cluster
from tests.conftest import PHI_MARKER, write_test_notes


def _submit(
    master: str,
    args: list[str],
    py_files: str | None = None,
    conf: dict | None = None,
    cwd=None,
    *,
    archives: str | None = None,
    python: Path | str = sys.executable,
    driver_python: Path | str = sys.executable,
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYSPARK_PYTHON": str(python),
        "PYSPARK_DRIVER_PYTHON": str(driver_python),
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    env.pop("PYTHONPATH", None)  # executors must get the code from --py-files or --archives, not from this checkout
    cmd = [str(spark_home() / "bin" / "spark-submit"), "--master", master, "--conf", "spark.ui.enabled=false"]
    for k, v in (conf or {}).items():
        cmd += ["--conf", f"{k}={v}"]
    if py_files:
        cmd += ["--py-files", py_files]
    if archives:
        cmd += ["--archives", archives]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


def python_without_clinlong(dest: Path, with_pip: bool = False) -> Path:
    """A venv whose Python has this environment's dependencies (pyspark, onnxruntime, ...) but not clinlong,
    as on a cluster node where only the dependencies are installed: its sitecustomize appends this
    environment's site-packages to sys.path as a plain folder, so the .pth of clinlong's editable install
    there is never run and `import clinlong` fails. (A .pth path line would do the same, but venv-pack
    refuses to pack an environment that has one.)"""
    subprocess.run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(dest)], check=True)
    site = Path(
        subprocess.run(
            [str(dest / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "sitecustomize.py").write_text(f"import sys\nsys.path.append({sysconfig.get_paths()['purelib']!r})\n")
    python = dest / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import pyspark, onnxruntime, deltalake; import clinlong"],
        capture_output=True,
        text=True,
        cwd=dest,
    )
    assert "No module named 'clinlong'" in probe.stderr, probe.stderr[-2000:]
    return python


def build_wheel(dest: Path) -> Path:
    """The README's recipe: python -m pip wheel --no-deps -w dist ."""
    from tests.conftest import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = dest.glob("clinlong-*-py3-none-any.whl")
    return wheel


def note_vectors(table_path: Path) -> dict:
    t = DeltaTable(str(table_path)).to_pandas()
    return {(r.note_id, r.text_sha256): r.embedding for r in t.itertuples()}


@pytest.mark.slow
def test_standalone_cluster_without_clinlong_installed(tiny_artifact, tmp_path):
    """Both ways the README ships the code, on a cluster whose Python lacks clinlong: the wheel, copied to a
    .zip, through --py-files (zip import; PySpark ignores a .whl there on executors), and a venv-pack archive
    through --archives with spark.pyspark.python. Both tables equal each other and the engine's own note
    vectors (no Spark) for the same texts."""
    import pandas as pd

    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder, text_sha256
    from tests.conftest import ROOT

    notes = write_test_notes(tmp_path / "NOTEEVENTS.csv")
    wheel = build_wheel(tmp_path / "dist")
    zipped = tmp_path / "dist" / "clinlong.zip"  # PySpark puts .zip/.egg py-files on executors' sys.path, never .whl
    shutil.copy(wheel, zipped)
    bare = python_without_clinlong(tmp_path / "bare")
    # The packed environment: clinlong installed from the wheel (its dependencies as on the node, above).
    packed = python_without_clinlong(tmp_path / "packed", with_pip=True)
    subprocess.run([str(packed), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    subprocess.run(
        [sys.executable, "-m", "venv_pack", "-q", "-p", str(tmp_path / "packed"), "-o", str(tmp_path / "env.tar.gz")],
        check=True,
    )
    job = [
        str(ROOT / "pipelines" / "embed_notes.py"),
        "--notes",
        str(notes),
        "--model",
        str(tiny_artifact),
        "--id-type",
        "long",
        "--partitions",
        "4",
        "--precision",
        "fp32",
    ]
    conf = {"spark.executor.cores": "1", "spark.cores.max": "2"}
    with standalone_cluster(tmp_path / "cluster", [{"cores": 1}, {"cores": 1}]) as master:
        by_wheel = _submit(
            master,
            job + ["--out", str(tmp_path / "wheel_out")],
            str(zipped),
            conf,
            cwd=tmp_path,
            python=bare,
            driver_python=bare,
        )
        assert by_wheel.returncode == 0, by_wheel.stderr[-3000:]
        by_archive = _submit(
            master,
            job + ["--out", str(tmp_path / "archive_out")],
            conf=conf,
            cwd=tmp_path,
            archives=f"{tmp_path / 'env.tar.gz'}#environment",
            python="./environment/bin/python",
            driver_python=packed,
        )
        assert by_archive.returncode == 0, by_archive.stderr[-3000:]
        for run in (by_wheel, by_archive):
            assert PHI_MARKER not in run.stdout + run.stderr
    a, b = note_vectors(tmp_path / "wheel_out"), note_vectors(tmp_path / "archive_out")
    assert a.keys() == b.keys() and len(a) >= 8
    texts = pd.read_csv(notes, keep_default_na=False).TEXT.tolist()
    results = NoteEmbedder(Artifact.open(tiny_artifact), EmbedOptions(precision="fp32")).embed(texts)
    want = {text_sha256(t): r.note_vector() for t, r in zip(texts, results)}
    for key, vec in a.items():
        assert (vec is None) == (want[key[1]] is None) == (b[key] is None)
        if vec is not None:
            np.testing.assert_allclose(vec, want[key[1]], atol=1e-5)
            np.testing.assert_allclose(b[key], want[key[1]], atol=1e-5)
    # the executors ran in the cluster's workers, which keep their stderr per application
    assert any((tmp_path / "cluster").rglob("stderr"))
