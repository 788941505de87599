"""The linter and the formatter are part of the suite: `ruff check` and `ruff format --check` over the whole
checkout (rules and line length in pyproject.toml [tool.ruff]), with the ruff pinned in the `test` extra, run as
this Python's module so a ruff elsewhere on PATH plays no part. `ruff format .` fixes what the second one finds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

COMMANDS = {
    "check": ["check", "--no-cache", "--output-format", "concise"],
    "format": ["format", "--no-cache", "--check"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_ruff_finds_nothing(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *COMMANDS[command], str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "No module named ruff" not in proc.stderr, "ruff is missing: pip install -e '.[test]' (it pins ruff)"
    assert proc.returncode == 0, (
        f"ruff {command} found problems (`ruff {command} .` shows them):\n{proc.stdout}{proc.stderr}"
    )
