"""clinlong: Clinical-Longformer embeddings for large clinical-note tables on Spark.

A regular package (not a namespace package), so that a wheel or zip of the project imports from
`--py-files` on executors whose Python does not have clinlong installed (zipimport needs the
`__init__.py`). Its subpackages live in the repository's top-level folders: `clinlong.export` in
export/, `clinlong.pipelines` in pipelines/, `clinlong.benchmarks` in benchmarks/ (pyproject.toml).
"""
__version__ = "0.1.0"

import warnings as _warnings

# transformers imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns on import ("IProgress not
# found"); our progress is text (logs, tqdm's plain bar), so the warning says nothing to a notebook user.
_warnings.filterwarnings("ignore", message="IProgress not found")
