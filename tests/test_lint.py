"""The linter is part of the suite: `ruff check` over the whole checkout (rules in pyproject.toml [tool.ruff]),
with the ruff pinned in the `test` extra, run as this Python's module so a ruff elsewhere on PATH plays no part."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_check_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "No module named ruff" not in proc.stderr, "ruff is missing: pip install -e '.[test]' (it pins ruff)"
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"
