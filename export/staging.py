"""Atomic directory writes: build the artifact beside OUT, rename it into place at the end.

A failed, interrupted or disk-full export leaves no OUT (or the previous OUT untouched with
--overwrite; a kill between the two renames of an overwrite is repaired by the next export, which
puts the previous OUT back before anything else). Staging folders are named `.NAME.partial-PID-XXXX`;
those left by a killed process (its pid no longer alive) are removed the next time anything is exported
to the same OUT.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clinlong.export.errors import ExportError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Clean up after killed exports. A killed process's staging folders are deleted, except where it
    died between its two renames (OUT moved aside, the new copy not yet in place): then OUT is missing
    and the copy it moved aside (`-old-`) is renamed back, so no kill ever loses the previous artifact."""
    stale = []
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit(".partial-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            stale.append(p)
    moved_aside = [p for p in stale if "-old-" in p.name]
    if not out.exists() and moved_aside:
        newest = max(moved_aside, key=lambda p: p.stat().st_mtime)
        newest.rename(out)
        stale.remove(newest)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The OSError for a full disk (or file-size limit) anywhere in `exc`'s cause chain. Libraries
    with native writers (safetensors, onnx) report it in their own exception as "(os error N)"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        native = re.search(r"os error (\d+)", str(exc))
        if native and int(native.group(1)) in _DISK_FULL:
            code = int(native.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


def apply_umask(root: Path) -> None:
    """Give the staged tree the modes any model file gets under the user's umask (0644/0755 under the usual
    022): `mkdtemp` makes the folder 0700, and some native writers (safetensors) create files 0600, which
    would leave the artifact readable by its owner alone."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def staged_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that becomes `out` when the block completes."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it or choose another OUT")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; remove it or choose another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_cause(e)
        if full is not None:
            raise ExportError(
                f"ran out of disk space writing beside {out} ({os.strerror(full.errno)}); "
                "free space there or choose another OUT"
            ) from None
        raise
