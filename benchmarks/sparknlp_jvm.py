"""Spark NLP's own JVM beside ours: the set-up (a separate virtual environment and the JARs) and one run.

Spark NLP is the reference here, so its own JAR runs, not our reading of it. What this machine can reach
(measured): Maven Central serves `com.johnsnowlabs.nlp:spark-nlp_2.12:5.5.3` (Spark 3.5, Scala 2.12) but no
`spark-nlp_2.13` (7.x, Spark 4); 5.5.3's TensorFlow runtime, JSL's `tensorflow-cpu_2.12:0.4.4` (a build of
TF-Java 0.4), is not served, so sparknlp-jvm.pom.xml takes TF-Java's own `org.tensorflow:tensorflow-core-api:0.4.2`
(TF 2.7.4, linux-x86_64 natives, JavaCPP 1.5.6), which has every TF-Java class and method 5.5.3 calls (JSL's
0.3.3, TF 2.4.1, lacks `Session.initialize()`, so saved models could not be loaded back). Our own job runs on
pyspark 4.1 (delta-spark 4.x), so Spark NLP gets its own venv, `.venv-sparknlp-jvm` (pyspark 3.5.8 + spark-nlp
5.5.3 + numpy; about 1.3 min to create, reused while its imports work), and its JARs are resolved by Maven into
~/.m2 (about 450 MB, once); the class path is cached under ~/.cache/clinlong/sparknlp-jvm.

Whatever cannot be set up raises `Unavailable` with one line naming what is missing.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import venv
from collections.abc import Callable, Iterator
from pathlib import Path

SPARKNLP_VERSION = "5.5.3"
PYSPARK_VERSION = "3.5.8"
COORDINATE = f"com.johnsnowlabs.nlp:spark-nlp_2.12:{SPARKNLP_VERSION}"
# TF-Java 0.4 (TF 2.7.4); 5.5.3 declares JSL's build of it, tensorflow-cpu_2.12:0.4.4 (not served)
TF_RUNTIME = "org.tensorflow:tensorflow-core-api:0.4.2"
ROOT = Path(__file__).resolve().parents[1]
POM = Path(__file__).with_name("sparknlp-jvm.pom.xml")
RUNNER = Path(__file__).with_name("sparknlp_runner.py")
VENV = Path(os.environ.get("CLINLONG_SPARKNLP_JVM_VENV", ROOT / ".venv-sparknlp-jvm"))
CACHE = Path(os.environ.get("CLINLONG_CACHE", Path.home() / ".cache" / "clinlong")) / "sparknlp-jvm"
TF_VENV = ROOT / ".venv-sparknlp"  # the `sparknlp` extra (TensorFlow), which writes the SavedModel
REAL_VOCAB = 50265  # RoBERTa's vocabulary: Spark NLP warms its Longformer up on ids up to 42,752
log = logging.getLogger("clinlong.benchmarks")


@contextlib.contextmanager
def setup_lock(name: str) -> Iterator[None]:
    """One process at a time sets up `name` (a venv, the class path, an export): test workers and benchmarks
    share these, and a venv created twice at once (`clear=True`) breaks both."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Unavailable(RuntimeError):
    """Spark NLP's JVM cannot be set up here; the message is one line saying what and why."""


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Could not" in ln or "ERROR" in ln or "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[0][:300]


def classpath() -> list[str]:
    """The JARs of sparknlp-jvm.pom.xml (Spark NLP and its runtime dependencies), resolved once by Maven."""
    with setup_lock("classpath"):
        return _classpath()


def _classpath() -> list[str]:
    cached = CACHE / f"classpath-{hashlib.sha256(POM.read_bytes()).hexdigest()[:12]}.txt"
    if cached.exists():
        jars = cached.read_text().strip().split(os.pathsep)
        if jars and all(Path(j).exists() for j in jars):
            return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise Unavailable(f"{COORDINATE}: Maven (mvn) is not on PATH to resolve it from Maven Central")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    proc = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:build-classpath",
            f"-Dmdep.outputFile={tmp}",
            "-Dmdep.includeScope=runtime",
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0 or not tmp.exists():
        raise Unavailable(
            f"{COORDINATE} (with {TF_RUNTIME}) cannot be resolved by Maven: {_last_error(proc.stdout + proc.stderr)}"
        )
    tmp.replace(cached)
    return cached.read_text().strip().split(os.pathsep)


def python() -> Path:
    """The venv's Python with pyspark 3.5 and the spark-nlp Python package of the JAR's version."""
    with setup_lock("venv-sparknlp-jvm"):
        return _python()


