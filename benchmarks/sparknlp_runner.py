"""Spark NLP's side of the side-by-side runs, executed by the `.venv-sparknlp-jvm` Python (pyspark 3.5 +
spark-nlp 5.5.3, Spark NLP's JAR on spark.jars); benchmarks/sparknlp_jvm.py starts it. It never imports
clinlong (not installed there). Input: one JSON spec file; output: result.json and vectors.npz in spec["out"].

The pipeline is the one on Spark NLP's `clinical_longformer` card: DocumentAssembler -> SentenceDetector ->
Tokenizer -> LongformerEmbeddings, loaded from our export with `LongformerEmbeddings.loadSavedModel`.
With "pieces", the BPE pieces each sentence was run on are read from Spark NLP's own tokenizer
(`LongformerEmbeddings.tokenizeWithAlignment` over its `TokenizedWithSentence`), so a reference can run on
exactly the same ids.
"""

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def session(spec):
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master(spec.get("master", "local[2]"))
        .appName("clinlong-sparknlp-jvm")
        .config("spark.jars", ",".join(spec["classpath"]))
        .config("spark.driver.memory", spec.get("driver_memory", "4g"))
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.serializer", "org.apache.spark.serializer.KryoSerializer")
        .config("spark.kryoserializer.buffer.max", "2000M")
    )
    if spec.get("cache_pretrained"):
        builder = builder.config("spark.jsl.settings.pretrained.cache_folder", spec["cache_pretrained"])
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def pipeline_stages(embeddings):
    from sparknlp.annotator import SentenceDetector, Tokenizer
    from sparknlp.base import DocumentAssembler

    return [
        DocumentAssembler().setInputCol("text").setOutputCol("document"),
        SentenceDetector().setInputCols(["document"]).setOutputCol("sentence"),
        Tokenizer().setInputCols(["sentence"]).setOutputCol("token"),
        embeddings,
    ]


def configure(embeddings, spec):
    embeddings = embeddings.setInputCols(["sentence", "token"]).setOutputCol("embeddings")
    if "case_sensitive" in spec:
        embeddings = embeddings.setCaseSensitive(spec["case_sensitive"])
    if "max_sentence_length" in spec:
        embeddings = embeddings.setMaxSentenceLength(spec["max_sentence_length"])
    if "batch_size" in spec:
        embeddings = embeddings.setBatchSize(spec["batch_size"])
    return embeddings


def jvm_pieces(spark, model, rows):
    """Per note, per sentence: (piece ids, piece begins) as Spark NLP's own tokenizer produced them."""
    jvm = spark._jvm
    convert = jvm.scala.collection.JavaConverters
    annotation = jvm.com.johnsnowlabs.nlp.Annotation
    unpack = jvm.com.johnsnowlabs.nlp.annotators.common.TokenizedWithSentence.unpack
    out = []
    for row in rows:
        annotations = jvm.java.util.ArrayList()
        for col in (0, 1):
            seq = row.getSeq(col)
            for k in range(seq.length()):
                annotations.add(annotation.apply(seq.apply(k)))
        tokenized = unpack(convert.asScalaBufferConverter(annotations).asScala().toSeq())
        sentences = model._java_obj.tokenizeWithAlignment(tokenized)
        note = []
        for j in range(sentences.length()):
            pieces = list(sentences.apply(j).tokens())
            note.append([[p.pieceId() for p in pieces], [p.begin() for p in pieces]])
        out.append(note)
    return out


def annotations(rows, col):
    return [[[a.begin, a.end, a.result, int(a.metadata.get("sentence", "0"))] for a in row[col]] for row in rows]


def embed(spark, model, notes, spec, tag, result, vectors):
    from pyspark.ml import Pipeline

    df = spark.createDataFrame(notes, "id long, text string").repartition(spec.get("partitions", 2))
    fitted = Pipeline(stages=pipeline_stages(model)).fit(df)
    start = time.perf_counter()
    out = fitted.transform(df).select("id", "sentence", "token", "embeddings")
    if spec.get("timing_only"):
        counts = (
            out.selectExpr("size(token) as t", "size(embeddings) as e", "size(sentence) as s")
            .groupBy()
            .sum()
            .collect()[0]
        )
        result[tag] = {
            "seconds": time.perf_counter() - start,
            "tokens": counts[0],
            "vectors": counts[1],
            "sentences": counts[2],
            "notes": len(notes),
        }
        return None
    rows = sorted(out.collect(), key=lambda r: r["id"])
    seconds = time.perf_counter() - start
    result[tag] = {
        "seconds": seconds,
        "ids": [r["id"] for r in rows],
        "sentences": annotations(rows, "sentence"),
        "tokens": annotations(rows, "token"),
        "embeddings": [
            [
                [a.begin, a.end, a.result, int(a.metadata["sentence"]), int(a.metadata["pieceId"])]
                for a in r["embeddings"]
            ]
            for r in rows
        ],
        "storage_ref": json.loads(out.schema["embeddings"].json())["metadata"],
    }
    for i, r in enumerate(rows):
        vecs = r["embeddings"]
        vectors[f"{tag}_{i}"] = np.array([a.embeddings for a in vecs], np.float32).reshape(len(vecs), -1)
    return out


