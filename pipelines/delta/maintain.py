"""Table upkeep for the job's Delta outputs (delta-rs; Databricks users run OPTIMIZE / VACUUM instead).

    python -m clinlong.pipelines.maintain TABLE [--compact] [--vacuum] [--retention-hours H] [--dry-run]
                                          [--storage-option KEY=VALUE ...]

TABLE is named as the job's --out: a local path or a URI (`s3a://b/t` is opened as `s3://b/t`, the same
bucket, as the job's delta-rs writer does), reached with the standard AWS_*/AZURE_*/GOOGLE_* variables
plus any --storage-option, exactly as the job takes them.

--compact rewrites small files into ~target-size files (one commit, data unchanged, safe next to
appending jobs). --vacuum deletes files no table version within the retention references: files that
older versions removed, and orphans that killed runs wrote but never committed. Keep the retention
longer than any job runs (default 168 h), or a vacuum could delete a running job's uncommitted files:
a retention below the table's minimum (`delta.deletedFileRetentionDuration`, 7 days unless set) is
refused unless --force is given.
"""

from __future__ import annotations

import argparse
import sys


def _table(table_uri: str, storage_options: dict | None = None):
    """The delta-rs table at `table_uri` (the job's URI rule and storage options); FileNotFoundError if none."""
    from clinlong.pipelines.delta.sink import open_table

    dt = open_table(table_uri, storage_options)
    if dt is None:
        raise FileNotFoundError(f"{table_uri} is not a Delta table")
    return dt


def compact(table_uri: str, target_mb: int = 256, storage_options: dict | None = None) -> dict:
    """Merge small files; return delta-rs' metrics (files added/removed)."""
    return _table(table_uri, storage_options).optimize.compact(target_size=target_mb * 1024 * 1024)


def vacuum(
    table_uri: str,
    retention_hours: int = 168,
    dry_run: bool = False,
    force: bool = False,
    storage_options: dict | None = None,
) -> list[str]:
    """Delete unreferenced files older than the retention, including never-committed orphans (full
    vacuum). The table's minimum retention is enforced unless `force`."""
    return _table(table_uri, storage_options).vacuum(
        retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=not force, full=True
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinlong.pipelines.maintain", description=__doc__.split("\n\n")[0])
    p.add_argument("table", help="Delta table path or URI (the job's --out or its _errors table)")
    p.add_argument("--compact", action="store_true", help="merge small files")
    p.add_argument("--target-mb", type=int, default=256, help="compaction target file size")
    p.add_argument("--vacuum", action="store_true", help="delete unreferenced and orphan files")
    p.add_argument("--retention-hours", type=int, default=168, help="vacuum keeps files removed more recently")
    p.add_argument("--dry-run", action="store_true", help="vacuum: list, do not delete")
    p.add_argument(
        "--force",
        action="store_true",
        help="vacuum: allow a retention below the table's minimum (only when no job is writing to it)",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="delta-rs storage option (repeatable), beyond the AWS_*, AZURE_*, GOOGLE_* variables, "
        "as the job takes them",
    )
    args = p.parse_args(argv)
    if not (args.compact or args.vacuum):
        p.error("choose --compact and/or --vacuum")
    from clinlong.pipelines.core.storage import StorageError, parse_storage_options

    try:
        options = parse_storage_options(args.storage_option)
        _table(args.table, options)
    except StorageError as e:
        print(
            f"error: {e}; maintain uses delta-rs: where it cannot open a table, run delta-spark's OPTIMIZE and VACUUM",
            file=sys.stderr,
        )
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the store refused (credentials, endpoint): one line, no secrets
        print(
            f"error: cannot open {args.table}: {(str(e).strip().splitlines() or [type(e).__name__])[0][:300]} "
            "(set AWS_*, AZURE_* or GOOGLE_* variables or --storage-option KEY=VALUE)",
            file=sys.stderr,
        )
        return 2
    if args.compact:
        m = compact(args.table, args.target_mb, options)
        print(f"compacted: {m.get('numFilesRemoved', 0)} files into {m.get('numFilesAdded', 0)}")
    if args.vacuum:
        try:
            files = vacuum(args.table, args.retention_hours, args.dry_run, args.force, options)
        except Exception as e:  # noqa: BLE001 - delta-rs refuses a retention below the table's minimum
            if "retention" not in str(e).lower():
                raise
            print(
                f"error: --retention-hours {args.retention_hours} is below the table's minimum retention; a "
                "vacuum that short can delete files a running job has not committed yet. Pass --force only "
                "when no job writes to the table",
                file=sys.stderr,
            )
            return 2
        if args.dry_run:  # file names only (they hold ids and hashes, never text)
            print(
                f"vacuum (dry run): {len(files)} unreferenced files would be deleted"
                + "".join(f"\n  {f}" for f in sorted(files))
            )
        else:
            print(f"vacuum: {len(files)} unreferenced files deleted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
