"""One pipeline, two libraries (issue 20, point 3), with Spark NLP's real JVM annotators.

Spark NLP 5.5.3's DocumentAssembler, SentenceDetector and Tokenizer feed our LongformerEmbeddings (note
context) and BigBirdEmbeddings (sentence context); ours feed Spark NLP's SentenceEmbeddings,
EmbeddingsFinisher, NerDLApproach (a few epochs on synthetic IOB labels) and ClassifierDLApproach (the
notes' categories over document embeddings), all in one Spark ML Pipeline fitted as one. Spark NLP's JAR
exists here only for Spark 3.5 (Scala 2.12), so the pipeline runs in `.venv-sparknlp-mixed` (pyspark 3.5.8
+ spark-nlp 5.5.3 + clinlong's base install, ONNX runtime; benchmarks/sparknlp_mixed.py) and one run of
benchmarks/sparknlp_mixed_runner.py serves the module.

The checkpoints are the tiny synthetic Longformer and BigBird widened to 128 dimensions: NerDLApproach
needs a graph of exactly the embeddings' dimension, and Spark NLP 5.5.3's JAR ships ner-dl graphs for 100,
128, 256, 300, 384, 512, 768, 1024, 2048 and 4096 (the tiny size is 64).
Where Spark NLP cannot be set up the JVM tests skip with the one-line reason (and fail under CI=1).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.conftest import ROOT

DIM = 128  # a dimension Spark NLP 5.5.3 ships a NerDL graph for (ner-dl/blstm_10_128_128_120.pb)
NER_TAGS = {"O", "B-NUM", "I-NUM", "B-CAP", "B-ABBR"}


def _require_mixed() -> None:
    from clinlong.benchmarks.sparknlp_mixed import unavailable_reason

    reason = unavailable_reason()
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"Spark NLP's JVM with our stages: {reason}")


def _widened_artifact(family: str, tmp_path_factory):
    """The tiny synthetic checkpoint of `family`, re-initialised at DIM dimensions, exported (native);
    cached next to Spark NLP's class path while the exporter's and the core's sources are the same (the
    synthetic checkpoint is not byte-stable: BigBird's SentencePiece tokenizer.json differs run to run)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForMaskedLM

    from clinlong.benchmarks.sparknlp_jvm import CACHE
    from clinlong.export.__main__ import run
    from clinlong.export.synthetic import write_synthetic_checkpoint

    digest = hashlib.sha256(f"{family} {DIM} seed 0 {torch.__version__} {transformers.__version__}".encode())
    for f in sorted([*(ROOT / "export").glob("*.py"), *(ROOT / "pipelines" / "core").glob("*.py")]):
        digest.update(f.name.encode() + f.read_bytes())
    out = CACHE / f"mixed-{family}-{DIM}-{digest.hexdigest()[:16]}"
    if (out / "manifest.json").exists():
        return out
    ckpt = write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{family}-{DIM}", "tiny", 0, family)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(hidden_size=DIM, intermediate_size=2 * DIM)
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(ckpt)).eval()
    for f in [*ckpt.glob("*.bin"), *ckpt.glob("*.safetensors")]:
        f.unlink()
    model.save_pretrained(ckpt, safe_serialization=False)
    run([str(ckpt), str(out), "--overwrite"])
    return out


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    from clinlong.benchmarks.sparknlp_mixed import run
    from clinlong.export.synthetic_notes import generate_notes

    _require_mixed()
    artifacts = {f: _widened_artifact(f, tmp_path_factory) for f in ("longformer", "bigbird")}
    notes = tmp_path_factory.mktemp("notes") / "notes.jsonl"  # 12 notes, 25 to 15,775 characters
    notes.write_text(
        "".join(
            json.dumps({"id": n.row_id, "text": n.text, "category": n.category}) + "\n"
            for n in generate_notes(12, seed=3)
        )
    )
    result = run(
        {
            "notes": str(notes),
            "longformer": str(artifacts["longformer"]),
            "bigbird": str(artifacts["bigbird"]),
            "epochs": 2,
        },
        tmp_path_factory.mktemp("mixed"),
    )
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "metadata")}))
    return result


