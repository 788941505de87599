"""A real Spark standalone cluster on 127.0.0.1 for tests: master and workers started with spark-class,
stopped by their process ids."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def standalone_cluster(workdir: Path, workers: list[dict]):
    """Yield the master URL. Each worker dict: cores, memory, and optional extra SPARK_WORKER_OPTS."""
    home = spark_home()
    env = {
        **os.environ,
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOG_DIR": str(workdir / "logs"),
        "SPARK_WORKER_DIR": str(workdir / "work"),
    }
    port, ui = free_port(), free_port()
    procs = []
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spark_class = str(home / "bin" / "spark-class")
    try:
        procs.append(
            subprocess.Popen(
                [
                    spark_class,
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--webui-port",
                    str(ui),
                ],
                stdout=open(logs / "master.log", "w"),
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        _wait_for_port(port)
        url = f"spark://127.0.0.1:{port}"
        for i, w in enumerate(workers):
            wenv = {**env, "SPARK_WORKER_OPTS": w.get("opts", "")}
            procs.append(
                subprocess.Popen(
                    [
                        spark_class,
                        "org.apache.spark.deploy.worker.Worker",
                        url,
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        str(w.get("cores", 1)),
                        "--memory",
                        w.get("memory", "2g"),
                        "--webui-port",
                        str(free_port()),
                        "--work-dir",
                        str(workdir / f"worker{i}"),
                    ],
                    stdout=open(logs / f"worker{i}.log", "w"),
                    stderr=subprocess.STDOUT,
                    env=wenv,
                )
            )
        deadline = time.time() + 60
        while time.time() < deadline:  # the master log lists each registered worker
            if (logs / "master.log").read_text().count("Registering worker") >= len(workers):
                break
            time.sleep(0.3)
        else:
            raise TimeoutError("workers did not register with the master")
        yield url
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def project_zip(dest: Path) -> Path:
    """The project's packages as a zip for --py-files, laid out as installed (and as in the wheel):
    clinlong/__init__.py, clinlong/export, clinlong/pipelines."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    with zipfile.ZipFile(dest, "w") as z:
        z.write(root / "clinlong" / "__init__.py", "clinlong/__init__.py")
        for pkg in ("export", "pipelines"):
            for f in (root / pkg).rglob("*"):
                if f.is_file() and "__pycache__" not in f.parts:
                    z.write(f, Path("clinlong") / f.relative_to(root))
    return dest
