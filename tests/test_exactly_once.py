"""Points 1-4 of the Delta-at-scale issue with real processes: the job is killed (SIGKILL, no cleanup)
in its Python workers and in its driver before, between and after its commits, rerun, and the final
tables are compared row by row and vector by vector with a clean run. Also: two jobs writing one table
at once, and `--mode incremental`."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.jobs.embed_notes import JobConfig, format_summary, run
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
CHUNK = "12"


def write_notes(path: Path, n: int = 40, seed: int = 5, edit: dict | None = None) -> Path:
    """n synthetic notes (cut short: the tiny model is fast, the process kills are the point), every
    fifth one whitespace-only so that most chunks also hold errors-table rows."""
    from clinlong.export.synthetic_notes import generate_notes

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        w.writerow(["ROW_ID", "CATEGORY", "TEXT"])
        for note in generate_notes(n, seed=seed):
            text = "  \n " if note.row_id % 5 == 0 else note.text[:1500]
            w.writerow([note.row_id, note.category, (edit or {}).get(note.row_id, text)])
    return path


FP32 = EmbedOptions(precision="fp32")  # tables compared vector by vector at 1e-5 (bf16 differs by its rounding)


def job_cmd(notes: Path, model: Path, out: Path, *extra: str) -> list[str]:
    # local[N,F]: Spark retries a failed task up to F times
    return [
        sys.executable,
        "-m",
        "clinlong.pipelines.embed_notes",
        "--notes",
        str(notes),
        "--model",
        str(model),
        "--out",
        str(out),
        "--id-type",
        "long",
        "--chunk-notes",
        CHUNK,
        "--progress-every",
        "0",
        "--master",
        "local[2,4]",
        "--precision",
        "fp32",
        *extra,
    ]


def run_job(cmd: list[str], fault: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLINLONG_FAULTPOINT": fault}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def table(uri: Path, sort=("note_id", "text_sha256")):
    return DeltaTable(str(uri)).to_pandas().sort_values(list(sort), na_position="first").reset_index(drop=True)


def assert_same_tables(got: Path, want: Path) -> None:
    """Same rows (each note exactly once), vectors equal to a clean run's, same errors rows."""
    a, b = table(got), table(want)
    assert len(a) == len(b) and not a.duplicated(["note_id", "text_sha256"]).any()
    assert a.note_id.tolist() == b.note_id.tolist() and a.text_sha256.tolist() == b.text_sha256.tolist()
    assert a.n_tokens.tolist() == b.n_tokens.tolist()
    np.testing.assert_allclose(np.stack(a.embedding), np.stack(b.embedding), atol=1e-5)
    ea, eb = (table(Path(f"{p}_errors")) for p in (got, want))
    assert ea[["note_id", "text_sha256", "stage", "reason"]].equals(eb[["note_id", "text_sha256", "stage", "reason"]])


def unreferenced(uri: Path) -> set[str]:
    live = {Path(u).name for u in DeltaTable(str(uri)).file_uris()}
    return {p.name for p in uri.iterdir() if p.is_file() and p.name not in live}


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    return write_notes(tmp_path_factory.mktemp("eo") / "NOTEEVENTS.csv")


