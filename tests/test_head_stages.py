"""Issue 24, point 3: the fine-tuned head stages with Spark NLP's names and schema, on tiny synthetic
Longformer ForSequenceClassification / ForTokenClassification checkpoints exported once per module:
category scores against Hugging Face's own class (softmax of its logits on the ids the stage's tokenization makes),
per sentence, coalesced and with a sigmoid threshold; named_entity tags against the argmax of Hugging Face's
first-piece logits; NerConverter's chunks and inclusive offsets on text with accents and CRLF, and Spark NLP's IOB
rules; save/load; a bad note isolated; one-line refusals of a model without a head or with the other kind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clinlong.pipelines.core.heads import probabilities

ATOL = 1e-4
SEQUENCE_LABELS = ("PNEUMONIA", "SEPSIS", "CHF")
TOKEN_LABELS = ("O", "B-PROBLEM", "I-PROBLEM")
TEXTS = [
    "Patient with fever and cough.\r\nChest X-ray: pneumonia. Café au lait spots noted.",
    "Pt Émile Dupré, 67 y.o.\r\nDx: CHF exacerbation; BNP élevé.",
    "Short note.",
    "",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (checkpoint, artifact) of a tiny fine-tuned Longformer of that head kind."""
    from clinlong.export.__main__ import run
    from clinlong.export.synthetic import write_synthetic_checkpoint

    out = {}
    for kind, labels in (("sequence", SEQUENCE_LABELS), ("token", TOKEN_LABELS)):
        ck = write_synthetic_checkpoint(
            tmp_path_factory.mktemp("ckpt") / f"longformer-{kind}", "tiny", 0, "longformer", kind, labels
        )
        art = tmp_path_factory.mktemp("artifacts") / f"longformer-{kind}"
        run([str(ck), str(art)])
        out[kind] = (ck, art)
    return out


_HF: dict = {}


