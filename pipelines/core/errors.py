"""The errors a user of the job and its tools sees, in one module, each with the exit code the command
line gives it: 2 for what the user can fix before any work (input, output, artifact, storage, JARs, Java),
3 for a commit another writer made impossible (rerun the same command), 4 for a Spark task that failed
past its retries. Messages are one line that names the fix, and never quote note text.

The modules that raise them re-export them under their old names (`spark.sources.InputError`,
`core.artifact.ArtifactError`, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on; `exit_code` is what the job's command line returns for it."""

    exit_code = 2


class InputError(UserError):
    """Bad input detected before any work starts; the message names the fix."""


class OutputError(InputError):
    """An output the run cannot write (a foreign folder, another schema or model, a missing catalog schema,
    a location this writer cannot reach), detected before any work starts. (An InputError too, for callers
    that catch those.)"""


class StorageError(UserError, ValueError):
    """A table location this writer or reader cannot use; the message names the fix."""


class ArtifactError(UserError):
    """The artifact is missing, incomplete or altered; the message says how to fix it."""


class JarError(UserError, RuntimeError):
    """A JAR the session needs cannot be resolved or does not fit the installed Spark; one line."""


class JavaNotFound(UserError, RuntimeError):
    """No Java 17+ runtime was found; the message is one line naming the install."""


class NeighboursError(UserError, ValueError):
    """The table cannot answer the question (not a note table, no such note); one line for the user."""


class CommitConflict(UserError):
    """Another writer changed the table in a way this commit cannot be reconciled with: committed chunks are
    kept, rerunning the same command finishes the run."""

    exit_code = 3


class ModelStepFailed(RuntimeError):
    """The model step failed for a reason that is not one note's: the task fails and Spark retries it; past
    its retries the job exits with `exit_code` (the driver finds it in the task's forwarded traceback)."""

    exit_code = 4