@pytest.fixture(scope="module")
def clean(notes, tiny_artifact, spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "t"
    s = run(
        JobConfig(
            notes=str(notes), model=str(tiny_artifact), out=str(out), id_type="long", chunk_notes=0, options=FP32
        ),
        spark,
    )
    assert s["rows_in"] == 40 and s["embedded"] == 32
    return out


def test_killed_again_and_again_then_equals_clean_run(notes, tiny_artifact, clean, tmp_path):
    """One table through a chain of kills, each rerun resuming where the last one died: the driver before
    chunk 1's commit, then between chunk 1's errors-table and output commits, then right after chunk 2's
    commit (before its leftovers are cleaned), then a Python worker mid-task (Spark retries the task and
    the run completes). The table then equals a clean run, and one more rerun writes nothing."""
    out = tmp_path / "t"
    cmd = job_cmd(notes, tiny_artifact, out)
    expect_chunks_done = [1, 1, 3]
    for fault, done in zip(
        ("driver-before-commit:2", "driver-between-commits:1", "driver-after-commit:2"), expect_chunks_done
    ):
        proc = run_job(cmd, fault)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert DeltaTable(str(out)).transaction_version(_app_id(out)) == done - 1  # whole chunks only
        assert not table(out).duplicated(["note_id", "text_sha256"]).any()
    errors_txn = DeltaTable(f"{out}_errors").transaction_version(_app_id(out))
    assert errors_txn >= 1  # chunk 1's errors were committed before the kill between the commits
    last = run_job(cmd, f"task-after-part:1:{tmp_path / 'fired'}")
    assert last.returncode == 0 and (tmp_path / "fired").exists(), last.stderr[-3000:]
    assert "resumed at chunk 3" in last.stdout
    assert_same_tables(out, clean)
    assert '"chunks": 4' in DeltaTable(str(out)).history(1)[0]["clinlong"]
    done = run_job(cmd)
    assert done.returncode == 0 and "nothing to do" in done.stdout
    assert_same_tables(out, clean)


def _app_id(out: Path) -> str:
    """The run's Delta app id, as recorded in the commit info of its chunks."""
    import json

    return "clinlong-" + json.loads(DeltaTable(str(out)).history(1)[0]["clinlong"])["run_id"]


def _workers() -> list[int]:
    """Spark's forked Python workers (children of a pyspark.daemon process)."""
    daemons, procs = set(), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"pyspark.daemon" in cmd:
            procs[int(pid)] = ppid
            daemons.add(int(pid))
    return [p for p, parent in procs.items() if parent in daemons]


def test_signals_to_workers_and_driver_from_outside(notes, tiny_artifact, clean, tmp_path):
    """SIGKILL sent by this test: to the job's Python workers once the first part is on disk (Spark
    retries the tasks), then to the driver while it works on chunk 3; a rerun finishes the table."""
    out = tmp_path / "t"
    cmd = job_cmd(notes, tiny_artifact, out, "--partitions", "2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    killed_workers = 0
    deadline = time.time() + 240
    while time.time() < deadline and not killed_workers and proc.poll() is None:
        if out.exists() and any(p.name.startswith("part-") for p in out.iterdir()):
            for pid in _workers():
                os.kill(pid, signal.SIGKILL)
                killed_workers += 1
        time.sleep(0.05)
    assert killed_workers, "no Python worker was seen while the job ran"
    while proc.poll() is None and time.time() < deadline:  # wait for chunk 2 to commit, then kill the driver
        if DeltaTable.is_deltatable(str(out)) and DeltaTable(str(out)).version() >= 1:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(60)
    again = run_job(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_tables(out, clean)


def test_two_jobs_append_to_one_table_at_once(tiny_artifact, clean, tmp_path):
    """Two different inputs appended to the same (new) table at the same moment: both succeed, the
    table is their union, each note once."""
    halves = []
    for i, keep in enumerate((lambda r: r <= 20, lambda r: r > 20)):
        full = write_notes(tmp_path / f"all{i}.csv")
        rows = list(csv.reader(full.open(encoding="utf-8")))
        part = tmp_path / f"half{i}.csv"
        with part.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, quoting=csv.QUOTE_NONNUMERIC).writerows([rows[0]] + [r for r in rows[1:] if keep(int(r[0]))])
        halves.append(part)
    out = tmp_path / "t"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            job_cmd(h, tiny_artifact, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for h in halves
    ]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), [e[-2000:] for _, e in results]
    assert_same_tables(out, clean)


def test_two_overwrites_at_once_never_mix(notes, tiny_artifact, clean, tmp_path):
    """Two overwrites of one table at once: each either commits (serially) or fails with the clear
    conflict error (exit 3); the table always equals one complete run's output, never a mix."""
    out = tmp_path / "t"
    run_job(job_cmd(notes, tiny_artifact, out, "--chunk-notes", "0", "--run-id", "seed"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            job_cmd(notes, tiny_artifact, out, "--mode", "overwrite", "--chunk-notes", "0", "--run-id", f"ow{i}"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc == 0 or (rc == 3 and "another writer changed" in err), err[-2000:]
    assert_same_tables(out, clean)


def test_incremental_embeds_new_and_changed_notes_only(tiny_artifact, spark, tmp_path):
    v1 = write_notes(tmp_path / "v1.csv", n=30)
    changed = {3: "Pt now afebrile. Repeat CXR clear.", 7: "Discharged home in stable condition."}
    v2 = write_notes(tmp_path / "v2.csv", n=36, edit=changed)  # notes 31-36 are new, 3 and 7 changed
    out = tmp_path / "t"
    base = dict(
        model=str(tiny_artifact), out=str(out), id_type="long", mode="incremental", chunk_notes=10, options=FP32
    )
    s1 = run(JobConfig(notes=str(v1), **base), spark)
    assert (s1["rows_in"], s1["embedded"]) == (30, 24)
    s2 = run(JobConfig(notes=str(v2), **base), spark)
    # new notes 31..36 (35 is whitespace-only) and the two changed ones
    assert (s2["rows_in"], s2["embedded"], s2["stale_rows_deleted"]) == (8, 7, 2)
    s3 = run(JobConfig(notes=str(v2), **base), spark)
    assert s3["rows_in"] == 0  # nothing left to do, errors included
    want = tmp_path / "clean"
    run(JobConfig(notes=str(v2), model=str(tiny_artifact), out=str(want), id_type="long", options=FP32), spark)
    assert_same_tables(out, want)


def test_incremental_killed_before_stale_rows_are_deleted(tiny_artifact, spark, tmp_path):
    v1 = write_notes(tmp_path / "v1.csv", n=20)
    v2 = write_notes(tmp_path / "v2.csv", n=20, edit={4: "Changed text for note four."})
    out = tmp_path / "t"
    run(
        JobConfig(
            notes=str(v1), model=str(tiny_artifact), out=str(out), id_type="long", mode="incremental", options=FP32
        ),
        spark,
    )
    cmd = job_cmd(v2, tiny_artifact, out, "--mode", "incremental")
    assert run_job(cmd, "driver-after-commit:1").returncode == -signal.SIGKILL
    assert (table(out).note_id == 4).sum() == 2  # new version committed, old one not yet deleted
    again = run_job(cmd)
    assert again.returncode == 0 and "stale rows deleted: 1" in again.stdout, again.stderr[-2000:]
    want = tmp_path / "clean"
    run(JobConfig(notes=str(v2), model=str(tiny_artifact), out=str(want), id_type="long", options=FP32), spark)
    assert_same_tables(out, want)


def test_readers_protocol_compaction_and_vacuum(notes, tiny_artifact, clean, tmp_path, capsys):
    """The output opens in delta-rs, Polars and DuckDB's delta extension; its protocol is (1, 2), which
    Databricks and delta-spark read; compaction keeps the rows; vacuum removes a killed run's orphans."""
    import polars as pl

    from clinlong.pipelines.delta.maintain import main as maintain

    out = tmp_path / "t"
    cmd = job_cmd(notes, tiny_artifact, out)
    assert run_job(cmd, "driver-before-commit:3").returncode == -signal.SIGKILL
    assert run_job(cmd).returncode == 0
    orphans = unreferenced(out)
    assert orphans  # the killed driver's uncommitted chunk
    proto = DeltaTable(str(out)).protocol()
    assert (proto.min_reader_version, proto.min_writer_version) == (1, 2)
    want = table(clean)
    assert len(pl.read_delta(str(out))) == len(want)
    n, ids = _duckdb().sql(f"SELECT count(*), count(DISTINCT note_id) FROM delta_scan('{out}')").fetchone()
    assert (n, ids) == (len(want), want.note_id.nunique())
    files_before = len(DeltaTable(str(out)).file_uris())
    # A retention below the table's minimum could delete a running job's files: refused without --force.
    assert maintain([str(out), "--vacuum", "--retention-hours", "0"]) == 2
    assert orphans <= {p.name for p in out.iterdir()}
    capsys.readouterr()
    assert maintain([str(out), "--vacuum", "--retention-hours", "0", "--force", "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()  # the dry run lists what it would delete, and deletes nothing
    assert listed[0] == f"vacuum (dry run): {len(orphans)} unreferenced files would be deleted"
    assert {line.strip().rsplit("/", 1)[-1] for line in listed[1:]} == orphans
    assert orphans <= {p.name for p in out.iterdir()}
    assert maintain([str(out), "--compact", "--vacuum", "--retention-hours", "0", "--force"]) == 0
    assert len(DeltaTable(str(out)).file_uris()) < files_before
    assert not unreferenced(out) and not orphans & {p.name for p in out.iterdir()}
    assert_same_tables(out, clean)


def _duckdb():
    import duckdb
    import duckdb_extension_delta

    ext = next(Path(duckdb_extension_delta.__file__).parent.glob("extensions/*/delta.duckdb_extension"))
    con = duckdb.connect()
    con.install_extension(str(ext))
    con.load_extension("delta")
    return con


def test_partitioned_by_category_resumes_and_reads_everywhere(notes, tiny_artifact, clean, tmp_path):
    """--partition-by CATEGORY: Hive-style folders (values escaped: "Nursing/other", "Discharge summary"),
    the same rows as the unpartitioned clean run, after a kill and a rerun, in all three readers."""
    import polars as pl

    out = tmp_path / "t"
    cmd = job_cmd(notes, tiny_artifact, out, "--partition-by", "CATEGORY")
    assert run_job(cmd, "driver-after-commit:2").returncode == -signal.SIGKILL
    again = run_job(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert DeltaTable(str(out)).metadata().partition_columns == ["CATEGORY"]
    got = table(out)
    source = {int(r["ROW_ID"]): r["CATEGORY"] for r in csv.DictReader(notes.open(encoding="utf-8"))}
    assert all(source[n] == c for n, c in zip(got.note_id, got.CATEGORY))
    folders = {p.name for p in out.iterdir() if p.is_dir() and p.name != "_delta_log"}
    assert folders == {f"CATEGORY={c.replace('/', '%2F')}" for c in set(got.CATEGORY)}
    assert_same_tables(out, clean)
    per_cat = got.CATEGORY.value_counts().to_dict()
    polars_counts = pl.read_delta(str(out))["CATEGORY"].value_counts().to_pandas()
    assert polars_counts.set_index("CATEGORY")["count"].to_dict() == per_cat
    assert dict(_duckdb().sql(f"SELECT CATEGORY, count(*) FROM delta_scan('{out}') GROUP BY 1").fetchall()) == per_cat


def test_reexport_then_incremental_and_a_changed_model(tiny_checkpoint, tiny_artifact, spark, tmp_path, capsys):
    """Troubleshooting's fix (re-export with --overwrite) keeps model_id, so incremental has nothing to do;
    a changed model is refused in one line by append and incremental (a table holds one model's rows), and
    --mode overwrite replaces the table with the new model's rows."""
    import shutil

    from clinlong.export.__main__ import main as export
    from clinlong.export.synthetic import write_synthetic_checkpoint
    from clinlong.pipelines.jobs.embed_notes import main as job

    notes = write_notes(tmp_path / "n.csv", n=12)
    model = tmp_path / "model"
    shutil.copytree(tiny_artifact, model)
    out = tmp_path / "t"
    base = dict(notes=str(notes), model=str(model), out=str(out), id_type="long", mode="incremental", options=FP32)
    assert run(JobConfig(**base), spark)["embedded"] == 10
    assert export([str(tiny_checkpoint), str(model), "--overwrite"]) == 0  # as Troubleshooting says, no --name
    again = run(JobConfig(**base), spark)
    assert (again["rows_in"], again["model_id"]) == (0, table(out).model_id[0])
    line = format_summary(again).splitlines()[0]
    assert line.startswith("rows in 0 of 12 input rows, 12 already embedded or recorded (nothing to do"), line
    changed = write_synthetic_checkpoint(tmp_path / "tiny-clinical-longformer", "tiny", seed=3)
    assert export([str(changed), str(model), "--overwrite"]) == 0
    capsys.readouterr()
    for mode in ("incremental", "append"):
        argv = [
            "--notes",
            str(notes),
            "--model",
            str(model),
            "--out",
            str(out),
            "--id-type",
            "long",
            "--mode",
            mode,
            "--master",
            "local[2]",
            "--progress-every",
            "0",
        ]
        assert job(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds rows of model" in err[0] and "--mode overwrite" in err[0], err
    assert table(out).model_id.nunique() == 1 and len(table(out)) == 10
    replaced = run(JobConfig(**{**base, "mode": "overwrite"}), spark)
    t = table(out)
    assert replaced["embedded"] == 10 and t.model_id.unique().tolist() == [replaced["model_id"]]
    assert replaced["model_id"] != again["model_id"]
