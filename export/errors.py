"""The export stage's one error type: a one-line message that names the problem and the fix."""


class ExportError(Exception):
    """Raised for bad input to the export; `python -m clinlong.export` prints it as one line and exits 2."""
