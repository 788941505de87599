"""One Spark ML pipeline, two libraries (issue 20, point 3), executed by the `.venv-sparknlp-mixed` Python
(pyspark 3.5.8 + spark-nlp 5.5.3 + clinlong's base install, Spark NLP's JAR on spark.jars);
benchmarks/sparknlp_mixed.py creates that venv and starts this file. Input: one JSON spec file; output:
result.json in spec["out"].

The pipeline, all real objects (Spark NLP's are JVM annotators behind their Python wrappers, ours are
Python stages running Arrow batches):

    Spark NLP DocumentAssembler -> SentenceDetector -> Tokenizer
    -> our LongformerEmbeddings [document, token]  (note context)       -> "lf"
    -> our BigBirdEmbeddings    [sentence, token]  (sentence context)   -> "bb"
    -> Spark NLP SentenceEmbeddings [sentence, lf] -> "lf_sentence"; [document, bb] -> "bb_document"
    -> Spark NLP NerDLApproach [sentence, token, lf] trained on synthetic IOB labels   -> "ner"
    -> Spark NLP ClassifierDLApproach [bb_document] trained on the notes' categories  -> "category_pred"
    -> Spark NLP EmbeddingsFinisher [lf, lf_sentence, bb_document]

Each Spark NLP step that can fail on its own (training, saving, loading, LightPipeline) is recorded as
its one-line error under result["blocked"], so the caller sees every finding of one run.
"""

import json
import resource
import sys
import time
import traceback
from pathlib import Path

NER_TAGS = ("O", "B-NUM", "I-NUM", "B-CAP", "B-ABBR")
# Synthetic IOB labels on Spark NLP's own tokens, computed in its JVM: numbers (a run of number tokens is
# B-NUM I-NUM ...), capitalized words, all-caps abbreviations.
LABELS_SQL = """transform(token, (t, i) -> named_struct(
    'annotatorType', 'named_entity', 'begin', t.begin, 'end', t.end,
    'result', CASE WHEN t.result RLIKE '^[0-9]' THEN
                       CASE WHEN i > 0 AND token[i - 1].result RLIKE '^[0-9]'
                                 AND token[i - 1].metadata['sentence'] = t.metadata['sentence']
                            THEN 'I-NUM' ELSE 'B-NUM' END
                   WHEN t.result RLIKE '^[A-Z]{2,}$' THEN 'B-ABBR'
                   WHEN t.result RLIKE '^[A-Z][a-z]' THEN 'B-CAP'
                   ELSE 'O' END,
    'metadata', map('word', t.result, 'sentence', t.metadata['sentence']),
    'embeddings', cast(array() AS array<float>)))"""


def pooling_diff(rows, tokens: str, sentences: str) -> float:
    """Max |Spark NLP's SentenceEmbeddings (AVERAGE) - the mean of our token vectors of that sentence|."""
    worst = 0.0
    for r in rows:
        for s in r[sentences]:
            toks = [a.embeddings for a in r[tokens] if a.metadata["sentence"] == s.metadata["sentence"]]
            mean = [sum(col) / len(toks) for col in zip(*toks)]
            worst = max(worst, max(abs(x - y) for x, y in zip(mean, s.embeddings)))
    return worst


def one_line(error: BaseException) -> str:
    """The line that names the error: a JVM exception's own line where Py4J wraps one (its first line is
    only "An error occurred while calling oNNN.load.")."""
    text = f"{type(error).__name__}: {error}"
    lines = [ln.strip().lstrip(": ") for ln in text.splitlines() if ln.strip()]
    causes = [ln[len("Caused by: ") :] for ln in lines if ln.startswith("Caused by: ")]
    if causes:  # a task failure: the root cause, not "Job aborted due to stage failure"
        return causes[-1][:400]
    jvm = [
        ln
        for ln in lines
        if ln.startswith(("java.", "org.", "com.", "scala.")) and ("Error" in ln or "Exception" in ln)
    ]
    return (jvm or lines or ["?"])[0][:400]