def _hf_logits(ckpt, art, text: str) -> np.ndarray:
    """Hugging Face's own class (fp32) on `<s> + BPE(text) + </s>`, the ids the stage's tokenization makes."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging

    from clinlong.pipelines.core.artifact import Artifact

    if ckpt not in _HF:
        logging.set_verbosity_error()
        auto = AutoModelForTokenClassification if "token" in ckpt.name else AutoModelForSequenceClassification
        _HF[ckpt] = auto.from_pretrained(str(ckpt)).eval(), Artifact.open(art, verify=False)
    model, artifact = _HF[ckpt]
    enc = artifact.tokenizer.encode(text, add_special_tokens=False)
    bos, eos = artifact.sequence_frame
    ids = torch.tensor([[bos, *enc.ids, eos]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].numpy()
    return logits, enc.offsets


def _scores(a) -> np.ndarray:
    return np.array([float(a["metadata"][lab]) for lab in SEQUENCE_LABELS])


@pytest.fixture(scope="module")
def annotated(models, spark, tmp_path_factory):
    """The fitted pipeline (document, sentence, token, four classifiers, the tagger, the converter) and its
    output rows by id."""
    from pyspark.ml import Pipeline

    from clinlong.pipelines.spark.stages import (
        DocumentAssembler,
        LongformerForSequenceClassification,
        LongformerForTokenClassification,
        NerConverter,
        SentenceDetector,
        Tokenizer,
    )

    seq, tok = str(models["sequence"][1]), str(models["token"][1])

    def classifier(col, out):
        return LongformerForSequenceClassification().setModelPath(seq).setInputCols(col, "token").setOutputCol(out)

    stages = [
        DocumentAssembler().setInputCol("text").setOutputCol("document"),
        SentenceDetector().setInputCols("document").setOutputCol("sentence"),
        Tokenizer().setInputCols("sentence").setOutputCol("token"),
        classifier("document", "class"),
        classifier("sentence", "sentence_class"),
        classifier("sentence", "coalesced").setCoalesceSentences(True),
        classifier("document", "multi").setActivation("sigmoid").setThreshold(0.4),
        LongformerForTokenClassification().setModelPath(tok).setInputCols("document", "token").setOutputCol("ner"),
        NerConverter().setInputCols("document", "token", "ner").setOutputCol("chunk"),
    ]
    df = spark.createDataFrame(list(enumerate(TEXTS)), "id int, text string")
    model = Pipeline(stages=stages).fit(df)
    out = model.transform(df)
    return model, df, out, {r["id"]: r.asDict(recursive=True) for r in out.collect()}


def test_category_scores_equal_hugging_faces_softmax(models, annotated):
    ck, art = models["sequence"]
    _, _, out, rows = annotated
    assert out.schema["class"].metadata == {"annotatorType": "category"}
    for i, text in enumerate(TEXTS[:3]):
        (a,) = rows[i]["class"]
        logits, _ = _hf_logits(ck, art, text)
        want = probabilities(logits, "softmax")
        assert np.abs(_scores(a) - want).max() <= ATOL, (i, _scores(a), want)
        assert (a["annotatorType"], a["begin"], a["end"]) == ("category", 0, len(text) - 1)
        assert a["result"] == SEQUENCE_LABELS[int(np.argmax(want))] and a["metadata"]["sentence"] == "0"
    assert rows[3]["class"] == [] and rows[3]["ner"] == [] and rows[3]["chunk"] == []


def test_sentences_and_coalesce_sentences(models, annotated):
    ck, art = models["sequence"]
    rows = annotated[3]
    for i in range(3):
        sents, got = rows[i]["sentence"], rows[i]["sentence_class"]
        assert [(a["begin"], a["end"]) for a in got] == [(s["begin"], s["end"]) for s in sents]
        assert [a["metadata"]["sentence"] for a in got] == [str(k) for k in range(len(sents))]
        for s, a in zip(sents, got):
            want = probabilities(_hf_logits(ck, art, s["result"])[0], "softmax")
            assert np.abs(_scores(a) - want).max() <= ATOL
        (c,) = rows[i]["coalesced"]  # one per document: the sentences' mean, anchored at the first (Spark NLP)
        mean = np.mean([_scores(a) for a in got], axis=0)
        assert np.abs(_scores(c) - mean).max() <= 1e-6
        assert (c["begin"], c["end"], c["result"]) == (
            sents[0]["begin"],
            sents[0]["end"],
            SEQUENCE_LABELS[int(np.argmax(mean))],
        )
    assert len(rows[0]["sentence"]) > 1


def test_sigmoid_activation_and_threshold(models, annotated):
    """activation sigmoid: one annotation per label scoring over the threshold, each with every label's score."""
    from clinlong.pipelines.spark.stages import LongformerForSequenceClassification

    ck, art = models["sequence"]
    rows = annotated[3]
    assert LongformerForSequenceClassification().setModelPath(str(art)).getActivation() == "softmax"  # the head's
    seen = set()
    for i, text in enumerate(TEXTS[:3]):
        want = probabilities(_hf_logits(ck, art, text)[0], "sigmoid")
        got = rows[i]["multi"]
        assert [a["result"] for a in got] == [lab for lab, s in zip(SEQUENCE_LABELS, want) if s > 0.4]
        for a in got:
            assert np.abs(_scores(a) - want).max() <= ATOL
        seen.add(len(got))
    assert seen - {0}, "the threshold let no label through: the case is not exercised"


def test_token_tags_equal_hugging_faces_first_piece_argmax(models, annotated):
    ck, art = models["token"]
    _, _, out, rows = annotated
    assert out.schema["ner"].metadata == {"annotatorType": "named_entity"}
    for i, text in enumerate(TEXTS[:3]):
        toks, ner = rows[i]["token"], rows[i]["ner"]
        assert [(a["begin"], a["end"]) for a in ner] == [(t["begin"], t["end"]) for t in toks]
        logits, offsets = _hf_logits(ck, art, text)
        probs = probabilities(logits, "softmax")
        for t, a in zip(toks, ner):
            j = next(k for k, (s, e) in enumerate(offsets) if s <= t["begin"] < e)  # the token's first piece
            best = int(np.argmax(logits[j + 1]))  # +1: after <s>
            assert a["result"] == TOKEN_LABELS[best], (i, t["result"])
            assert a["metadata"]["word"] == t["result"] and a["annotatorType"] == "named_entity"
            assert abs(float(a["metadata"]["confidence"]) - probs[j + 1, best]) <= ATOL


