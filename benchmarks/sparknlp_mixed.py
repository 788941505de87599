"""Our stages and Spark NLP's in one Spark ML pipeline (issue 20, point 3): the environment and one run.

Spark NLP's JAR here is spark-nlp_2.12 5.5.3 (Spark 3.5, Scala 2.12; Maven Central serves no spark-nlp_2.13),
which our job's pyspark 4.1 cannot load, so the mixed pipeline runs our stages on pyspark 3.5, in their
own venv, `.venv-sparknlp-mixed`: pyspark 3.5.8 + spark-nlp 5.5.3 + clinlong's base install (tokenizers,
onnxruntime, numpy, pyarrow, pandas, deltalake, tqdm: no torch, so our stages run the artifact's ONNX graph),
and clinlong itself from this checkout through a `.pth` file (no copy to go stale, nothing written to the
working tree). Created on first use (about 25 s with a warm pip cache, 50 s cold; see the README), reused
while its imports work and its requirements are those it was made with. The JARs are
benchmarks/sparknlp_jvm.py's (one Maven class path, cached).

Whatever cannot be set up raises `Unavailable` (sparknlp_jvm's) with one line naming what is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

from clinlong.benchmarks import sparknlp_jvm
from clinlong.benchmarks.sparknlp_jvm import PYSPARK_VERSION, ROOT, SPARKNLP_VERSION, Unavailable, _last_error

VENV = Path(os.environ.get("CLINLONG_SPARKNLP_MIXED_VENV", ROOT / ".venv-sparknlp-mixed"))
RUNNER = Path(__file__).with_name("sparknlp_mixed_runner.py")


def requirements() -> list[str]:
    """pyspark 3.5 and spark-nlp of the JAR's version, with clinlong's base dependencies (pyproject.toml)."""
    try:
        import tomllib  # Python 3.11+

        base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    except ImportError:  # Python 3.10: the installed distribution's metadata (the same list)
        from importlib.metadata import requires

        base = [r for r in requires("clinlong") or [] if "extra ==" not in r]
    return [f"pyspark=={PYSPARK_VERSION}", f"spark-nlp=={SPARKNLP_VERSION}", *base]


def _site_packages(py: Path) -> Path:
    out = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(out)


def python() -> Path:
    """The venv's Python: pyspark 3.5, spark-nlp, clinlong's base install, and this checkout's clinlong."""
    py = VENV / "bin" / "python"
    stamp = VENV / "clinlong-requirements.json"
    wanted = requirements()
    probe = (
        "import sys, pyspark, sparknlp, onnxruntime, clinlong; "
        "from clinlong.pipelines.spark.stages import LongformerEmbeddings; "
        f"sys.exit(not (pyspark.__version__ == '{PYSPARK_VERSION}' and sparknlp.version() == '{SPARKNLP_VERSION}' "
        f"and clinlong.__file__ == {str(ROOT / 'clinlong' / '__init__.py')!r}))"
    )
    if (
        py.exists()
        and stamp.exists()
        and json.loads(stamp.read_text()) == wanted
        and subprocess.run([str(py), "-c", probe], capture_output=True, cwd="/").returncode == 0
    ):
        return py
    venv.create(VENV, with_pip=True, clear=True)
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", *wanted], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(
            f"{' '.join(wanted[:2])} + clinlong's base install cannot be installed into {VENV}: "
            f"{_last_error(proc.stderr)}"
        )
    (_site_packages(py) / "clinlong-checkout.pth").write_text(f"{ROOT}\n")
    proc = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        raise Unavailable(
            f"clinlong does not import under pyspark {PYSPARK_VERSION} in {VENV}: "
            f"{_last_error(proc.stderr) if proc.stderr else 'a version differs'}"
        )
    stamp.write_text(json.dumps(wanted))
    return py


def unavailable_reason() -> str | None:
    """None when the mixed pipeline can run here (setting it up if needed), else one line saying why not."""
    return sparknlp_jvm.unavailable_reason(python)


def run(spec: dict, out: Path, timeout: float = 1800) -> dict:
    """Run benchmarks/sparknlp_mixed_runner.py in the mixed venv; returns its result.json. A failure raises
    RuntimeError with the runner's last lines."""
    return sparknlp_jvm.run(spec, out, timeout, runner=RUNNER, venv_python=python, what="the mixed pipeline's run")


if __name__ == "__main__":  # set the venv up (or say why not): python -m clinlong.benchmarks.sparknlp_mixed
    why = unavailable_reason()
    print(why or f"ready: {python()}")
    sys.exit(1 if why else 0)