@pytest.mark.slow
def test_spark_nlp_front_end_feeds_our_stages(mixed_run):
    r = mixed_run
    assert r["versions"]["pyspark"] == "3.5.8" and r["versions"]["sparknlp"] == "5.5.3", r["versions"]
    assert r["versions"]["backend"] == "onnxruntime"  # no torch in the mixed venv
    assert r["versions"]["clinlong_file"] == str(ROOT / "clinlong" / "__init__.py")  # this checkout, not a copy
    assert r["stages"][:5] == [
        "sparknlp.DocumentAssembler",
        "sparknlp.SentenceDetector",
        "sparknlp.TokenizerModel",
        "clinlong.LongformerEmbeddings",
        "clinlong.BigBirdEmbeddings",
    ], r["stages"]
    meta = r["metadata"]
    assert meta["token"] == {"annotatorType": "token"} and meta["sentence"] == {"annotatorType": "document"}
    assert meta["lf"]["annotatorType"] == meta["bb"]["annotatorType"] == "word_embeddings"
    assert meta["lf"]["dimension"] == meta["bb"]["dimension"] == DIM
    assert meta["lf"]["ref"] == r["storage_refs"]["lf"] and meta["bb"]["ref"] == r["storage_refs"]["bb"]
    tokens = 0
    for row in r["rows"]:
        # one vector per Spark NLP token, at its offsets, with its text and its sentence
        want = [(b, e, res, m["sentence"]) for b, e, res, m, _ in row["token"]]
        for col in ("lf", "bb"):
            assert [(b, e, res, m["sentence"]) for b, e, res, m, _ in row[col]] == want, (row["id"], col)
            assert all(n == DIM and "skip_reason" not in m for _, _, _, m, n in row[col]), (row["id"], col)
            assert all(m["token"] == res for _, _, res, m, _ in row[col])
        tokens += len(want)
    assert tokens > 1000


@pytest.mark.slow
def test_our_vectors_feed_spark_nlp_sentence_embeddings_and_finisher(mixed_run):
    r = mixed_run
    meta = r["metadata"]
    # Spark NLP's SentenceEmbeddings carries our storageRef, and averages our token vectors exactly
    assert meta["lf_sentence"]["ref"] == r["storage_refs"]["lf"]
    assert meta["bb_document"]["ref"] == r["storage_refs"]["bb"]
    assert r["storage_refs"]["SentenceEmbeddings:lf_sentence"] == r["storage_refs"]["lf"]
    assert r["sentence_mean_max_diff"] < 1e-5
    # Its column's `dimension` is its own Param (default 100), not read from the input column: measured,
    # so a user sets setDimension to ours (bb_document does)
    assert meta["lf_sentence"]["dimension"] == 100 and meta["bb_document"]["dimension"] == DIM
    for row in r["rows"]:
        assert len(row["lf_sentence"]) == len(row["sentence"])
        assert all(n == DIM for *_, n in row["lf_sentence"]) and len(row["bb_document"]) == 1
        # EmbeddingsFinisher: one DIM-float vector per token, one per document
        assert row["lf_vectors"] == [DIM] * len(row["token"]) and row["bb_document_vectors"] == [DIM]
    assert set(r["finished_types"].values()) == {"array<array<float>>"}


@pytest.mark.slow
def test_spark_nlp_ner_and_classifier_train_on_our_vectors(mixed_run):
    r = mixed_run
    assert "NerDLApproach" not in r["blocked"] and "ClassifierDLApproach" not in r["blocked"], r["blocked"]
    assert "Pipeline.fit" not in r["blocked"], r["blocked"]  # fitted as one pipeline
    assert r["stages"][-3:] == ["sparknlp.NerDLModel", "sparknlp.ClassifierDLModel", "sparknlp.EmbeddingsFinisher"]
    # the trained models record the storageRef of the column they were trained on
    assert r["storage_refs"]["NerDLModel:ner"] == r["storage_refs"]["lf"]
    assert r["storage_refs"]["ClassifierDLModel:category_pred"] == r["storage_refs"]["bb"]
    assert set(r["tags"]) >= {"O", "B-NUM", "B-CAP", "B-ABBR"}
    for row in r["rows"]:
        assert [(b, e) for b, e, *_ in row["ner"]] == [(b, e) for b, e, *_ in row["token"]]
        assert {res for _, _, res, *_ in row["ner"]} <= NER_TAGS
        assert len(row["category_pred"]) == 1
    assert r["ner_train_accuracy"] > 0.9, r["ner_train_accuracy"]  # measured 0.9996 after 2 epochs
    # and a NerDL model refuses vectors labelled with another storageRef (Spark NLP's own check)
    assert "ref does not match" in r["wrong_ref"] and r["storage_refs"]["lf"] in r["wrong_ref"], r["wrong_ref"]


