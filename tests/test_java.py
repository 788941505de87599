"""Finding Java for Spark (spark/java.py): JAVA_HOME, PATH, /usr/lib/jvm, and the one-line refusal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinlong.pipelines.spark import java
from tests.conftest import ROOT


def _fake_jdk(root: Path, name: str, version: str) -> Path:
    home = root / name
    (home / "bin").mkdir(parents=True)
    exe = home / "bin" / "java"
    exe.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2025-04-15' >&2\n")
    exe.chmod(0o755)
    return home


@pytest.fixture(autouse=True)
def own_environment(monkeypatch):
    """ensure_java sets JAVA_HOME and PATH in os.environ for the JVM it is about to start: here in a copy, so
    a fake JDK never reaches the Spark sessions of later tests in this process."""
    monkeypatch.setattr(os, "environ", dict(os.environ))


def test_prefers_jdk_21_or_17_under_jvm_root(tmp_path, monkeypatch):
    for name, version in (("jdk-11", "11.0.2"), ("jdk-25", "25.0.1"), ("jdk-17", "17.0.15"), ("jre-8", "1.8.0_402")):
        _fake_jdk(tmp_path, name, version)
    monkeypatch.setattr(java, "JVM_ROOTS", (tmp_path,))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert java.ensure_java() == str(tmp_path / "jdk-17")
    assert os.environ["JAVA_HOME"] == str(tmp_path / "jdk-17")
    assert os.environ["PATH"].startswith(str(tmp_path / "jdk-17" / "bin"))
    assert java.java_version(tmp_path / "jre-8" / "bin" / "java") == 8


def test_too_old_or_none_is_one_line(tmp_path, monkeypatch):
    _fake_jdk(tmp_path, "jdk-11", "11.0.2")
    monkeypatch.setattr(java, "JVM_ROOTS", (tmp_path,))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk-11"))
    with pytest.raises(java.JavaNotFound) as e:
        java.ensure_java()
    assert "\n" not in str(e.value) and "JAVA_HOME=" in str(e.value) and "openjdk-17" in str(e.value)


def test_job_without_java_prints_one_line(tiny_artifact, tmp_path):
    """The job as a user runs it on a machine without Java: exit 2, one line naming the install, no traceback."""
    notes = tmp_path / "n.csv"
    notes.write_text("ROW_ID,TEXT\n1,Chest pain.\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "PYSPARK_GATEWAY_PORT")}
    env.update(PATH=str(Path(sys.executable).parent), PYTHONPATH=str(ROOT))
    script = (
        "import clinlong.pipelines.spark.java as j; j.JVM_ROOTS = (); "
        "from clinlong.pipelines.jobs.embed_notes import main; import sys; "
        f"sys.exit(main(['--notes', {str(notes)!r}, '--model', {str(tiny_artifact)!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Spark needs Java 17 or newer"), lines
