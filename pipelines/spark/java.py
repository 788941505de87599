"""The Java runtime Spark needs: 17 or newer (Spark 4 is built and tested on 17 and 21).

`ensure_java()` is called before a session starts (the job, the one-liner, the benchmarks): the JDK named
by JAVA_HOME, else the `java` on PATH, else a JDK under /usr/lib/jvm (21 or 17 first, then the newest), as
`make` looks for one. Without any, one line names the install instead of PySpark's "JAVA_HOME is not set"
and its traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from clinlong.pipelines.core.errors import JavaNotFound  # noqa: F401 - re-exported: defined in core.errors

MIN_VERSION = 17
PREFERRED = (21, 17)  # the versions Spark 4 is tested on, before any newer one
JVM_ROOTS = (Path("/usr/lib/jvm"), Path("/Library/Java/JavaVirtualMachines"))
INSTALL_HINT = (
    "install one (Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless; Fedora: sudo dnf "
    "install java-17-openjdk-headless; macOS: brew install openjdk@17) or set JAVA_HOME to a JDK 17+"
)


def java_version(java: Path | str) -> int | None:
    """The feature version (17, 21, ...) that `java -version` reports, or None if it does not run."""
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def _candidates() -> list[Path]:
    homes = []
    for root in JVM_ROOTS:
        if root.is_dir():
            homes += [
                h / "Contents" / "Home" if (h / "Contents" / "Home").is_dir() else h
                for h in sorted(root.iterdir())
                if h.is_dir() and not h.is_symlink()
            ]
    return homes


def ensure_java() -> str:
    """Make sure Spark will start a Java 17+ JVM; return the JAVA_HOME (or java path) chosen. Where neither
    JAVA_HOME nor PATH has one, set JAVA_HOME (and PATH) to a JDK found under /usr/lib/jvm for this process
    and the JVM it starts. Raises JavaNotFound (one line) when there is none."""
    home = os.environ.get("JAVA_HOME")
    if home:
        v = java_version(Path(home) / "bin" / "java")
        if v is not None and v >= MIN_VERSION:
            return home
    on_path = shutil.which("java")
    if not home and on_path:
        v = java_version(on_path)
        if v is not None and v >= MIN_VERSION:
            return on_path
    found = {h: java_version(h / "bin" / "java") for h in _candidates()}
    usable = {h: v for h, v in found.items() if v is not None and v >= MIN_VERSION}
    if usable:
        best = sorted(
            usable,
            key=lambda h: (
                usable[h] not in PREFERRED,
                PREFERRED.index(usable[h]) if usable[h] in PREFERRED else -usable[h],
            ),
        )[0]
        os.environ["JAVA_HOME"] = str(best)
        os.environ["PATH"] = f"{best / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        return str(best)
    what = (
        f"JAVA_HOME={home} is not a Java {MIN_VERSION}+ JDK"
        if home
        else f"no Java {MIN_VERSION}+ on PATH or under {' or '.join(map(str, JVM_ROOTS)) or 'a JVM folder'}"
    )
    raise JavaNotFound(f"Spark needs Java {MIN_VERSION} or newer: {what}; {INSTALL_HINT}")
