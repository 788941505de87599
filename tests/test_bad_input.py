"""Point 6 of the Delta-at-scale issue: every kind of bad input has a defined outcome — embedded, or one
errors-table row (id, text hash, stage, reason; never the text) — and rows in = embedded + errors."""

from __future__ import annotations

import numpy as np
import pytest
from deltalake import DeltaTable

from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.jobs.embed_notes import JobConfig, format_summary, main, run
from tests.conftest import PHI_MARKER, hf_reference

EMOJI = "Pt reports pain 😣 8/10 👍🏽, smiles 🙂. Plan: ice."
CJK = "患者は胸痛を訴えた。心電図正常。 病人主诉头痛。"
RTL = "המטופל יציב. المريض مستقر. BP 120/80."
PUNCT = "?!... ;; -- ** ((:))"
PIECE_TEXT = f"Pt {PHI_MARKER} stable on ASA 81 mg q.d.; BP 120/80, HR 72. "


def _csv_bytes() -> bytes:
    long_note = PIECE_TEXT * 4200  # ~100,000 BPE pieces
    huge = "A" * (10 * 1024 * 1024 + 7)  # a 10 MB "note"
    rows = [
        b"ROW_ID,CATEGORY,TEXT",
        b'1,Nursing,"Pt stable. ' + PHI_MARKER.encode() + b' ate lunch."',
        b'2,Nursing,"Bad bytes \xff\xfe in the middle."',
        b'3,Nursing,"NUL \x00 inside."',
        b"4,Nursing,too,many,fields",
        b"5,Nursing",
        b',Nursing,"Null id note."',
        b'11,Nursing,"' + EMOJI.encode() + b'"',
        b'12,Nursing,"' + CJK.encode() + b'"',
        b'13,Nursing,"' + RTL.encode() + b'"',
        b'14,Nursing,"' + PUNCT.encode() + b'"',
        b'15,Nursing,"   \n\t  "',
        b'16,Nursing,"' + huge.encode() + b'"',
        b'17,Nursing,"' + long_note.encode() + b'"',
        b'18,Nursing,"He is 5\'10"" tall, ""quoted"" word."',
        b'6,Nursing,"unbalanced quote starts here',
        b'7,Nursing,"this row is swallowed by the one above"',
        b'8,Nursing,"Last note."',
    ]
    return b"\n".join(rows) + b"\n"


EMBEDDED = {1, 2, 11, 12, 13, 14, 17, 18, 8}
ERRORS = {  # id -> (stage, reason prefix)
    3: ("check", "text contains NUL bytes"),
    4: ("read", "malformed CSV row (wrong number of fields)"),
    5: ("read", "malformed CSV row (wrong number of fields)"),
    None: ("check", "null note id"),
    15: ("check", "whitespace-only text"),
    16: ("check", "text longer than 1000000 characters"),
    6: ("read", "malformed CSV row (unbalanced quote"),
}


