"""Logging for the `clinlong` loggers: one stderr handler, and a formatter that never prints exception
messages or tracebacks (they can quote note text), only the exception's type."""

from __future__ import annotations

import logging
import sys

ROOT = "clinlong"


class _Stderr(logging.StreamHandler):
    """A handler writing to the current sys.stderr (notebooks and tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class SafeFormatter(logging.Formatter):
    """`[part] message` (the logger's name below `clinlong`); an attached exception shows as its type alone."""

    def __init__(self):
        super().__init__("[%(part)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.part = record.name.removeprefix(ROOT + ".") or ROOT
        return super().format(record)

    def formatException(self, ei) -> str:
        return f"({ei[0].__name__ if ei and ei[0] else 'exception'}; details withheld: they may quote input)"

    def formatStack(self, stack_info: str) -> str:
        return ""


def configure(level: int = logging.INFO) -> logging.Logger:
    """Attach the handler to the `clinlong` logger once (idempotent); return it."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        h = _Stderr()
        h.setFormatter(SafeFormatter())
        root.addHandler(h)
        root.setLevel(level)
        root.propagate = False
    return root