@pytest.mark.slow
def test_mixed_pipeline_saved_and_loaded(mixed_run):
    r = mixed_run
    untrained = r["reload_untrained"]
    assert any("LongformerEmbeddings" in s for s in untrained["stages"])
    assert all(untrained["same_annotations"].values()), untrained
    assert max(untrained["max_vector_diff"].values()) <= 1e-6, untrained
    if "PipelineModel.load" in r["blocked"]:  # measured with TF-Java 0.3.3: NerDLModel's reader needs 0.4
        pytest.skip(
            f"saved, but Spark NLP's JVM cannot load its trained TensorFlow stages back: "
            f"{r['blocked']['PipelineModel.load']}"
        )
    assert all(r["reload_full"]["same_annotations"].values()), r["reload_full"]


@pytest.mark.slow
def test_a_token_without_a_vector_in_spark_nlp(mixed_run):
    """U+200B is a token to Spark NLP's Tokenizer and no piece to BigBird's SentencePiece normalizer: ours
    keeps the annotation with an empty `embeddings` array and its skip_reason (never a made-up vector).
    EmbeddingsFinisher passes the empty array on; Spark NLP 5.5.3's SentenceEmbeddings cannot pool it
    (measured: java.lang.ArrayIndexOutOfBoundsException: Index 0 out of bounds for length 0), and does pool our
    column with keepTokensWithoutVector=False."""
    odd = mixed_run["uncovered_token"]
    first = odd["bb"][1][0]
    assert first == ["\u200b", 0, "token has no BPE piece"], odd["bb"]
    assert all(n == DIM for row in odd["bb"] for t, n, _ in row if t != "\u200b")
    assert odd["EmbeddingsFinisher"][1][0] == 0 and DIM in odd["EmbeddingsFinisher"][1], odd
    # With keepTokensWithoutVector=False our column leaves U+200B out, and Spark NLP's SentenceEmbeddings pools
    # what is left: the mean of our vectors of each sentence.
    left = odd["left_out"]
    assert not isinstance(left, str), left
    assert [[t for t, _ in row] for row in left["bb"]] == [[t for t, _, _ in row if t != "\u200b"] for row in odd["bb"]]
    assert all(n == DIM for row in left["bb"] for _, n in row)
    assert left["SentenceEmbeddings"] and all(n == DIM for row in left["SentenceEmbeddings"] for n in row), left
    assert left["max_pool_diff"] <= 1e-5, left["max_pool_diff"]
    if isinstance(odd["SentenceEmbeddings"], str):
        pytest.xfail(f"Spark NLP's SentenceEmbeddings over a token with no vector: {odd['SentenceEmbeddings']}")


@pytest.mark.slow
def test_spark_nlp_light_pipeline_refused_in_one_line(mixed_run):
    err = mixed_run["light_pipeline_error"]
    assert err["type"] == "AttributeError" and "\n" not in err["message"]
    assert err["message"].startswith("LongformerEmbeddings is a clinlong stage") and "LightPipeline" in err["message"]
    assert "light_pipeline" not in mixed_run
    # Spark NLP's own stages of the same model still run in a LightPipeline
    assert mixed_run["light_pipeline_front"]["token"] > 10


def test_light_pipeline_refusal_on_our_pyspark(spark):
    """The refusal on pyspark 4.1 with the spark-nlp Python package (7.x) of the test extra: raised while
    the PipelineModel is converted for the JVM, before Spark NLP's JVM is asked for anything, so it needs
    no Spark NLP JAR; and `hasattr(stage, "_to_java")` stays False (pyspark's tuning persistence)."""
    from pyspark.ml import PipelineModel
    from sparknlp.base import LightPipeline

    from clinlong.pipelines import DocumentAssembler, Tokenizer

    stage = Tokenizer()
    assert not hasattr(stage, "_to_java") and {p.name for p in stage.params} == {"inputCols", "outputCol"}
    refused = r"^DocumentAssembler is a clinlong stage .* LightPipeline runs JVM stages only"
    with pytest.raises(AttributeError, match=refused):
        LightPipeline(PipelineModel(stages=[DocumentAssembler().setInputCol("text").setOutputCol("document")]))