@pytest.fixture(scope="module")
def swept(tiny_artifact, spark, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    (d / "notes.csv").write_bytes(_csv_bytes())
    out = str(d / "out")
    summary = run(
        JobConfig(
            notes=str(d / "notes.csv"),
            model=str(tiny_artifact),
            out=out,
            id_type="long",
            options=EmbedOptions(precision="fp32"),
        ),
        spark,
    )  # compared with HF at 1e-4
    return summary, DeltaTable(out).to_pandas(), DeltaTable(out + "_errors").to_pandas()


def test_every_row_is_embedded_or_recorded(swept, capsys):
    summary, table, errors = swept
    assert summary["rows_in"] == len(EMBEDDED) + len(ERRORS) == len(table) + len(errors)
    assert summary["embedded"] == len(table) and sum(summary["errors"].values()) == len(errors)
    assert set(table.note_id) == EMBEDDED
    got = {(None if np.isnan(r.note_id) else int(r.note_id)): (r.stage, r.reason) for r in errors.itertuples()}
    assert got.keys() == ERRORS.keys()
    for nid, (stage, reason) in ERRORS.items():
        assert got[nid][0] == stage and got[nid][1].startswith(reason), (nid, got[nid])
    assert summary["warnings"] == {"invalid UTF-8 replaced by U+FFFD": 1}
    text = format_summary({**summary, "version": 0}) + capsys.readouterr().err + errors.to_csv()
    assert PHI_MARKER not in text and "swallowed" not in text and "AAAA" not in text


def test_long_and_non_latin_notes_equal_hugging_face(swept, tiny_artifact, tiny_checkpoint):
    from clinlong.pipelines.core.artifact import Artifact

    _, table, _ = swept
    tok = Artifact.open(tiny_artifact).tokenizer
    row = table[table.note_id == 17].iloc[0]
    assert row.n_tokens >= 100_000 and row.n_windows >= 25
    for nid, text in ((11, EMOJI), (12, CJK), (13, RTL), (14, PUNCT)):
        ids = tok.encode(text).ids
        ref = hf_reference(tiny_checkpoint, ids)[1:-1].mean(0)
        got = table[table.note_id == nid].iloc[0]
        assert got.n_tokens == len(ids) - 2
        np.testing.assert_allclose(got.embedding, ref, atol=1e-4)


def test_token_offsets_of_non_latin_text(tiny_artifact):
    from clinlong.pipelines import load

    for text in (EMOJI, CJK, RTL):
        t = load(str(tiny_artifact)).predict(text, output_level="token")
        assert len(t) and all(text[b : e + 1] == tok for b, e, tok in zip(t.begin, t.end, t.token))


def test_binary_text_column_with_invalid_utf8(tiny_artifact, spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"ROW_ID": [1, 2, None], "TEXT": [b"ok note", b"bad \xc3\x28 byte", b"x"]}), tmp_path / "n.parquet"
    )
    cfg = JobConfig(
        notes=str(tmp_path / "n.parquet"), model=str(tiny_artifact), out=str(tmp_path / "o"), mode="incremental"
    )
    s = run(cfg, spark)
    assert (s["rows_in"], s["embedded"]) == (3, 2) and s["errors"] == {"check: null note id": 1}
    assert s["warnings"] == {"invalid UTF-8 replaced by U+FFFD": 1}
    assert run(cfg, spark)["rows_in"] == 0  # the bytes' hash matches on the rerun: nothing is embedded twice


def test_a_failing_model_step_costs_only_its_note(tiny_artifact):
    """Fault injection in process: the encoder raises whenever a marked piece id is in its input; the
    batch is re-run note by note, and only the marked note is recorded (stage embed, exception type)."""
    import pyarrow as pa

    from clinlong.pipelines.core.batches import embed_batches, embedder
    from clinlong.pipelines.core.engine import EmbedOptions

    emb = embedder(str(tiny_artifact), EmbedOptions())
    bad = emb.artifact.tokenizer.encode("zebra").ids[1]
    real = emb.encoder

    def flaky(runs, *a, **k):
        if any(bad in r for r in runs):
            raise RuntimeError("simulated kernel failure")
        return real(runs, *a, **k)

    emb.encoder = flaky
    try:
        batch = pa.RecordBatch.from_pydict({"note_id": [1, 2, 3], "text": ["fine", "a zebra", "also fine"]})
        (b,) = list(embed_batches(emb, iter([batch])))
    finally:
        emb.encoder = real
    assert [r.skip_reason for r in b.results] == [None, "RuntimeError in the model step", None]
    assert b.error_rows()[0][2] == "embed" and b.results[0].note_vector() is not None


def test_failures_that_are_not_a_notes_fail_the_task(tiny_artifact):
    """Out of memory for one sequence, ONNX Runtime and CUDA errors are not a note's fault: the batch is not
    buried as error rows, the task fails (Spark retries it) with the exception's type, never its message."""
    import pyarrow as pa
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from clinlong.pipelines.core.batches import ModelStepFailed, embed_batches, embedder, not_the_notes_fault
    from clinlong.pipelines.core.engine import EmbedOptions

    class OutOfMemoryError(RuntimeError):
        pass

    for e in (
        MemoryError("one sequence of 4096 tokens does not fit"),
        OutOfMemoryError("CUDA out of memory"),
        Fail("session broken"),
        RuntimeError("CUDA error: an illegal memory access"),
    ):
        assert not_the_notes_fault(e), e
    assert not not_the_notes_fault(ValueError("bad token")) and not not_the_notes_fault(RuntimeError("kernel"))
    emb = embedder(str(tiny_artifact), EmbedOptions())
    real = emb.encoder

    def oom(runs, *a, **k):
        raise MemoryError("one sequence of 9 tokens does not fit on cpu; secret text")

    emb.encoder = oom
    try:
        batch = pa.RecordBatch.from_pydict({"note_id": [1, 2], "text": ["fine", "also fine"]})
        with pytest.raises(ModelStepFailed, match="^MemoryError in the model step") as info:
            list(embed_batches(emb, iter([batch])))
    finally:
        emb.encoder = real
    assert "secret" not in str(info.value) and info.value.__cause__ is None


