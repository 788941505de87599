"""docker-compose.yml against the Compose specification's JSON schema (Docker does not run here), and
its Spark commands against the ones the standalone-cluster test runs."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
import yaml

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def compose_schema(tmp_path_factory) -> dict:
    """compose_spec.json as shipped in docker-compose 1.29.2's wheel (downloaded from PyPI)."""
    d = tmp_path_factory.mktemp("compose")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "docker-compose==1.29.2", "-d", str(d)],
        check=True,
        timeout=300,
    )
    wheel = next(d.glob("docker_compose-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        return json.loads(z.read("compose/config/compose_spec.json"))


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_spec(compose_schema):
    import jsonschema

    jsonschema.validate(_compose(), compose_schema)


def test_compose_topology():
    services = _compose()["services"]
    assert {"spark-master", "spark-worker-cpu", "spark-worker-gpu", "client"} <= set(services)
    gpu = services["spark-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    opts = gpu["environment"]["SPARK_WORKER_OPTS"]
    assert "spark.worker.resource.gpu.amount=1" in opts
    script = opts.split("discoveryScript=")[1].split()[0]
    assert script.startswith("/opt/clinlong/") and (ROOT / script[len("/opt/clinlong/") :]).exists()
    for name in ("spark-worker-cpu", "client"):
        assert "./models:/models" in services[name]["volumes"] and "./data:/data" in services[name]["volumes"]


def _flags(cmd: list[str]) -> list[str]:
    return [c for c in cmd if c.startswith("--") or c.startswith("org.apache.spark")]


def test_compose_commands_are_the_standalone_tests(tmp_path):
    import inspect

    from tests import cluster

    services = _compose()["services"]
    src = inspect.getsource(cluster.standalone_cluster)
    master, worker = services["spark-master"]["command"], services["spark-worker-cpu"]["command"]
    assert master[0] == worker[0] == "spark-class"
    for flag in _flags(master):
        assert f'"{flag}"' in src, flag
    for flag in _flags(worker):
        assert f'"{flag}"' in src, flag
    assert _flags(services["spark-worker-gpu"]["command"]) == _flags(worker)
