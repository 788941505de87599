"""spark-submit to a real standalone cluster (master + two workers on 127.0.0.1), the project shipped
with --py-files; the Delta table must equal a local[2] run's."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from deltalake import DeltaTable

from tests.cluster import project_zip, spark_home, standalone_cluster
from tests.conftest import PHI_MARKER, write_test_notes


def _submit(master: str, args: list[str], py_files: str | None = None, conf: dict | None = None,
            cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("PYTHONPATH", None)  # executors must get the code from --py-files, not from this checkout
    cmd = [str(spark_home() / "bin" / "spark-submit"), "--master", master, "--conf", "spark.ui.enabled=false"]
    for k, v in (conf or {}).items():
        cmd += ["--conf", f"{k}={v}"]
    if py_files:
        cmd += ["--py-files", py_files]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_standalone_cluster_matches_local(tiny_artifact, tmp_path):
    from tests.conftest import ROOT

    notes = write_test_notes(tmp_path / "NOTEEVENTS.csv")
    zipped = project_zip(tmp_path / "clinlong.zip")
    job = [str(ROOT / "pipelines" / "embed_notes.py"), "--notes", str(notes), "--model", str(tiny_artifact),
           "--id-type", "long", "--partitions", "4", "--precision", "fp32"]
    local = _submit("local[2]", job + ["--out", str(tmp_path / "local")], str(zipped))
    assert local.returncode == 0, local.stderr[-3000:]
    with standalone_cluster(tmp_path / "cluster", [{"cores": 1}, {"cores": 1}]) as master:
        remote = _submit(master, job + ["--out", str(tmp_path / "cluster_out")], str(zipped),
                         {"spark.executor.cores": "1", "spark.cores.max": "2"}, cwd=tmp_path)
        assert remote.returncode == 0, remote.stderr[-3000:]
        assert PHI_MARKER not in remote.stdout + remote.stderr
    a = DeltaTable(str(tmp_path / "local")).to_pandas().sort_values(["note_id", "text_sha256"]).reset_index(drop=True)
    b = DeltaTable(str(tmp_path / "cluster_out")).to_pandas().sort_values(["note_id", "text_sha256"]).reset_index(drop=True)
    assert list(a.note_id) == list(b.note_id) and list(a.n_tokens) == list(b.n_tokens)
    for x, y in zip(a.embedding, b.embedding):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(x, y, atol=1e-5)
    # the executors ran in the cluster's workers, which keep their stderr per application
    assert any((tmp_path / "cluster").rglob("stderr"))