def test_chunks_of_the_model_hold_their_text(annotated):
    _, _, out, rows = annotated
    assert out.schema["chunk"].metadata == {"annotatorType": "chunk"}
    n = 0
    for i, text in enumerate(TEXTS[:3]):
        for k, c in enumerate(rows[i]["chunk"]):
            assert c["result"] == text[c["begin"] : c["end"] + 1] and c["metadata"]["chunk"] == str(k)
            assert c["metadata"]["entity"] == "PROBLEM" and 0 < float(c["metadata"]["confidence"]) <= 1
            n += 1
    assert n


def test_iob_rules_as_spark_nlps_ner_converter():
    from clinlong.pipelines.core.heads import chunks_from_tags

    def tags(*ts):
        return [(2 * k, 2 * k, t, f"w{k}", 0.5) for k, t in enumerate(ts)]

    def spans(ts, **kw):
        return [(b, e, ent) for b, e, ent, _, _ in chunks_from_tags(tags(*ts), **kw)]

    assert spans(["B-A", "I-A", "O", "B-B", "B-B", "I-B"]) == [(0, 2, "A"), (6, 6, "B"), (8, 10, "B")]
    assert spans(["I-A", "I-A", "", "I-B"]) == [(0, 2, "A"), (6, 6, "B")]  # I- opens after O or no tag
    assert spans(["B-A", "I-B", "I-B"]) == [(0, 4, "A")]  # I- continues the open chunk (Spark NLP)
    assert spans(["A", "A", "B", "O", "A"], no_schema=True) == [(0, 2, "A"), (4, 4, "B"), (8, 8, "A")]
    assert spans(["O", "O"]) == []


def test_ner_converter_offsets_on_accents_and_crlf(spark):
    """Hand-made tags over our Tokenizer's tokens: chunks' begin/end inclusive into the stored text."""
    from pyspark.sql import functions as F

    from clinlong.pipelines.spark.annotation import ANNOTATIONS, NAMED_ENTITY, column_metadata
    from clinlong.pipelines.spark.stages import DocumentAssembler, NerConverter, SentenceDetector, Tokenizer

    text = "Pt: Émile Dupré\r\nDx: pneumonie aiguë, café-au-lait.\r\n\r\nPlan: réévaluer."
    df = spark.createDataFrame([(1, text)], "id int, text string")
    for stage in (
        DocumentAssembler().setInputCol("text").setOutputCol("document"),
        SentenceDetector().setInputCols("document").setOutputCol("sentence"),
        Tokenizer().setInputCols("sentence").setOutputCol("token"),
    ):
        df = stage.transform(df)
    row = df.collect()[0]
    want_tag = {
        "Émile": "B-PER",
        "Dupré": "I-PER",
        "pneumonie": "B-PROBLEM",
        "aiguë": "I-PROBLEM",
        "café-au-lait": "B-PROBLEM",
        "réévaluer": "B-PLAN",
    }
    ner = [
        (
            "named_entity",
            t["begin"],
            t["end"],
            want_tag.get(t["result"], "O"),
            {"sentence": t["metadata"]["sentence"], "word": t["result"], "confidence": "0.5"},
            [],
        )
        for t in row["token"]
    ]
    tagged = spark.createDataFrame(
        [(1, row["document"], row["sentence"], row["token"], ner)],
        f"id int, document {ANNOTATIONS.simpleString()}, sentence "
        f"{ANNOTATIONS.simpleString()}, token {ANNOTATIONS.simpleString()}, "
        f"ner {ANNOTATIONS.simpleString()}",
    )
    for col, kind in (("document", "document"), ("sentence", "document"), ("token", "token"), ("ner", NAMED_ENTITY)):
        tagged = tagged.withColumn(col, F.col(col).alias(col, metadata=column_metadata(kind)))
    for doc_col in ("document", "sentence"):
        conv = NerConverter().setInputCols(doc_col, "token", "ner").setOutputCol("chunk")
        chunks = conv.transform(tagged).collect()[0]["chunk"]
        assert [c["result"] for c in chunks] == ["Émile Dupré", "pneumonie aiguë", "café-au-lait", "réévaluer"]
        for c in chunks:
            assert text[c["begin"] : c["end"] + 1] == c["result"] and "\r" not in c["result"]
        assert [c["metadata"]["entity"] for c in chunks] == ["PER", "PROBLEM", "PROBLEM", "PLAN"]
        assert [c["metadata"]["chunk"] for c in chunks] == ["0", "1", "2", "3"]
        assert all(c["metadata"]["confidence"] == "0.5" for c in chunks)
        assert [c["metadata"]["sentence"] for c in chunks] == (
            ["0"] * 4 if doc_col == "document" else ["0", "1", "1", "2"]
        )
    only = (
        NerConverter()
        .setInputCols("document", "token", "ner")
        .setWhiteList(["PROBLEM"])
        .setOutputCol("chunk")
        .transform(tagged)
        .collect()[0]["chunk"]
    )
    assert [(c["result"], c["metadata"]["chunk"]) for c in only] == [("pneumonie aiguë", "0"), ("café-au-lait", "1")]


