"""The `clinlong` package imports wherever the README says it does, also without an install."""

from __future__ import annotations

import subprocess
import sys
import sysconfig

from tests.conftest import ROOT


def test_checkout_root_on_sys_path_imports_the_checkout_without_an_install():
    """A Python without clinlong, started in the checkout's root (as spark-submit's workers are when it runs
    from there): `clinlong/__init__.py` is found first and names the checkout's folders as its subpackages'."""
    script = (
        "import sys; sys.path.insert(0, ''); sys.path.append(%r)\n"
        "import clinlong, clinlong.pipelines.core.artifact as a, clinlong.export.staging as s\n"
        "print(a.__file__); print(s.__file__)"
    ) % sysconfig.get_paths()["purelib"]
    done = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"}
    )  # -S: no site .pth files, so no editable install
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [
        str(ROOT / "pipelines" / "core" / "artifact.py"),
        str(ROOT / "export" / "staging.py"),
    ]