def blocked(error):
    """One line for a JVM failure; a missing TF-Java method names the runtime Spark NLP 5.5.3 was built on."""
    text = str(error)
    line = next((ln.strip() for ln in text.splitlines() if "Error" in ln or "Exception" in ln), text[:200])
    if "NoSuchMethodError" in line and "org.tensorflow" in line:
        return (
            f"{line.lstrip(': ')} - Spark NLP 5.5.3 is built on TF-Java 0.4 (TF 2.7; JSL's "
            "tensorflow-cpu_2.12:0.4.4, here org.tensorflow:tensorflow-core-api:0.4.2): the class path has another"
        )
    return line


def jvm_peak_rss_mb(spark):
    """VmHWM of the JVM (driver and, in local mode, the executors), read while it still runs."""
    proc = getattr(spark.sparkContext._gateway, "proc", None)
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (AttributeError, OSError):
        return None


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    result, vectors = {}, {}
    start = time.perf_counter()
    spark = session(spec)
    import sparknlp
    from sparknlp.annotator import LongformerEmbeddings

    result["versions"] = {
        "spark": spark.version,
        "sparknlp": sparknlp.version(),
        "tensorflow": spark._jvm.org.tensorflow.TensorFlow.version(),
    }
    result["startup_s"] = time.perf_counter() - start
    notes = [(int(n["id"]), n["text"]) for n in map(json.loads, Path(spec["notes"]).read_text().splitlines())]
    t = time.perf_counter()
    model = configure(LongformerEmbeddings.loadSavedModel(spec["model"], spark), spec)
    result["load_s"] = time.perf_counter() - t
    for run in spec.get("runs", [{"tag": "run"}]):
        model = configure(model, {**spec, **run})
        out = embed(spark, model, notes, {**spec, **run}, run["tag"], result, vectors)
        if spec.get("pieces") and out is not None and "pieces" not in result:
            rows = sorted(out.select("id", "sentence", "token").collect(), key=lambda r: r["id"])
            jrows = sorted(out.select("id", "sentence", "token")._jdf.collectAsList(), key=lambda r: r.getLong(0))
            result["pieces"] = jvm_pieces(spark, model, [_Shift(r) for r in jrows])
            assert [r["id"] for r in rows] == result[run["tag"]]["ids"]
    if spec.get("save_to"):
        model.write().overwrite().save(spec["save_to"])
        result["saved"] = sorted(p.name for p in Path(spec["save_to"]).iterdir())
        try:
            reloaded = configure(LongformerEmbeddings.load(spec["save_to"]), spec)
            embed(spark, reloaded, notes, spec, "reloaded", result, vectors)
        except Exception as e:  # noqa: BLE001 - recorded in one line, the caller decides
            result["reloaded_blocked"] = blocked(e)
    if spec.get("pretrained_name"):  # the card's snippet, served from Spark NLP's pretrained cache folder
        name, lang = spec["pretrained_name"], spec.get("pretrained_lang", "en")
        result["pretrained_cache"] = cache_pretrained(spark, model, name, lang)
        card = (
            LongformerEmbeddings.pretrained(name, lang)
            .setInputCols(["sentence", "token"])
            .setOutputCol("embeddings")
            .setCaseSensitive(True)
            .setMaxSentenceLength(4096)
        )
        embed(spark, card, notes, spec, "pretrained", result, vectors)
        result["pretrained_cache"]["s3_client_created"] = _s3_client_created()
    result["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["jvm_peak_rss_mb"] = jvm_peak_rss_mb(spark)
    spark.stop()
    np.savez(out_dir / "vectors.npz", **vectors)
    (out_dir / "result.json").write_text(json.dumps(result))


def cache_pretrained(spark, model, name, lang):
    """Put `model` where Spark NLP's ResourceDownloader finds a downloaded `name`/`lang`, and serve it offline.

    Spark NLP's own code names the entry (`ResourceMetadata.fileName`: name_lang_libVersion_sparkVersion_
    epochMillis, `.zip` while zipped), writes the repository line (`ResourceMetadata.addMetadataToFile`) and
    saves the model (`.write().save()`) as the unzipped folder in `spark.jsl.settings.pretrained.cache_folder`.
    Spark NLP 5.5.3's S3ResourceDownloader cannot serve it offline: before it looks into the cache it always
    reads the bucket's metadata.json and asks S3 whether the object exists (bytecode of `download`), and
    no setting moves that endpoint. So the public downloader is replaced by `_CacheOnly`, which reads the
    cache folder's metadata.json instead and hands the rest to Spark NLP's own code: `resolveResource`
    (name, language, versions, newest) and S3ResourceDownloader.downloadAndUnzipFile, which returns the
    cached folder without downloading when it exists. Everything after that (the model reader, TF-Java) is
    what `pretrained()` runs online."""
    from pyspark.java_gateway import ensure_callback_server_started

    jvm = spark._jvm
    pkg = jvm.com.johnsnowlabs.nlp.pretrained
    downloader = pkg.ResourceDownloader
    s3 = downloader.publicDownloader()  # Spark NLP's own, on spark.jsl.settings.pretrained.cache_folder
    cache = Path(s3.cachePath().toString().replace("file:", "", 1))
    resource = pkg.ResourceMetadata.apply(
        name,
        jvm.scala.Some(lang),
        jvm.scala.Some(downloader.libVersion()),
        jvm.scala.Some(downloader.sparkVersion()),
        True,
        jvm.java.sql.Timestamp(int(time.time() * 1000)),
        True,
        jvm.scala.Some("ml"),
        "",
        jvm.scala.Some("LongformerEmbeddings"),
        jvm.scala.Some("tensorflow"),
    )
    folder = cache / resource.fileName()[: -len(".zip")]
    model.write().overwrite().save(str(folder))
    pkg.ResourceMetadata.addMetadataToFile(str(cache / "metadata.json"), resource)
    ensure_callback_server_started(spark.sparkContext._gateway)
    getattr(downloader, "publicDownloader_$eq")(_CacheOnly(spark, s3, cache))
    return {"cache_folder": str(cache), "entry": folder.name, "metadata_json": (cache / "metadata.json").read_text()}


def _s3_client_created():
    """Whether Spark NLP's S3 client (a lazy val of its S3ResourceDownloader) was ever built: False means no
    request to S3 was made by this run."""
    field = _CacheOnly.s3.getClass().getDeclaredField("awsGateway")  # (spark.jars: not on the system loader)
    field.setAccessible(True)
    return field.get(_CacheOnly.s3) is not None


class _CacheOnly:
    """Spark NLP's ResourceDownloader interface, answered from the cache folder (see cache_pretrained)."""

    s3 = None

    class Java:
        implements = ["com.johnsnowlabs.nlp.pretrained.ResourceDownloader"]

    def __init__(self, spark, s3, cache):
        self.jvm, self.cache = spark._jvm, cache
        type(self).s3 = s3

    def downloadMetadataIfNeed(self, folder):
        metadata = self.jvm.com.johnsnowlabs.nlp.pretrained.ResourceMetadata
        return metadata.readResources(str(self.cache / "metadata.json"))

    def _resolve(self, request):
        return self.jvm.com.johnsnowlabs.nlp.pretrained.ResourceMetadata.resolveResource(
            self.downloadMetadataIfNeed(request.folder()), request
        )

    def download(self, request):
        found = self._resolve(request)
        if found.isEmpty():
            return found
        resource = found.get()
        return self.s3.downloadAndUnzipFile(
            self.jvm.org.apache.hadoop.fs.Path(str(self.cache), resource.fileName()), resource, ""
        )

    def getDownloadSize(self, request):
        found = self._resolve(request)
        if found.isEmpty():
            return found
        folder = self.cache / found.get().fileName()[: -len(".zip")]
        size = self.jvm.java.lang.reflect.Array.newInstance(self.jvm.java.lang.Long.TYPE, 1)
        size[0] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        # an Option holding a java.lang.Long (py4j would box a Python int as an Integer)
        return (
            self.jvm.scala.collection.JavaConverters.asScalaBufferConverter(
                self.jvm.java.util.Arrays.stream(size).boxed().collect(self.jvm.java.util.stream.Collectors.toList())
            )
            .asScala()
            .headOption()
        )

    def clearCache(self, request):
        return None

    def downloadAndUnzipFile(self, path, unzip):
        return self.s3.downloadAndUnzipFile(path, unzip)

    def fileSystem(self):
        return self.s3.fileSystem()


class _Shift:
    """A Java Row of (id, sentence, token) seen as (sentence, token)."""

    def __init__(self, row):
        self.row = row

    def getSeq(self, i):
        return self.row.getSeq(i + 1)


if __name__ == "__main__":
    main(sys.argv[1])
