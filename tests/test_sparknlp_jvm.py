"""Our `--format sparknlp` export inside Spark NLP's own JVM (issue 20, points 2 and 5).

Spark NLP 5.5.3's JAR (Maven Central; its TF runtime, JSL's unserved tensorflow-cpu_2.12:0.4.4, replaced by
TF-Java's org.tensorflow:tensorflow-core-api:0.4.2, TF 2.7.4, see benchmarks/sparknlp-jvm.pom.xml) runs the
`clinical_longformer` card's pipeline (DocumentAssembler -> SentenceDetector -> Tokenizer ->
LongformerEmbeddings.loadSavedModel(our export), case-sensitive, max sentence length 4096) in its own venv
(pyspark 3.5.8). Its token vectors are compared, sentence by sentence, with Hugging Face's LongformerModel
(torch, fp32) run on exactly the BPE pieces Spark NLP's own tokenizer produced, and with our job at
--context sentence --granularity token; then the Spark NLP model is saved with `.write().save()`, loaded
back and run again.

Point 5: the card's snippet as written (`LongformerEmbeddings.pretrained("clinical_longformer", "en")`,
setInputCols, setCaseSensitive, setMaxSentenceLength) runs in Spark NLP's JVM on the model loaded from our
export and put in Spark NLP's pretrained cache folder (benchmarks/sparknlp_runner.py: cache_pretrained), and
in our stage (import changed: clinlong.pipelines) on the native artifact of the same checkpoint, resolved by
name under $CLINLONG_MODELS. Vectors are compared where both give the same sentence and the same BPE pieces.

The checkpoint is the tiny synthetic Longformer with its embedding matrix grown to the real 50,265 rows:
Spark NLP's RoBERTa/Longformer backend warms up at load time on fixed RoBERTa ids (up to 42,752), which
the tiny vocabulary (about 2,900 ids) lacks ("indices[0,1] = 7939 is not in [0, 2920)"). The base-size
figures are in the README ("Spark NLP"). One JVM run serves the whole module.
Where Spark NLP cannot be set up the tests skip with the one-line reason (and fail under CI=1).
"""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import pytest

MAX_LENGTH = 4096

ALIKE_WORDS = (
    "chest",
    "melena",
    "headache",
    "hypothyroidism",
    "shortness",
    "nausea",
    "productive",
    "cirrhosis",
    "dyspnea",
    "afib",
    "fever",
    "lower",
    "abdominal",
    "altered",
    "hematemesis",
    "syncope",
)


def _require_jvm() -> None:
    from clinlong.benchmarks.sparknlp_jvm import unavailable_reason

    reason = unavailable_reason()
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"Spark NLP's JVM: {reason}")


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    from clinlong.benchmarks.sparknlp_jvm import wide_checkpoint

    return wide_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-wide-vocab")


@pytest.fixture(scope="module")
def sparknlp_export(wide_checkpoint):
    from clinlong.benchmarks.sparknlp_jvm import sparknlp_export

    _require_jvm()
    return sparknlp_export(wide_checkpoint, "tiny-wide")  # cached while checkpoint and exporter match


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    from clinlong.export.synthetic_notes import generate_notes

    picked = {n.row_id: n.text for n in generate_notes(12, seed=3)[:6]}
    # Notes both tokenizers encode alike (see _compare): one sentence, words split by single spaces, no
    # punctuation; Spark NLP BPE-encodes each word alone and prefixes the piece with "Ġ" except at
    # the document's first character, which equals HF's encoding of the sentence only for such words
    # (these 16 are, in the synthetic vocabulary).
    rng = random.Random(20)
    for k in range(3):
        picked[900_000 + k] = " ".join(rng.choice(ALIKE_WORDS) for _ in range(60))
    path = tmp_path_factory.mktemp("notes") / "notes.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in picked.items()))
    return path, picked


@pytest.fixture(scope="module")
def jvm_run(sparknlp_export, notes, tmp_path_factory):
    from clinlong.benchmarks.sparknlp_jvm import run

    out = tmp_path_factory.mktemp("jvm")
    result = run(
        {
            "model": str(sparknlp_export),
            "notes": str(notes[0]),
            "case_sensitive": True,
            "max_sentence_length": MAX_LENGTH,
            "pieces": True,
            "save_to": str(out / "saved_model"),
            "cache_pretrained": str(out / "cache_pretrained"),
            "pretrained_name": "clinical_longformer",
            "runs": [{"tag": "run"}],
        },
        out / "run",
    )
    return result, dict(np.load(out / "run" / "vectors.npz"))


