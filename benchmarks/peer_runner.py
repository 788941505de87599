"""Spark NLP's side of the peer benchmark (benchmarks/peer.py), run by the `.venv-sparknlp-jvm` Python (pyspark 3.5
+ spark-nlp 5.5.3, Spark NLP's JAR on spark.jars). It reuses sparknlp_runner.py's session and pipeline and never
imports clinlong. Input: one JSON spec; output: result.json (and vectors.npz for the comparison run) in spec["out"].

Each timed run transforms every note and collects, per note, only the begins and sentence indexes of its tokens
and of its vectors (a few integers per token), from which coverage is counted after the clock stops. The
executor's memory is sampled (the JVM and any child process, summed) and its peak reset at each run's start.
No note text is printed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(pid))
    return tree


class TreeMemory:
    """Peak of the summed RSS of a process and all its descendants (Spark's local executor: the JVM and the
    Python workers it forks), sampled every `interval` seconds; `reset()` starts a new peak."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.peak_mb = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def reset(self) -> None:
        self.peak_mb = self.sample_mb()

    def sample_mb(self) -> float:
        tree, total, todo = _children(), 0, [self.pid]
        while todo:
            pid = todo.pop()
            total += _rss_kb(pid)
            todo.extend(tree.get(pid, ()))
        return total / 1024

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.sample_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def coverage(rows, n_notes: int) -> dict:
    """Counts from the output: rows are (id, token begins, token sentences, vector begins, vector sentences).
    A token without a vector is `truncated` when it lies after the last token with a vector in its sentence
    (the tail Spark NLP cuts at maxSentenceLength pieces), else `other`."""
    tokens = vectors = truncated = other = notes_without_vector = sentences_cut = 0
    for _, t_begin, t_sent, v_begin, v_sent in rows:
        tokens += len(t_begin)
        vectors += len(v_begin)
        notes_without_vector += len(t_begin) > 0 and len(v_begin) == 0
        have = set(zip(v_sent, v_begin))
        last: dict[int, int] = {}
        for s, b in have:
            last[s] = max(last.get(s, -1), b)
        cut = set()
        for b, s in zip(t_begin, t_sent):
            if (s, b) in have:
                continue
            if s in last and b > last[s]:
                truncated += 1
                cut.add(s)
            else:
                other += 1
        sentences_cut += len(cut)
    return {
        "notes_in": n_notes,
        "notes_out": len(rows),
        "notes_dropped": n_notes - len(rows),
        "notes_without_any_vector": notes_without_vector,
        "tokens": tokens,
        "tokens_with_vector": vectors,
        "tokens_without_vector": tokens - vectors,
        "tokens_truncated": truncated,
        "tokens_without_vector_other": other,
        "sentences_truncated": sentences_cut,
    }


def main(spec_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pyspark.ml import Pipeline
    from sparknlp_runner import _Shift, configure, embed, jvm_pieces, pipeline_stages, session  # noqa: PLC2701

    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"runs": []}
    t0 = time.perf_counter()
    spark = session(spec)
    import sparknlp
    from sparknlp.annotator import LongformerEmbeddings

    result["versions"] = {
        "spark": spark.version,
        "sparknlp": sparknlp.version(),
        "tensorflow": spark._jvm.org.tensorflow.TensorFlow.version(),
    }
    result["startup_s"] = round(time.perf_counter() - t0, 2)
    notes = [(int(n["id"]), n["text"]) for n in map(json.loads, Path(spec["notes"]).read_text().splitlines())]
    t = time.perf_counter()
    model = (
        LongformerEmbeddings.loadSavedModel(spec["model"], spark)
        .setInputCols(["sentence", "token"])
        .setOutputCol("embeddings")
    )
    result["load_s"] = round(time.perf_counter() - t, 2)
    result["defaults"] = {
        "batchSize": model.getBatchSize(),
        "maxSentenceLength": model.getMaxSentenceLength(),
        "caseSensitive": model.getCaseSensitive(),
    }
    df = spark.createDataFrame(notes, "id long, text string").repartition(spec["partitions"]).cache()
    df.count()
    fitted = Pipeline(stages=pipeline_stages(model)).fit(df)
    warm = spark.createDataFrame(notes[:1], "id long, text string")
    fitted.transform(warm).selectExpr("size(embeddings)").collect()  # the session's first call, untimed
    runs = list(spec["runs"])
    with TreeMemory(spark.sparkContext._gateway.proc.pid) as mem:
        while runs:
            run = runs.pop(0)
            if run.get("batch_size") == "best":  # the fastest batch size of the runs before it
                run = {**run, "batch_size": min(result["runs"], key=lambda r: r["seconds"])["batch_size_used"]}
            model = configure(model, run)  # only batch_size / max_sentence_length the run names
            fitted = Pipeline(stages=pipeline_stages(model)).fit(df)
            mem.reset()
            start = time.perf_counter()
            rows = (
                fitted.transform(df)
                .selectExpr(
                    "id",
                    "transform(token, t -> t.begin)",
                    "transform(token, t -> int(t.metadata['sentence']))",
                    "transform(embeddings, e -> e.begin)",
                    "transform(embeddings, e -> int(e.metadata['sentence']))",
                )
                .collect()
            )
            seconds = time.perf_counter() - start
            result["runs"].append(
                {
                    **run,
                    "seconds": round(seconds, 3),
                    "peak_rss_mb": round(mem.peak_mb, 1),
                    "batch_size_used": model.getBatchSize(),
                    "max_sentence_length_used": model.getMaxSentenceLength(),
                    "coverage": coverage([tuple(r) for r in rows], len(notes)),
                }
            )
            print(f"spark nlp {run['tag']}: {seconds:.1f} s", file=sys.stderr, flush=True)
            (out_dir / "partial.json").write_text(json.dumps(result))  # what a run cut short still leaves
    if spec.get("compare"):  # untimed: vectors and pieces for the comparison with our sentence context
        import numpy as np

        cmp = spec["compare"]
        cnotes = [(int(n["id"]), n["text"]) for n in map(json.loads, Path(cmp["notes"]).read_text().splitlines())]
        model = configure(model, cmp)
        vectors: dict = {}
        out = embed(spark, model, cnotes, {**spec, **cmp, "timing_only": False}, "compare", result, vectors)
        result["compare"]["max_sentence_length"] = model.getMaxSentenceLength()
        jrows = sorted(out.select("id", "sentence", "token")._jdf.collectAsList(), key=lambda r: r.getLong(0))
        # Pieces as Spark NLP's tokenizer cuts them at its longest maxSentenceLength (4,096), so a sentence's
        # length past the run's 1,024 shows.
        result["compare"]["pieces"] = jvm_pieces(spark, model.setMaxSentenceLength(4096), [_Shift(r) for r in jrows])
        np.savez(out_dir / "vectors.npz", **vectors)
    spark.stop()
    (out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
