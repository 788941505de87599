"""The notebooks run end to end on the tiny synthetic model with local Spark, in order, as a user would."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Warnings that reached users of the demo and notebooks and say nothing about their data: torch's ONNX
# exporter on torchvision, transformers on long inputs it never runs, setuptools, tqdm without ipywidgets.
NOISE = (
    "torchvision is not installed",
    "indexing errors",
    "SetuptoolsDeprecationWarning",
    "BuildBackendWarning",
    "TqdmWarning",
    "IProgress not found",
)


def test_notebooks_are_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_export.ipynb",
        "02_embed_notes.ipynb",
        "03_explore.ipynb",
        "04_one_liner.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), path.name


@pytest.mark.slow
def test_notebooks_execute_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINLONG_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, (path.name, errors)
        streams = "".join(
            o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
        )
        assert not [n for n in NOISE if n in streams], (path.name, [n for n in NOISE if n in streams])
    work = tmp_path / "work"
    assert (work / "artifact" / "manifest.json").exists()
    assert (work / "delta" / "note_embeddings" / "_delta_log").is_dir()
    assert (work / "projection.png").stat().st_size > 5000 and (work / "sentence_similarity.png").exists()