def session(spec):
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(spec.get("master", "local[2]"))
        .appName("clinlong-sparknlp-mixed")
        .config("spark.jars", ",".join(spec["classpath"]))
        .config("spark.driver.memory", spec.get("driver_memory", "4g"))
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.serializer", "org.apache.spark.serializer.KryoSerializer")
        .config("spark.kryoserializer.buffer.max", "2000M")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def metadata(df, col):
    return json.loads(df.schema[col].json())["metadata"]


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"blocked": {}}
    t0 = time.perf_counter()
    spark = session(spec)

    import pyspark
    import sparknlp
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.sql import functions as F
    from sparknlp.annotator import ClassifierDLApproach, NerDLApproach, SentenceDetector, SentenceEmbeddings, Tokenizer
    from sparknlp.base import DocumentAssembler, EmbeddingsFinisher

    import clinlong
    from clinlong.pipelines import BigBirdEmbeddings, LongformerEmbeddings
    from clinlong.pipelines.core.runtime import resolve_backend

    result["versions"] = {
        "pyspark": pyspark.__version__,
        "spark": spark.version,
        "sparknlp": sparknlp.version(),
        "tensorflow": spark._jvm.org.tensorflow.TensorFlow.version(),
        "clinlong": clinlong.__version__,
        "clinlong_file": clinlong.__file__,
        "backend": resolve_backend("auto", "auto"),
    }
    result["startup_s"] = time.perf_counter() - t0

    notes = [json.loads(ln) for ln in Path(spec["notes"]).read_text().splitlines()]
    raw = spark.createDataFrame(
        [(int(n["id"]), n["text"], n["category"]) for n in notes], "id long, text string, category string"
    ).repartition(2)

    front = [
        DocumentAssembler().setInputCol("text").setOutputCol("document"),
        SentenceDetector().setInputCols(["document"]).setOutputCol("sentence"),
        Tokenizer().setInputCols(["sentence"]).setOutputCol("token"),
    ]
    # The labels are computed once, on the tokens Spark NLP's own front end gives, and travel with the
    # input rows, so the pipeline below (the same front end again) trains one pipeline end to end.
    tokens = Pipeline(stages=front).fit(raw).transform(raw)
    labels = tokens.select("id", F.expr(LABELS_SQL).alias("label", metadata={"annotatorType": "named_entity"}))
    df = raw.join(labels, "id").cache()
    result["tags"] = {
        r["tag"]: r["n"]
        for r in df.select(F.explode("label.result").alias("tag"))
        .groupBy("tag")
        .count()
        .withColumnRenamed("count", "n")
        .collect()
    }

    lf = (
        LongformerEmbeddings()
        .setModelPath(spec["longformer"])
        .setInputCols(["document", "token"])
        .setOutputCol("lf")
        .setCaseSensitive(True)
        .setMaxSentenceLength(4096)
        .setBatchSize(8)
    )
    bb = (
        BigBirdEmbeddings()
        .setModelPath(spec["bigbird"])
        .setInputCols(["sentence", "token"])
        .setOutputCol("bb")
        .setCaseSensitive(True)
        .setMaxSentenceLength(4096)
    )
    ner = (
        NerDLApproach()
        .setInputCols(["sentence", "token", "lf"])
        .setLabelColumn("label")
        .setOutputCol("ner")
        .setMaxEpochs(spec.get("epochs", 3))
        .setLr(0.01)
        .setBatchSize(8)
        .setRandomSeed(0)
        .setVerbose(0)
        .setEnableOutputLogs(False)
    )
    classifier = (
        ClassifierDLApproach()
        .setInputCols(["bb_document"])
        .setLabelColumn("category")
        .setOutputCol("category_pred")
        .setMaxEpochs(spec.get("epochs", 3))
        .setLr(0.01)
        .setBatchSize(8)
        .setRandomSeed(0)
        .setEnableOutputLogs(False)
    )
    stages = front + [
        lf,
        bb,
        SentenceEmbeddings().setInputCols(["sentence", "lf"]).setOutputCol("lf_sentence").setPoolingStrategy("AVERAGE"),
        SentenceEmbeddings()
        .setInputCols(["document", "bb"])
        .setOutputCol("bb_document")
        .setPoolingStrategy("AVERAGE")
        .setDimension(128),  # lf_sentence keeps Spark NLP's default: it does not read the input's dimension
    ]
    finisher = (
        EmbeddingsFinisher()
        .setInputCols(["lf", "lf_sentence", "bb_document"])
        .setOutputCols(["lf_vectors", "lf_sentence_vectors", "bb_document_vectors"])
        .setCleanAnnotations(False)
    )
    t = time.perf_counter()
    try:  # the whole pipeline, both trained Spark NLP annotators included, fitted as one
        model = Pipeline(stages=stages + [ner, classifier, finisher]).fit(df)
    except Exception as e:  # noqa: BLE001 - then each trained annotator alone, to record which one is blocked
        result["blocked"]["Pipeline.fit"] = one_line(e)
        traceback.print_exc()
        fitted = Pipeline(stages=stages).fit(df)
        features = fitted.transform(df).cache()
        trained = []
        for name, approach in (("NerDLApproach", ner), ("ClassifierDLApproach", classifier)):
            try:
                trained.append(approach.fit(features))
            except Exception as e:  # noqa: BLE001
                result["blocked"][name] = one_line(e)
                traceback.print_exc()
        model = PipelineModel(stages=fitted.stages + trained + [finisher])
    result["fit_s"] = time.perf_counter() - t
    result["stages"] = [f"{type(s).__module__.split('.')[0]}.{type(s).__name__}" for s in model.stages]
    t = time.perf_counter()
    out = model.transform(df)
    rows = sorted(out.collect(), key=lambda r: r["id"])
    result["transform_s"] = time.perf_counter() - t

    cols = ["document", "sentence", "token", "lf", "bb", "lf_sentence", "bb_document", "label"] + [
        c for c in ("ner", "category_pred") if c in out.columns
    ]
    result["metadata"] = {c: metadata(out, c) for c in cols}
    result["finished_types"] = {
        c: out.schema[c].dataType.simpleString() for c in ("lf_vectors", "lf_sentence_vectors", "bb_document_vectors")
    }
    result["storage_refs"] = {"lf": lf.getStorageRef(), "bb": bb.getStorageRef()}
    for s in model.stages:  # Spark NLP's stages, as their JVM objects hold it (trained models set it there)
        if type(s).__module__.startswith("sparknlp") and s._java_obj.hasParam("storageRef"):
            key = f"{type(s).__name__}:{s.getOutputCol()}"
            try:
                result["storage_refs"][key] = s._java_obj.getStorageRef()
            except Exception as e:  # noqa: BLE001 - an unset Param (SentenceEmbeddings: the column carries it)
                result["storage_refs"][key] = "unset: " + one_line(e)

    def ann(a):
        return [a.begin, a.end, a.result, dict(a.metadata), len(a.embeddings)]

    keep = ["token", "sentence", "lf", "bb", "lf_sentence", "bb_document", "label", "ner", "category_pred"]
    result["rows"] = [
        {
            "id": r["id"],
            "category": r["category"],
            **{c: [ann(a) for a in r[c]] for c in keep if c in out.columns},
            "lf_vectors": [len(v) for v in r["lf_vectors"]],
            "bb_document_vectors": [len(v) for v in r["bb_document_vectors"]],
        }
        for r in rows
    ]
    # Spark NLP's SentenceEmbeddings over our vectors, against the mean of our token vectors in Python
    result["sentence_mean_max_diff"] = pooling_diff(rows, "lf", "lf_sentence")

    # A NerDL model trained on our storageRef, fed vectors labelled with another one.
    if "ner" in out.columns:
        nermodel = next(s for s in model.stages if type(s).__name__ == "NerDLModel")
        other = (
            LongformerEmbeddings()
            .setModelPath(spec["longformer"])
            .setInputCols(["document", "token"])
            .setOutputCol("lf")
            .setStorageRef("another_ref")
        )
        try:
            nermodel.transform(other.transform(Pipeline(stages=front).fit(df).transform(df))).collect()
            result["wrong_ref"] = "accepted"
        except Exception as e:  # noqa: BLE001
            result["wrong_ref"] = one_line(e)

    if "ner" in out.columns:  # on the training rows: how far a few epochs got on our vectors
        pairs = [(a[2], b[2]) for r in result["rows"] for a, b in zip(r["label"], r["ner"])]
        result["ner_train_accuracy"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)

    # Spark ML persistence of the mixed PipelineModel (pyspark's Python writer: ours as DefaultParams,
    # Spark NLP's through their JVM writers), loaded back and run again: first without the trained
    # TensorFlow stages, then the whole model.
    def reloaded(m, path, cols):
        m.write().overwrite().save(str(path))
        again = PipelineModel.load(str(path))
        got = sorted(again.transform(df).select("id", *cols).collect(), key=lambda r: r["id"])
        same, diff = {}, {}
        for c in cols:
            same[c] = all(
                [(a.begin, a.end, a.result) for a in x[c]] == [(a.begin, a.end, a.result) for a in y[c]]
                for x, y in zip(rows, got)
            )
            diff[c] = max(
                (
                    abs(u - v)
                    for x, y in zip(rows, got)
                    for a, b in zip(x[c], y[c])
                    for u, v in zip(a.embeddings, b.embeddings)
                ),
                default=0.0,
            )
        return {
            "stages": sorted(p.name for p in (path / "stages").iterdir()),
            "same_annotations": same,
            "max_vector_diff": diff,
        }

    trained = ("NerDLModel", "ClassifierDLModel")
    untrained = PipelineModel(stages=[s for s in model.stages if type(s).__name__ not in trained])
    result["reload_untrained"] = reloaded(
        untrained, out_dir / "untrained_model", ["lf", "bb", "lf_sentence", "bb_document"]
    )
    try:
        result["reload_full"] = reloaded(
            model, out_dir / "pipeline_model", [c for c in ("lf", "ner", "category_pred") if c in out.columns]
        )
    except Exception as e:  # noqa: BLE001
        result["blocked"]["PipelineModel.load"] = one_line(e)
        traceback.print_exc()

    # A token no BPE piece covers (U+200B: Spark NLP's Tokenizer keeps it as a token, BigBird's SentencePiece
    # normalizer drops it): ours gives it an empty `embeddings` array and its skip_reason (no vector is made
    # up). What Spark NLP's annotators make of that annotation:
    odd_in = spark.createDataFrame(
        [(1, "Pt \u200b stable today."), (2, "\u200b first then words.")], "id long, text string"
    )
    odd = Pipeline(stages=front + [bb]).fit(odd_in).transform(odd_in)
    uncovered = {
        "bb": [
            [(a.result, len(a.embeddings), a.metadata.get("skip_reason")) for a in r["bb"]]
            for r in sorted(odd.collect(), key=lambda r: r["id"])
        ]
    }
    for name, stage, col in (
        ("SentenceEmbeddings", SentenceEmbeddings().setInputCols(["sentence", "bb"]).setOutputCol("s"), "s"),
        ("EmbeddingsFinisher", EmbeddingsFinisher().setInputCols(["bb"]).setOutputCols(["v"]), "v"),
    ):
        try:
            got = sorted(stage.transform(odd).select("id", col).collect(), key=lambda r: r["id"])
            uncovered[name] = [[len(a.embeddings) if hasattr(a, "embeddings") else len(a) for a in r[col]] for r in got]
        except Exception as e:  # noqa: BLE001
            uncovered[name] = one_line(e)
    # ... and with keepTokensWithoutVector=False, which leaves such tokens out of our column for them.
    try:
        left_out = bb.copy().setKeepTokensWithoutVector(False)
        pooled = (
            Pipeline(stages=front + [left_out])
            .fit(odd_in)
            .transform(odd_in)
            .transform(SentenceEmbeddings().setInputCols(["sentence", "bb"]).setOutputCol("s").transform)
        )
        got = sorted(pooled.select("id", "bb", "s").collect(), key=lambda r: r["id"])
        uncovered["left_out"] = {
            "bb": [[(a.result, len(a.embeddings)) for a in r["bb"]] for r in got],
            "SentenceEmbeddings": [[len(a.embeddings) for a in r["s"]] for r in got],
            "max_pool_diff": pooling_diff(got, "bb", "s"),
        }
    except Exception as e:  # noqa: BLE001
        uncovered["left_out"] = one_line(e)
    result["uncovered_token"] = uncovered

    # Spark NLP's LightPipeline over a PipelineModel holding our stages.
    from sparknlp.base import LightPipeline

    try:
        light = LightPipeline(model)
        result["light_pipeline"] = {"annotate": light.annotate(notes[0]["text"])}
    except Exception as e:  # noqa: BLE001
        result["light_pipeline_error"] = {"type": type(e).__name__, "message": str(e)}
    jvm_only = PipelineModel(stages=model.stages[:3])
    result["light_pipeline_front"] = {k: len(v) for k, v in LightPipeline(jvm_only).annotate(notes[0]["text"]).items()}

    result["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["total_s"] = time.perf_counter() - t0
    spark.stop()
    (out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