def test_save_and_load_round_trip(annotated, tmp_path):
    from pyspark.ml import PipelineModel

    from clinlong.pipelines.spark.stages import LongformerForSequenceClassification

    model, df, _, rows = annotated
    model.write().overwrite().save(str(tmp_path / "pipeline"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    assert [type(s).__name__ for s in loaded.stages] == [type(s).__name__ for s in model.stages]
    again = {
        r["id"]: r.asDict(recursive=True)
        for r in loaded.transform(df).select("id", "multi", "coalesced", "ner", "chunk").collect()
    }
    for i in rows:
        for col in ("multi", "coalesced", "ner", "chunk"):
            assert again[i][col] == rows[i][col], (i, col)
    stage = loaded.stages[5]
    assert stage.getCoalesceSentences() and stage.getInputCols() == ["sentence", "token"]
    # the saved stage names its artifact's model_id: another model at that path is refused on load
    model.stages[3].write().overwrite().save(str(tmp_path / "stage"))
    meta = next(p for p in (tmp_path / "stage" / "metadata").glob("part-*") if not p.name.endswith(".crc"))
    meta.write_text(meta.read_text().replace(model.stages[3].getOrDefault("modelId"), "other@000"))
    for crc in meta.parent.glob(".*.crc"):  # Hadoop checks the edited file against it
        crc.unlink()
    with pytest.raises(ValueError, match="was built with model other@000"):
        LongformerForSequenceClassification.load(str(tmp_path / "stage"))


def test_wrong_models_are_refused_in_one_line(models, tmp_path):
    from clinlong.pipelines.core.artifact import ArtifactError
    from clinlong.pipelines.spark.stages import (
        BigBirdForSequenceClassification,
        LongformerForSequenceClassification,
        LongformerForTokenClassification,
    )

    seq, tok = str(models["sequence"][1]), str(models["token"][1])
    no_head = tmp_path / "no-head"
    shutil.copytree(seq, no_head)
    manifest = json.loads((no_head / "manifest.json").read_text())
    manifest.pop("head")
    (no_head / "manifest.json").write_text(json.dumps(manifest))
    cases = [
        (LongformerForSequenceClassification, tok, ArtifactError, "use the ForTokenClassification stage"),
        (LongformerForTokenClassification, seq, ArtifactError, "use the ForSequenceClassification stage"),
        (LongformerForSequenceClassification, str(no_head), ArtifactError, "python -m clinlong.export"),
        (LongformerForTokenClassification, str(no_head), ArtifactError, "no fine-tuned head"),
        (BigBirdForSequenceClassification, seq, ValueError, "use LongformerForSequenceClassification"),
    ]
    for cls, path, err, needle in cases:
        with pytest.raises(err) as e:
            cls().setModelPath(path)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="has no model"):
        LongformerForSequenceClassification().getLabels()
    assert LongformerForSequenceClassification.pretrained(seq).getClasses() == list(SEQUENCE_LABELS)
    multi = tmp_path / "multi"  # a multi-label head's manifest: its stage defaults to sigmoid scores
    shutil.copytree(seq, multi)
    manifest = json.loads((multi / "manifest.json").read_text())
    manifest["head"].update(problem_type="multi_label_classification", activation="sigmoid")
    (multi / "manifest.json").write_text(json.dumps(manifest))
    assert LongformerForSequenceClassification().setModelPath(str(multi)).getActivation() == "sigmoid"


def test_a_bad_note_is_isolated(models, spark, monkeypatch):
    """A note the model step fails on alone: its annotations carry the reason, its neighbours are classified."""
    from pyspark.ml import Pipeline

    from clinlong.pipelines.spark.stages import (
        DocumentAssembler,
        LongformerForSequenceClassification,
        LongformerForTokenClassification,
        Tokenizer,
    )

    texts = ["Pt is fine.", "Pt saw a zebra.", "Pt is also fine."]
    reason = "InjectedFault in the model step"
    monkeypatch.setenv("CLINLONG_FAULT_RAISE", "text:zebra")
    env = spark.sparkContext.environment
    env["CLINLONG_FAULT_RAISE"] = "text:zebra"  # the Python workers of functions wrapped from now on
    try:
        df = spark.createDataFrame(list(enumerate(texts)), "id int, text string").coalesce(1)
        rows = {
            r["id"]: r
            for r in Pipeline(
                stages=[
                    DocumentAssembler().setInputCol("text").setOutputCol("document"),
                    Tokenizer().setInputCols("document").setOutputCol("token"),
                    LongformerForSequenceClassification()
                    .setModelPath(str(models["sequence"][1]))
                    .setInputCols("document", "token")
                    .setOutputCol("class"),
                    LongformerForTokenClassification()
                    .setModelPath(str(models["token"][1]))
                    .setInputCols("document", "token")
                    .setOutputCol("ner"),
                ]
            )
            .fit(df)
            .transform(df)
            .collect()
        }
    finally:
        env.pop("CLINLONG_FAULT_RAISE", None)
    (bad,) = rows[1]["class"]
    assert bad["result"] == "" and bad["metadata"]["skip_reason"] == reason
    assert {a["result"] for a in rows[1]["ner"]} == {""} and len(rows[1]["ner"]) == len(rows[1]["token"])
    assert {a["metadata"]["skip_reason"] for a in rows[1]["ner"]} == {reason}
    for i in (0, 2):
        assert rows[i]["class"][0]["result"] in SEQUENCE_LABELS and "skip_reason" not in rows[i]["class"][0]["metadata"]
        assert all(a["result"] in TOKEN_LABELS for a in rows[i]["ner"])


def test_nlu_style_names_resolve_under_clinlong_models(models, tmp_path, monkeypatch):
    from clinlong.pipelines.spark.stages import LongformerForSequenceClassification, LongformerForTokenClassification

    monkeypatch.setenv("CLINLONG_MODELS", str(tmp_path))
    (tmp_path / "toy_en").symlink_to(models["sequence"][1])
    (tmp_path / "toyner_en").symlink_to(models["token"][1])
    stage = LongformerForSequenceClassification.pretrained("en.classify.longformer.toy")
    assert stage.getClasses() == list(SEQUENCE_LABELS)
    assert LongformerForTokenClassification.pretrained("en.ner.longformer.toyner").getLabels() == list(TOKEN_LABELS)