def _python() -> Path:
    py = VENV / "bin" / "python"
    probe = (
        "import pyspark, sparknlp, numpy, sys; "
        f"sys.exit(not (pyspark.__version__ == '{PYSPARK_VERSION}' "
        f"and sparknlp.version() == '{SPARKNLP_VERSION}'))"
    )
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    venv.create(VENV, with_pip=True, clear=True)
    proc = subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            f"pyspark=={PYSPARK_VERSION}",
            f"spark-nlp=={SPARKNLP_VERSION}",
            "numpy",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise Unavailable(
            f"pyspark=={PYSPARK_VERSION} + spark-nlp=={SPARKNLP_VERSION} cannot be installed into "
            f"{VENV}: {_last_error(proc.stderr)}"
        )
    return py


def tf_python() -> Path:
    """`.venv-sparknlp`: the `sparknlp` extra (TensorFlow 2.21) that writes the SavedModel, created once
    (about 5 min on the 2-core VM) and reused while its imports work."""
    python = TF_VENV / "bin" / "python"
    probe = [str(python), "-c", "import tensorflow, tf_keras, transformers, torch, clinlong.export"]
    with setup_lock("venv-sparknlp"):
        if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
            return python
        venv.create(TF_VENV, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[sparknlp]"], check=True, cwd=ROOT)
    return python


def wide_checkpoint(path: Path) -> Path:
    """The tiny synthetic Longformer with its embedding matrix grown to the real 50,265 rows, at `path` (built
    once): Spark NLP cannot load a model smaller than RoBERTa's vocabulary. Byte-stable (seed 0), so every
    caller reuses one cached export."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoModelForMaskedLM

    from clinlong.export.synthetic import write_synthetic_checkpoint

    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    ckpt = write_synthetic_checkpoint(tmp, "tiny", seed=0)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(ckpt)
    model.resize_token_embeddings(REAL_VOCAB, mean_resizing=False)
    for f in ckpt.glob("*.bin"):
        f.unlink()
    model.save_pretrained(ckpt, safe_serialization=False)
    tmp.rename(path)
    return path


def sparknlp_export(ckpt: Path, label: str) -> Path:
    """`--format sparknlp` of the checkpoint (written by `tf_python()`), cached under CACHE as
    `export-{label}-{key}` while the checkpoint's files and export/sparknlp.py's code are unchanged (its syntax
    tree: reformatting or comments keep the cache); one process exports at a time. A failed export raises
    RuntimeError with the exporter's last line."""
    digest = hashlib.sha256(ast.dump(ast.parse((ROOT / "export" / "sparknlp.py").read_text())).encode())
    for f in sorted(ckpt.iterdir()):
        if f.is_file():
            digest.update(f.name.encode() + f.read_bytes())
    out = CACHE / f"export-{label}-{digest.hexdigest()[:16]}"
    with setup_lock(out.name):
        if (out / "saved_model.pb").exists():
            return out
        log.info("exporting %s for Spark NLP (TensorFlow SavedModel; minutes, cached afterwards)", ckpt.name)
        proc = subprocess.run(
            [str(tf_python()), "-m", "clinlong.export", str(ckpt), str(out), "--format", "sparknlp", "--overwrite"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=3600,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the Spark NLP export of {ckpt.name} failed: {_last_error(proc.stderr)}")
    return out


def java_ok() -> str | None:
    java = shutil.which("java")
    if java is None:
        return "Spark NLP's JVM needs Java 8/11/17 (Spark 3.5) and no `java` is on PATH"
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    if any(f'version "{v}' in out for v in ("1.8", "11", "17")):
        return None
    found = out.splitlines()[0] if out else "?"
    return f"Spark 3.5 (Spark NLP {SPARKNLP_VERSION}) runs on Java 8/11/17; found {found}"


def unavailable_reason(venv_python: Callable[[], Path] | None = None) -> str | None:
    """None when Spark NLP's JVM can run here (setting it and `venv_python`'s venv up if needed, by default
    `python()`), else one line saying why not."""
    try:
        reason = java_ok()
        if reason:
            return reason
        classpath()
        (venv_python or python)()
    except Unavailable as e:
        return str(e)
    return None


def run(
    spec: dict,
    out: Path,
    timeout: float = 1800,
    *,
    runner: Path = RUNNER,
    venv_python: Callable[[], Path] | None = None,
    what: str = "Spark NLP's run",
) -> dict:
    """Run `runner` (by default benchmarks/sparknlp_runner.py) with `venv_python()`'s Python (by default Spark
    NLP's venv) on a spec file holding `spec`, the class path and `out`; returns its out/result.json (vectors
    in out/vectors.npz), its output kept in out/runner.log. A failure raises RuntimeError with the runner's
    last lines, starting with `what`."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "classpath": classpath(), "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_HOME", "PYTHONPATH")
    }
    py = (venv_python or python)()
    env.update(PYSPARK_PYTHON=str(py), PYSPARK_DRIVER_PYTHON=str(py), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [str(py), str(runner), str(out / "spec.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=out,
    )
    (out / "runner.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (out / "result.json").exists():
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith("at ")][-15:]
        raise RuntimeError(f"{what} failed (rc {proc.returncode}):\n" + "\n".join(tail))
    return json.loads((out / "result.json").read_text())