def test_every_front_end_isolates_a_bad_note_the_same_way(tiny_artifact, spark, tmp_path, monkeypatch):
    """One batch loop (core.batches) for all: a note the model step fails on alone gets the reason
    "InjectedFault in the model step" and its neighbours are embedded, through the job's task function,
    the one-liner's predict (in process and on Spark) and the LongformerEmbeddings stage."""
    import json

    import pyarrow as pa
    from pyspark.ml import Pipeline

    from clinlong.pipelines import DocumentAssembler, LongformerEmbeddings, SentenceDetector, Tokenizer, load
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.schema import OutputSpec, error_schema, table_schema
    from clinlong.pipelines.delta.writers.rs import PartTarget, embed_partition

    texts = ["Pt is fine.", "Pt saw a zebra.", "Pt is also fine."]
    reason = "InjectedFault in the model step"
    monkeypatch.setenv("CLINLONG_FAULT_RAISE", "text:zebra")  # this process (in-process front-ends)
    env = spark.sparkContext.environment
    env["CLINLONG_FAULT_RAISE"] = "text:zebra"  # the Python workers of functions wrapped from now on
    try:
        # the job's task (delta-rs writer), run in this process
        art = Artifact.open(tiny_artifact)
        spec = OutputSpec("note", table_schema("note", pa.int64()), art.model_id, art.dimension)
        target = PartTarget(str(tmp_path / "o"), str(tmp_path / "e"), "t", "r1", error_schema(pa.int64()))
        batch = pa.RecordBatch.from_pydict({"note_id": [1, 2, 3], "text": texts})
        (metas,) = list(embed_partition(str(tiny_artifact), EmbedOptions(), spec, target)(iter([batch])))
        counts = [m for m in metas.to_pylist() if not m["table"]][0]
        assert counts["embedded"] == 2 and json.loads(counts["errors"]) == {f"embed: {reason}": 1}
        # predict, in process and on Spark
        pipe = load(str(tiny_artifact))
        assert pipe.predict(texts, "note").skip_reason.tolist() == [None, reason, None]
        sdf = spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "id long, text string")
        got = pipe.predict(sdf, "note", id_col="id").orderBy("note_id").toPandas()
        assert got.skip_reason.tolist() == [None, reason, None]
        # the Spark ML stage
        stages = Pipeline(
            stages=[
                DocumentAssembler().setInputCol("text").setOutputCol("document"),
                SentenceDetector().setInputCols(["document"]).setOutputCol("sentence"),
                Tokenizer().setInputCols(["sentence"]).setOutputCol("token"),
                LongformerEmbeddings()
                .setModelPath(str(tiny_artifact))
                .setInputCols(["document", "token"])
                .setOutputCol("embeddings"),
            ]
        )
        rows = {r["id"]: r["embeddings"] for r in stages.fit(sdf).transform(sdf).collect()}
        assert {a["metadata"].get("skip_reason") for a in rows[1]} == {reason}
        assert all("skip_reason" not in a["metadata"] for i in (0, 2) for a in rows[i]) and rows[0] and rows[2]
    finally:
        env.pop("CLINLONG_FAULT_RAISE", None)


def test_job_level_errors_name_the_fix(tiny_artifact, tmp_path, capsys, spark):
    import shutil

    notes = tmp_path / "n.csv"
    notes.write_bytes(b"ROW_ID,TEXT\n1,hello\n")
    cases = [
        (["--notes", str(tmp_path / "missing.csv")], "does not exist"),
        (["--out", str(tmp_path)], "not a Delta table"),
    ]
    bad_art = tmp_path / "art"
    shutil.copytree(tiny_artifact, bad_art)
    for name in ("encoder.onnx", "encoder.safetensors"):
        with open(bad_art / name, "r+b") as f:
            f.seek(1000)
            f.write(b"\x00\x01\x02")
    cases.append((["--model", str(bad_art)], "fails its sha256"))  # auto: executors may run either backend
    cases.append((["--model", str(bad_art), "--backend", "onnxruntime"], "encoder.onnx fails its sha256"))
    cases.append((["--model", str(bad_art), "--backend", "torch"], "encoder.safetensors fails its sha256"))
    for args, needle in cases:
        base = {"--notes": str(notes), "--model": str(tiny_artifact), "--out": str(tmp_path / "o")}
        base.update(dict(zip(args[::2], args[1::2])))
        assert main([x for kv in base.items() for x in kv]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
