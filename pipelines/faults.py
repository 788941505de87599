"""Failpoints for fault-injection tests: `CLINLONG_FAULTPOINT=name[:n][:marker]` makes the process that
reaches failpoint `name` for the n-th time (default 1) kill itself with SIGKILL — no cleanup, no
`finally`, exactly as the OOM killer or a lost node would. With a marker path the fault fires once across
processes (the marker is created first), so a retried Spark task does not die again. Unset: a no-op.
"""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("CLINLONG_FAULTPOINT")
    if not spec:
        return
    want, _, rest = spec.partition(":")
    if want != name:
        return
    nth, _, marker = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
