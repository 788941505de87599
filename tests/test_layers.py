"""The layers of the tree: core (no Spark) < spark < delta < jobs, export above the core only; no module
imports upward or in a cycle; `import clinlong.pipelines` and the core import no Spark."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

RANK = {"core": 0, "spark": 1, "delta": 2, "jobs": 3}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in (
        ("pipelines", "clinlong.pipelines"),
        ("export", "clinlong.export"),
        ("benchmarks", "clinlong.benchmarks"),
    ):
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(path: Path) -> set[str]:
    """Every clinlong module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clinlong"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clinlong"))
    return found


def _layer(mod: str) -> tuple[str, int]:
    parts = mod.split(".")
    if parts[1] == "pipelines":
        return "pipelines", RANK.get(parts[2], 4) if len(parts) > 2 else 4  # entry points sit on top
    return parts[1], {"export": 5, "benchmarks": 6}[parts[1]]


def test_no_module_imports_upward():
    mods = _modules()
    upward = []
    for mod, path in mods.items():
        _, rank = _layer(mod)
        for target in _imports(path):
            if target not in mods:
                continue  # a name imported from a module
            if mod.startswith("clinlong.pipelines") and target.startswith(("clinlong.export", "clinlong.benchmarks")):
                upward.append((mod, target))  # the pipeline never imports conversion code
            elif (
                mod.startswith("clinlong.export")
                and target.startswith("clinlong.pipelines")
                and not target.startswith("clinlong.pipelines.core")
            ):
                upward.append((mod, target))  # export uses the core only (the one model definition)
            elif _layer(target)[0] == "pipelines" and mod.startswith("clinlong.pipelines") and _layer(target)[1] > rank:
                upward.append((mod, target))
    assert not upward, upward


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {t for t in _imports(p) if t in mods and t != m} for m, p in mods.items()}
    # a package's __init__ importing nothing of its children keeps parents out of cycles
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in graph[m]:
            visit(t)
        stack.pop()

    for m in graph:
        visit(m)
    assert not cycles, cycles[:3]


def test_the_core_and_the_package_import_no_spark():
    code = (
        "import sys; import clinlong.pipelines, clinlong.pipelines.core.engine, clinlong.pipelines.core.runtime, "
        "clinlong.pipelines.core.schema, clinlong.pipelines.core.storage, clinlong.pipelines.core.config; "
        "from clinlong.pipelines import load; "
        "assert not [m for m in sys.modules if m.startswith(('pyspark', 'torch', 'transformers'))], "
        "sorted(m for m in sys.modules if m.startswith(('pyspark', 'torch', 'transformers')))[:5]"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_one_place_builds_a_delta_table():
    """Every delta-rs table is opened by `core.storage.open_table` (`delta.sink.open_table`): one URI rule
    (s3a:// as s3://) and one set of storage options for the job, its readers, maintain and neighbours."""
    mods = _modules()
    builders = sorted(
        str(p.relative_to(ROOT))
        for m, p in mods.items()
        if m.startswith("clinlong.pipelines") and "DeltaTable(" in p.read_text()
    )
    assert builders == ["pipelines/core/storage.py"], builders


MODEL_STEP = {"embed", "prepare", "finish", "analyze", "analyze_many"}  # NoteEmbedder's batch calls
CORE_ONLY = {"overlapped", "NoteEmbedder", "NoteResult"}


def test_batch_and_vector_logic_live_in_the_core():
    """No module under spark/ or delta/ runs the batch loop itself (the model step, preparation, overlap,
    results): each front-end (the job's tasks, the one-liner, the ML stages) goes through core.batches, so
    all isolate a bad note the same way."""
    found = []
    for mod, path in _modules().items():
        if not mod.startswith(("clinlong.pipelines.spark", "clinlong.pipelines.delta")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr in MODEL_STEP
                and not (isinstance(f.value, ast.Name) and f.value.id == "self")
            ):
                found.append(f"{mod}:{node.lineno} .{f.attr}()")
            while isinstance(f, ast.Attribute):
                f = f.value
            if isinstance(f, ast.Name) and f.id in CORE_ONLY:
                found.append(f"{mod}:{node.lineno} {f.id}")
    assert not found, found


def test_user_errors_live_in_one_module_with_their_exit_codes():
    """core.errors defines every error a user sees, each with its exit code; the modules that raise them
    re-export the same classes, and no other module under pipelines/ defines one."""
    from clinlong.pipelines.core import errors
    from clinlong.pipelines.core.artifact import ArtifactError
    from clinlong.pipelines.core.batches import ModelStepFailed
    from clinlong.pipelines.core.storage import StorageError
    from clinlong.pipelines.delta.sink import CommitConflict
    from clinlong.pipelines.jobs.neighbours import NeighboursError
    from clinlong.pipelines.spark.jars import JarError
    from clinlong.pipelines.spark.java import JavaNotFound
    from clinlong.pipelines.spark.sources import InputError

    same = [
        ArtifactError is errors.ArtifactError,
        StorageError is errors.StorageError,
        CommitConflict is errors.CommitConflict,
        NeighboursError is errors.NeighboursError,
        JarError is errors.JarError,
        JavaNotFound is errors.JavaNotFound,
        InputError is errors.InputError,
        ModelStepFailed is errors.ModelStepFailed,
    ]
    assert all(same), same
    codes = {
        e.__name__: e.exit_code
        for e in (
            InputError,
            errors.OutputError,
            StorageError,
            ArtifactError,
            JarError,
            JavaNotFound,
            NeighboursError,
            CommitConflict,
            ModelStepFailed,
        )
    }
    assert codes == {**{k: 2 for k in codes}, "CommitConflict": 3, "ModelStepFailed": 4}
    assert issubclass(errors.OutputError, InputError)  # callers that catch input errors still catch it
    defined = []
    for mod, path in _modules().items():
        if mod.startswith("clinlong.pipelines") and not mod.endswith((".errors", ".faults")):
            defined += [
                f"{mod}.{n.name}"
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.ClassDef)
                and any(getattr(b, "id", "").endswith(("Error", "Exception")) for b in n.bases)
            ]
    assert not defined, defined
