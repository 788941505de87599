"""clinlong: Clinical-Longformer embeddings for large clinical-note tables on Spark.

A regular package (not a namespace package), so that a wheel or zip of the project imports from
`--py-files` on executors whose Python does not have clinlong installed (zipimport needs the
`__init__.py`). Its subpackages live in the repository's top-level folders: `clinlong.export` in
export/, `clinlong.pipelines` in pipelines/, `clinlong.benchmarks` in benchmarks/ (pyproject.toml), and
are installed under clinlong/ as usual. In a source checkout this file is found first wherever the
checkout's root is on sys.path (Python started there, as Spark's workers are by spark-submit run from
it), so its package path also names the checkout's root, where those folders are.
"""

import warnings as _warnings
from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "pipelines" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - the package's own __path__

# transformers imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns on import ("IProgress not
# found"); our progress is text (logs, tqdm's plain bar), so the warning says nothing to a notebook user.
_warnings.filterwarnings("ignore", message="IProgress not found")