@pytest.mark.slow
def test_sparknlp_jvm_loads_our_export_and_matches_hf(jvm_run, wide_checkpoint):
    import torch
    from transformers import LongformerModel

    result, vectors = jvm_run
    assert result["versions"]["sparknlp"] == "5.5.3" and result["versions"]["tensorflow"].startswith("2.7.")
    run = result["run"]
    model = LongformerModel.from_pretrained(wide_checkpoint, add_pooling_layer=False).eval()
    worst_diff, worst_cos, compared = 0.0, 1.0, 0
    for i, note_id in enumerate(run["ids"]):
        got_all = vectors[f"run_{i}"]
        for s, (ids, begins) in enumerate(result["pieces"][i]):
            rows = [k for k, e in enumerate(run["embeddings"][i]) if e[3] == s]
            if not rows:
                continue
            ids = ids[: MAX_LENGTH - 2]
            with torch.inference_mode():
                ref = model(input_ids=torch.tensor([[0, *ids, 2]])).last_hidden_state[0, 1:-1].numpy()
            for k in rows:
                begin, _, _, _, piece_id = run["embeddings"][i][k]
                j = begins.index(begin)  # Spark NLP keeps the piece that starts where its token starts
                assert ids[j] == piece_id
                got, want = got_all[k], ref[j]
                worst_diff = max(worst_diff, float(np.abs(got - want).max()))
                worst_cos = min(worst_cos, float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)))
                compared += 1
    print(f"Spark NLP JVM vs HF: {compared} token vectors, max |diff| {worst_diff:.2e}, min cosine {worst_cos:.7f}")
    assert compared > 100
    assert worst_diff <= 1e-4 and worst_cos >= 0.99999, (worst_diff, worst_cos)


@pytest.mark.slow
def test_sparknlp_model_saved_and_loaded_gives_the_same_vectors(jvm_run):
    result, vectors = jvm_run
    assert "longformer_tensorflow" in result["saved"] and "metadata" in result["saved"], result["saved"]
    assert "reloaded_blocked" not in result, result["reloaded_blocked"]
    assert result["reloaded"]["embeddings"] == result["run"]["embeddings"]
    for i in range(len(result["run"]["ids"])):
        np.testing.assert_allclose(vectors[f"reloaded_{i}"], vectors[f"run_{i}"], atol=1e-6)
    meta = result["run"]["storage_ref"]
    # Spark NLP's column metadata (its default dimension, 768, unless setDimension: loadSavedModel does not read it)
    assert meta["annotatorType"] == "word_embeddings" and meta["dimension"] == 768 and "ref" in meta, meta


@pytest.fixture(scope="module")
def our_models(wide_checkpoint, tmp_path_factory):
    """$CLINLONG_MODELS holding the native artifact of the same checkpoint as clinical_longformer_en."""
    from clinlong.export.__main__ import run

    models = tmp_path_factory.mktemp("models")
    run([str(wide_checkpoint), str(models / "clinical_longformer_en")])
    return models


@pytest.fixture(scope="module")
def our_stage_run(our_models, notes, spark):
    """The card's snippet on our stage (import changed), on the native artifact of the same checkpoint, found
    by its registered name under $CLINLONG_MODELS; fp32 (our default, auto, is bf16 on bf16 CPUs)."""
    from pyspark.ml import Pipeline

    from clinlong.pipelines import DocumentAssembler, LongformerEmbeddings, SentenceDetector, Tokenizer

    models = our_models
    before = os.environ.get("CLINLONG_MODELS")
    os.environ["CLINLONG_MODELS"] = str(models)
    try:
        embeddings = (
            LongformerEmbeddings.pretrained("clinical_longformer", "en")
            .setInputCols(["sentence", "token"])
            .setOutputCol("embeddings")
            .setCaseSensitive(True)
            .setMaxSentenceLength(4096)
        )
    finally:
        if before is None:
            os.environ.pop("CLINLONG_MODELS")
        else:
            os.environ["CLINLONG_MODELS"] = before
    embeddings = embeddings.setPrecision("fp32")
    df = spark.createDataFrame(sorted(notes[1].items()), "id long, text string")
    stages = [
        DocumentAssembler().setInputCol("text").setOutputCol("document"),
        SentenceDetector().setInputCols(["document"]).setOutputCol("sentence"),
        Tokenizer().setInputCols(["sentence"]).setOutputCol("token"),
        embeddings,
    ]
    rows = Pipeline(stages=stages).fit(df).transform(df).select("id", "sentence", "embeddings").collect()
    return {
        r["id"]: (
            [(a.begin, a.end) for a in r["sentence"]],
            [(a.begin, int(a.metadata["sentence"]), np.array(a.embeddings, np.float32)) for a in r["embeddings"]],
        )
        for r in rows
    }


