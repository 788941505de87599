"""The embed_notes job's input handling and the Spark ML stages (schema, metadata, persistence)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from deltalake import DeltaTable

from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.jobs.embed_notes import JobConfig, format_summary, main, run
from tests.conftest import PHI_MARKER, write_test_notes


@pytest.fixture(scope="module")
def notes_csv(tmp_path_factory):
    return write_test_notes(tmp_path_factory.mktemp("job-notes") / "NOTEEVENTS.csv")


def test_job_records_errors_duplicates_and_commit_info(notes_csv, tiny_artifact, spark, tmp_path, capsys):
    out = str(tmp_path / "t")
    summary = run(JobConfig(notes=str(notes_csv), model=str(tiny_artifact), out=out, id_type="long"), spark)
    assert summary["rows_in"] == 11 and summary["embedded"] == 9
    # Spark reads an empty CSV field as null
    assert summary["errors"] == {"check: null text": 1, "check: whitespace-only text": 1}
    t = DeltaTable(out).to_pyarrow_table().to_pandas()
    errors = DeltaTable(out + "_errors").to_pyarrow_table().to_pandas()
    assert len(t) + len(errors) == 11  # rows in = embedded + recorded errors
    assert set(errors.note_id) == {101, 102} and set(errors.stage) == {"check"} and t.embedding.notna().all()
    assert list(errors.columns) == ["note_id", "text_sha256", "stage", "reason", "model_id", "run_id"]
    dup = t[t.note_id == 2]
    assert len(dup) == 2 and dup.text_sha256.nunique() == 2  # duplicate ids kept apart
    info = json.loads(DeltaTable(out).history(1)[0]["clinlong"])
    assert info["rows_in"] == 11 and info["bpe_tokens"] == summary["bpe_tokens"] > 0 and info["chunks"] == 1
    assert PHI_MARKER not in format_summary({**summary, "version": 0}) + capsys.readouterr().err
    # The same run again finds its chunk committed: nothing is written twice.
    again = run(JobConfig(notes=str(notes_csv), model=str(tiny_artifact), out=out, id_type="long"), spark)
    assert again["rows_in"] == 0 and len(DeltaTable(out).to_pyarrow_table()) == 9 and DeltaTable(out).version() == 0
    # A new run id appends a copy; overwrite replaces the rows (and the errors).
    run(JobConfig(notes=str(notes_csv), model=str(tiny_artifact), out=out, id_type="long", run_id="second"), spark)
    assert len(DeltaTable(out).to_pyarrow_table()) == 18 and len(DeltaTable(out + "_errors").to_pandas()) == 4
    run(JobConfig(notes=str(notes_csv), model=str(tiny_artifact), out=out, id_type="long", mode="overwrite"), spark)
    assert len(DeltaTable(out).to_pyarrow_table()) == 9 and DeltaTable(out).version() == 2
    assert len(DeltaTable(out + "_errors").to_pandas()) == 2


def test_delta_and_parquet_inputs(notes_csv, tiny_artifact, spark, tmp_path):
    import pandas as pd
    from deltalake import write_deltalake

    df = pd.read_csv(notes_csv, keep_default_na=False)[["ROW_ID", "TEXT", "CATEGORY"]].iloc[:3]
    write_deltalake(str(tmp_path / "in_delta"), df)
    df.to_parquet(tmp_path / "in.parquet")
    for source in (tmp_path / "in_delta", tmp_path / "in.parquet"):
        s = run(JobConfig(notes=str(source), model=str(tiny_artifact), out=str(tmp_path / f"out_{source.name}")), spark)
        assert s["rows_in"] == 3 and s["embedded"] == 3


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--id-col", "NOPE"], "no column 'NOPE'"),
        (["--text-col", "NOPE"], "no column 'NOPE'"),
        (["--text-col", "ROW_ID", "--input-format", "parquet"], "not string"),
        (["--max-length", "5000"], "max length"),
    ],
)
def test_bad_job_input_fails_before_work(args, needle, notes_csv, tiny_artifact, tmp_path, capsys, spark):
    import pandas as pd

    notes = str(notes_csv)
    if "parquet" in args:
        pd.read_csv(notes_csv, keep_default_na=False).to_parquet(tmp_path / "n.parquet")
        notes = str(tmp_path / "n.parquet")
    out = tmp_path / "out"
    rc = main(["--notes", notes, "--model", str(tiny_artifact), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err.strip().splitlines()[-1]
    assert not out.exists()


def test_missing_input_and_non_delta_output(tiny_artifact, tmp_path, capsys, spark):
    assert (
        main(["--notes", str(tmp_path / "nope.csv"), "--model", str(tiny_artifact), "--out", str(tmp_path / "o")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    notes = write_test_notes(tmp_path / "n.csv")
    assert main(["--notes", str(notes), "--model", str(tiny_artifact), "--out", str(tmp_path / "plain")]) == 2
    assert "not a Delta table" in capsys.readouterr().err


def test_stages_pipeline_schema_metadata_persistence(tiny_artifact, spark, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from sparknlp.annotation import Annotation

    from clinlong.pipelines import (
        DocumentAssembler,
        EmbeddingsFinisher,
        LongformerEmbeddings,
        SentenceDetector,
        SentenceEmbeddings,
        Tokenizer,
    )
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.engine import NoteEmbedder

    text = "HISTORY OF PRESENT ILLNESS:\nPt. is stable. He takes ASA q.d.\n1. Aspirin 81 mg"
    df = spark.createDataFrame([(1, text), (2, None), (3, "  ")], "id long, text string")
    pipe = Pipeline(
        stages=[
            DocumentAssembler().setInputCol("text").setOutputCol("document"),
            SentenceDetector().setInputCols(["document"]).setOutputCol("sentence"),
            Tokenizer().setInputCols(["sentence"]).setOutputCol("token"),
            LongformerEmbeddings()
            .setModelPath(str(tiny_artifact))
            .setInputCols(["document", "token"])
            .setOutputCol("embeddings")
            .setCaseSensitive(True)
            .setMaxSentenceLength(4096)
            .setBatchSize(4)
            .setPrecision("fp32"),
            SentenceEmbeddings().setInputCols(["sentence", "embeddings"]).setOutputCol("sentence_embeddings"),
            EmbeddingsFinisher().setInputCols(["embeddings"]).setOutputCols(["vectors"]),
        ]
    )
    model = pipe.fit(df)
    out = model.transform(df)
    for col, kind in [
        ("document", "document"),
        ("sentence", "document"),
        ("token", "token"),
        ("embeddings", "word_embeddings"),
        ("sentence_embeddings", "sentence_embeddings"),
    ]:
        assert out.schema[col].dataType == Annotation.arrayType(), col
        assert out.schema[col].metadata["annotatorType"] == kind
    art = Artifact.open(tiny_artifact)
    assert out.schema["embeddings"].metadata == {
        "annotatorType": "word_embeddings",
        "dimension": 64,
        "ref": art.model_id,
    }
    rows = {r["id"]: r for r in out.collect()}
    assert rows[2]["embeddings"] == [] and rows[3]["token"] == []
    # Token vectors equal the engine's (note context, first piece) for the same note.
    res = NoteEmbedder(art, EmbedOptions(precision="fp32")).embed([text])[0]
    got = np.array([a["embeddings"] for a in rows[1]["embeddings"]])
    assert [(a["begin"], a["end"]) for a in rows[1]["embeddings"]] == [(b, e) for b, e, _ in res.tokens]
    np.testing.assert_allclose(got, res.token_vectors(), atol=1e-6)
    assert np.allclose(np.array(rows[1]["vectors"]), got)
    # Spark ML persistence round trip gives the same numbers.
    model.write().overwrite().save(str(tmp_path / "pm"))
    again = {r["id"]: r for r in PipelineModel.load(str(tmp_path / "pm")).transform(df).collect()}
    np.testing.assert_allclose(np.array([a["embeddings"] for a in again[1]["embeddings"]]), got, atol=1e-6)
    single = tmp_path / "stage"
    pipe.getStages()[3].write().overwrite().save(str(single))
    loaded = LongformerEmbeddings.load(str(single))
    assert loaded.getDimension() == 64 and loaded.getMaxSentenceLength() == 4096 and loaded.getCaseSensitive()


def test_stages_check_declared_input_types_and_keep_their_params(tiny_artifact, tiny_checkpoint, spark, tmp_path):
    """Each stage declares the annotator type of each input column and refuses another; transform changes
    no Param; a saved LongformerEmbeddings records its artifact's model_id and refuses a different artifact
    at that path when loaded."""
    import shutil

    from clinlong.export.__main__ import run as export
    from clinlong.export.synthetic import write_synthetic_checkpoint
    from clinlong.pipelines import (
        DocumentAssembler,
        LongformerEmbeddings,
        SentenceDetector,
        SentenceEmbeddings,
        Tokenizer,
    )

    df = spark.createDataFrame([(1, "Pt. is stable. ASA q.d.")], "id long, text string")
    docs = DocumentAssembler().setInputCol("text").setOutputCol("document").transform(df)
    sents = SentenceDetector().setInputCols(["document"]).setOutputCol("sentence").transform(docs)
    toks = Tokenizer().setInputCols(["sentence"]).setOutputCol("token").transform(sents)
    with pytest.raises(ValueError, match="input column 'token' holds token, not document"):
        Tokenizer().setInputCols(["token"]).setOutputCol("t2").transform(toks)
    with pytest.raises(ValueError, match="input column 'text' holds no annotations, not document"):
        SentenceDetector().setInputCols(["text"]).transform(toks)
    path = tmp_path / "model"
    shutil.copytree(tiny_artifact, path)
    emb = LongformerEmbeddings().setModelPath(str(path)).setInputCols(["document", "token"])
    with pytest.raises(ValueError, match="holds document, not token"):
        LongformerEmbeddings().setModelPath(str(path)).setInputCols(["document", "sentence"]).transform(toks)
    vecs = emb.transform(toks)
    pool = SentenceEmbeddings().setInputCols(["sentence", "embeddings"])
    pooled = pool.transform(vecs)
    assert pooled.schema["sentence_embeddings"].metadata["dimension"] == 64
    assert not pool.isSet(pool.dimension) and not pool.isSet(pool.storageRef)  # no Param changed in transform
    emb.write().overwrite().save(str(tmp_path / "stage"))
    assert LongformerEmbeddings.load(str(tmp_path / "stage")).getOrDefault("modelId") == emb.getStorageRef()
    other = write_synthetic_checkpoint(tmp_path / "ck2", "tiny", seed=1)
    export([str(other), str(path), "--overwrite"])
    with pytest.raises(ValueError, match="was built with model tiny-clinical-longformer@"):
        LongformerEmbeddings.load(str(tmp_path / "stage"))


def test_float16_vectors_on_request(notes_csv, tiny_artifact, spark, tmp_path):
    base = dict(notes=str(notes_csv), model=str(tiny_artifact), id_type="long")
    run(JobConfig(out=str(tmp_path / "f32"), **base), spark)
    s = run(JobConfig(out=str(tmp_path / "f16"), vector_dtype="float16", **base), spark)
    assert s["vector_dtype"] == "float16"
    f32 = DeltaTable(str(tmp_path / "f32")).to_pandas().sort_values(["note_id", "text_sha256"])
    f16 = DeltaTable(str(tmp_path / "f16")).to_pandas().sort_values(["note_id", "text_sha256"])
    for a, b in zip(f32.embedding, f16.embedding):
        if a is None:
            assert b is None
            continue
        half = np.frombuffer(b, "<f2")
        assert half.shape == (64,)
        np.testing.assert_allclose(half.astype(np.float32), a, rtol=1e-3, atol=1e-3)


def test_spark_side_writer_counts_come_from_its_rows(notes_csv, tiny_artifact, spark, tmp_path):
    """The delta-spark writer's counts are rows of the pass it writes (not accumulators): running the pass
    again, as Spark does when it re-executes a stage, gives the same counts, never twice as many. Its
    JARs are not installable here, so the writer writes Parquet in this test."""
    from pyspark.sql.pandas.types import to_arrow_type

    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.schema import OutputSpec, error_schema, table_schema
    from clinlong.pipelines.delta.writers import Chunk, DeltaSparkWriter, Totals
    from clinlong.pipelines.spark.sources import read_notes, select_notes

    art = Artifact.open(tiny_artifact)
    notes = select_notes(read_notes(spark, str(notes_csv)), "ROW_ID", "TEXT", "long")
    id_type = to_arrow_type(notes.schema["note_id"].dataType)
    spec = OutputSpec("token", table_schema("token", id_type), art.model_id, art.dimension)
    cfg = JobConfig(notes=str(notes_csv), model=str(tiny_artifact), out=str(tmp_path / "rows"), granularity="token")
    writer = DeltaSparkWriter(spark, cfg, str(art.path), spec, error_schema(id_type), fmt="parquet")
    ctx = Chunk(0, 1, "r1", "clinlong-r1", "r1-c00000-a")
    chunk = writer.embed_chunk(notes.repartition(3), ctx)
    writer.commit_chunk(chunk, {"chunk_tasks": chunk.totals.tasks})
    again = writer.embed(notes.repartition(3), ctx)[1]
    for t in (chunk.totals, Totals.of(again)):
        assert t.notes == 11 and t.embedded == 9
        assert dict(t.errors) == {"check: null text": 1, "check: whitespace-only text": 1}
        assert t.rows == spark.read.parquet(str(tmp_path / "rows")).count() > 100
        assert t.tokens > t.rows  # BPE pieces outnumber words
    assert spark.read.parquet(str(tmp_path / "rows_errors")).count() == 2


def test_spark_side_writer_splits_rows_and_errors(notes_csv, tiny_artifact, spark, tmp_path):
    """What the delta-spark writer writes to the output and errors tables (as Parquet here: no JARs),
    partition column included: one pass, then split."""
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_type

    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.schema import OutputSpec, error_schema, table_schema
    from clinlong.pipelines.delta.writers import split_rows
    from clinlong.pipelines.delta.writers.spark import combined_schema, embed_rows_and_errors
    from clinlong.pipelines.spark.sources import read_notes, select_notes

    art = Artifact.open(tiny_artifact)
    notes = select_notes(read_notes(spark, str(notes_csv)), "ROW_ID", "TEXT", "long", keep=("CATEGORY",))
    id_type = to_arrow_type(notes.schema["note_id"].dataType)
    spec = OutputSpec(
        "note",
        table_schema("note", id_type, partition_by="CATEGORY"),
        art.model_id,
        art.dimension,
        partition_by="CATEGORY",
    )
    errs = error_schema(id_type)
    rows = notes.mapInArrow(
        embed_rows_and_errors(str(art.path), EmbedOptions(), spec, errs, "r1"),
        from_arrow_schema(combined_schema(spec.schema, errs)),
    )
    out, errors = split_rows(rows, spec.schema, errs)
    out.write.partitionBy("CATEGORY").parquet(str(tmp_path / "out"))
    errors.write.parquet(str(tmp_path / "errors"))
    got = spark.read.parquet(str(tmp_path / "out")).toPandas()
    bad = spark.read.parquet(str(tmp_path / "errors")).toPandas()
    assert len(got) == 9 and got.embedding.notna().all() and set(got.CATEGORY) >= {"ECG"}
    assert sorted(bad.note_id) == [101, 102] and set(bad.run_id) == {"r1"} and set(bad.stage) == {"check"}


def test_delta_spark_writer_without_jars_is_a_clear_error(notes_csv, tiny_artifact, tmp_path, capsys, spark):
    rc = main(
        [
            "--notes",
            str(notes_csv),
            "--model",
            str(tiny_artifact),
            "--out",
            str(tmp_path / "o"),
            "--writer",
            "delta-spark",
        ]
    )
    assert rc == 2 and "delta-spark's JARs" in capsys.readouterr().err


def test_progress_logs_rates_and_eta_without_text(notes_csv, tiny_artifact, spark, tmp_path, capsys):
    run(
        JobConfig(
            notes=str(notes_csv),
            model=str(tiny_artifact),
            out=str(tmp_path / "p"),
            id_type="long",
            partitions=4,
            progress_every=0.2,
        ),
        spark,
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "[progress] tasks " in line]
    assert lines and "/s)" in lines[0] and "progress: " not in err  # one "[progress]" prefix, not two
    assert all("ETA" in line for line in lines) and PHI_MARKER not in err


def test_tasks_learn_their_executors_cores(spark):
    """The driver names an executor's cores (local[2]: 2) in a local property that every task reads: the
    torch CPU tasks share them (runtime.CoreShare), GPU tasks give them to BPE."""
    from pyspark import TaskContext

    from clinlong.pipelines.spark.executor import SHARED_CORES, share_executor_cores

    sc = spark.sparkContext
    assert share_executor_cores(sc) == 2
    seen = sc.parallelize(range(4), 4).map(lambda _: TaskContext.get().getLocalProperty(SHARED_CORES)).collect()
    assert seen == [f"{sc.applicationId}:2"] * 4


def test_the_run_is_one_frozen_record(spark, tmp_path):
    """run_plan.plan decides a run once: identity, run id, app id, chunks, resume point and tasks, in a frozen
    RunPlan whose parts() are the chunks still to commit (from the resume point on), every note in one."""
    from dataclasses import FrozenInstanceError

    from clinlong.pipelines.delta.run_plan import plan, with_chunk

    class Writer:  # what planning asks of a writer: an earlier attempt committed chunk 0
        def committed_version(self, uri, app_id):
            return 0

    notes = spark.createDataFrame([(i, f"note {i}") for i in range(10)], "note_id long, text string")
    cfg = JobConfig(notes="n.csv", model="m", out=str(tmp_path / "o"), chunk_notes=4)
    p = plan(cfg, notes, Writer(), "model-1", ["csv", "n.csv", []], 2)
    try:
        assert (p.chunks, p.first, p.input_rows, p.input_total, p.tasks) == (3, 1, 10, 10, 2)
        assert p.app_id == f"clinlong-{p.run_id}" and p.identity["chunks"] == 3 and p.identity["model"] == "model-1"
        again = plan(cfg, notes, Writer(), "model-1", ["csv", "n.csv", []], 2)
        assert again.run_id == p.run_id and again.attempt != p.attempt  # the same run, another driver attempt
        parts = list(p.parts())
        assert [c.index for c, _ in parts] == [1, 2] and all(c.prefix.startswith(p.run_id) for c, _ in parts)
        first = with_chunk(notes, 3).where("_chunk = 0").count()
        assert sum(df.count() for _, df in parts) + first == 10
        with pytest.raises(FrozenInstanceError):
            p.first = 0
        again.release()
    finally:
        p.release()
