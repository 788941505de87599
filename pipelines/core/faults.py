"""Failpoints for fault-injection tests: `CLINLONG_FAULTPOINT=name[:n][:marker]` makes the process that
reaches failpoint `name` for the n-th time (default 1) kill itself with SIGKILL — no cleanup, no
`finally`, exactly as the OOM killer or a lost node would. With a marker path the fault fires once across
processes (the marker is created first), so a retried Spark task does not die again. Unset: a no-op.
`CLINLONG_FAULT_RAISE` (see `raise_point`) makes the model step raise instead.
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


class InjectedFault(RuntimeError):
    """Raised by a raising failpoint (tests only)."""


def raise_point(note_ids: list, texts: list = ()) -> None:
    """Raising failpoints around the model step: `CLINLONG_FAULT_RAISE=model-call` makes every model call
    raise (a broken runtime or device); `CLINLONG_FAULT_RAISE=note:ID` makes every call holding note ID
    raise (a note the model step cannot take); `CLINLONG_FAULT_RAISE=text:WORD` every call holding a text
    that contains WORD (for callers without note ids: the ML stages). Unset: a no-op."""
    spec = os.environ.get("CLINLONG_FAULT_RAISE")
    if not spec:
        return
    if (
        spec == "model-call"
        or (spec.startswith("note:") and spec[5:] in {str(i) for i in note_ids})
        or (spec.startswith("text:") and any(isinstance(t, str) and spec[5:] in t for t in texts))
    ):
        raise InjectedFault("injected fault")