@pytest.fixture(scope="module")
def our_job_run(our_models, notes, our_stage_run, spark, tmp_path_factory):
    """Our job at --context sentence --granularity token (first-piece vectors), fp32, on the same notes; its
    sentences are the stage's (the same text rules), taken from our_stage_run by sentence_index."""
    import pandas as pd
    from deltalake import DeltaTable

    from clinlong.pipelines.core.engine import EmbedOptions
    from clinlong.pipelines.jobs.embed_notes import JobConfig, run

    work = tmp_path_factory.mktemp("job")
    pd.DataFrame({"ROW_ID": list(notes[1]), "TEXT": list(notes[1].values())}).to_parquet(work / "notes.parquet")
    summary = run(
        JobConfig(
            notes=str(work / "notes.parquet"),
            model=str(our_models / "clinical_longformer_en"),
            out=str(work / "out"),
            granularity="token",
            options=EmbedOptions(context="sentence", precision="fp32"),
        ),
        spark,
    )
    assert summary["embedded"] == len(notes[1]), summary
    table = DeltaTable(str(work / "out")).to_pyarrow_table().to_pandas()
    return {
        int(note_id): (
            our_stage_run[int(note_id)][0],
            [(int(r.begin), int(r.sentence_index), np.asarray(r.embedding, np.float32)) for r in rows.itertuples()],
        )
        for note_id, rows in table.groupby("note_id")
    }


def _compare(jvm_result, vectors, tag, ours, notes, tokenizer):
    """Token vectors of Spark NLP's run `tag` against ours, on the sentences both split alike and both
    encode as the same BPE pieces. Returns (max |diff|, min cosine, compared, not compared, sentences alike)."""
    run = jvm_result[tag]
    worst_diff, worst_cos, compared, other, alike = 0.0, 1.0, 0, 0, 0
    for i, note_id in enumerate(run["ids"]):
        text = notes[note_id]
        our_sentences, our_tokens = ours[note_id]
        got_all = vectors[f"{tag}_{i}"]
        spans = [(b, e) for b, e, _, _ in jvm_result[tag]["sentences"][i]]
        for s, (b, e) in enumerate(spans):
            rows = [k for k, a in enumerate(run["embeddings"][i]) if a[3] == s]
            ids = jvm_result["pieces"][i][s][0] if s < len(jvm_result["pieces"][i]) else None
            same = (b, e) in our_sentences and ids == tokenizer(text[b : e + 1], add_special_tokens=False)["input_ids"]
            if not same:
                other += len(rows)
                continue
            alike += 1
            mine = {begin: vec for begin, sent, vec in our_tokens if sent == our_sentences.index((b, e))}
            for k in rows:
                begin = run["embeddings"][i][k][0]
                if begin not in mine:
                    other += 1
                    continue
                got, want = got_all[k], mine[begin]
                worst_diff = max(worst_diff, float(np.abs(got - want).max()))
                worst_cos = min(worst_cos, float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)))
                compared += 1
    return worst_diff, worst_cos, compared, other, alike


@pytest.mark.slow
def test_sparknlp_vectors_equal_our_job_at_sentence_context(jvm_run, our_job_run, notes, wide_checkpoint):
    """Point 2's last comparison: Spark NLP's token vectors against our job's (sentence context, first piece)."""
    from transformers import AutoTokenizer

    result, vectors = jvm_run
    tokenizer = AutoTokenizer.from_pretrained(str(wide_checkpoint))
    diff, cos, compared, other, alike = _compare(result, vectors, "run", our_job_run, notes[1], tokenizer)
    total = sum(len(e) for e in result["run"]["embeddings"])
    print(
        f"Spark NLP JVM vs our job (--context sentence --granularity token): {compared} of {total} Spark NLP "
        f"token vectors comparable ({alike} sentences split and encoded alike), {other} not; "
        f"max |diff| {diff:.2e}, min cosine {cos:.7f}"
    )
    assert compared > 0
    assert diff <= 1e-4 and cos >= 0.99999, (diff, cos)


@pytest.mark.slow
def test_card_snippet_pretrained_runs_in_sparknlp_and_in_our_stage(jvm_run, our_stage_run, notes, wide_checkpoint):
    """Point 5: `LongformerEmbeddings.pretrained("clinical_longformer", "en")` as on the card, in both."""
    from transformers import AutoTokenizer

    result, vectors = jvm_run
    cache = result["pretrained_cache"]
    assert re.fullmatch(r"clinical_longformer_en_5\.5\.3_3\.5\.\d+_\d{13}", cache["entry"]), cache["entry"]
    assert not cache["s3_client_created"]  # served from the cache folder: Spark NLP never built its S3 client
    # Spark NLP's pretrained() gives exactly what the model it was saved from gives
    assert result["pretrained"]["embeddings"] == result["run"]["embeddings"]
    for i in range(len(result["run"]["ids"])):
        np.testing.assert_array_equal(vectors[f"pretrained_{i}"], vectors[f"run_{i}"])
    tokenizer = AutoTokenizer.from_pretrained(str(wide_checkpoint))
    diff, cos, compared, other, alike = _compare(result, vectors, "pretrained", our_stage_run, notes[1], tokenizer)
    total = sum(len(e) for e in result["pretrained"]["embeddings"])
    print(
        f"card snippet, Spark NLP JVM vs our stage: {compared} of {total} Spark NLP token vectors comparable "
        f"({alike} sentences split and encoded alike), {other} not; max |diff| {diff:.2e}, min cosine {cos:.7f}"
    )
    assert compared > 0
    assert diff <= 1e-4 and cos >= 0.99999, (diff, cos)
