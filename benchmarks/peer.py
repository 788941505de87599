"""The peer benchmark (issue 20, point 4): Spark NLP's own LongformerEmbeddings pipeline beside our job.

One run, the same notes, the same checkpoint, the same cores: Spark NLP 5.5.3's JVM (benchmarks/sparknlp_jvm.py,
its own venv) runs the `clinical_longformer` card's pipeline (DocumentAssembler -> SentenceDetector -> Tokenizer ->
LongformerEmbeddings.loadSavedModel(our --format sparknlp export)) at its defaults (batchSize 4,
maxSentenceLength 1,024) and at each batch size of a sweep; our job runs at token granularity in sentence and in
note context. Reported per row: wall seconds, BPE tokens/s (the same count for every row: the notes' pieces by the
checkpoint's tokenizer, <s> and </s> included), the ratio to Spark NLP at its defaults, the peak RSS of the
executor (local mode: the JVM and its Python workers, sampled), and coverage read from the output: Spark NLP's
tokens without a vector and how many of those it truncated (the tail of a sentence past maxSentenceLength
pieces), notes it returned no vector for or dropped; our tokens with a null vector, notes in the errors table.
Vectors are compared with ours at sentence context only where both sides ran a sentence on the same pieces.

The notes are the benchmark's MIMIC-III-like mix plus a note longer than 4,096 pieces and a lab dump whose one
sentence is longer than Spark NLP's default maxSentenceLength (1,024 pieces). `--quick` runs the tiny synthetic
checkpoint with its embedding matrix grown to the real 50,265 rows (Spark NLP's load-time warm-up reads ids up to
42,752) on a handful of notes; the full run uses the base-size checkpoint (the real Clinical-Longformer
dimensions). The Spark NLP exports are cached under ~/.cache/clinlong/sparknlp-jvm keyed by checkpoint and exporter.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clinlong.benchmarks.inputs import ensure_artifact, native_artifact
from clinlong.benchmarks.sparknlp_jvm import sparknlp_export, wide_checkpoint

log = logging.getLogger("clinlong.benchmarks")

ROOT = Path(__file__).resolve().parents[1]
PEER_RUNNER = Path(__file__).with_name("peer_runner.py")
DEFAULT_MAX_SENTENCE = 1024  # Spark NLP's LongformerEmbeddings default maxSentenceLength
DEFAULT_BATCH = 4  # and batchSize


LAB_NAMES = [
    "WBC",
    "RBC",
    "Hgb",
    "Hct",
    "MCV",
    "MCH",
    "MCHC",
    "RDW",
    "Plt",
    "Glucose",
    "UreaN",
    "Creat",
    "Na",
    "K",
    "Cl",
    "HCO3",
    "AnGap",
    "ALT",
    "AST",
    "AlkPhos",
    "TotBili",
    "Albumin",
    "Calcium",
    "Phos",
    "Mg",
]


def lab_dump(seed: int, lines: int) -> str:
    """A MIMIC-style lab listing pasted as one run-on line (no sentence punctuation): one sentence of well over
    1,024 pieces."""
    import random

    rng = random.Random(seed)
    parts = []
    for i in range(lines):
        parts.append(
            f"{rng.randint(1, 12):02d} {rng.randint(0, 59):02d} AM BLOOD "
            + " ".join(f"{name} {rng.randint(1, 300)}" for name in LAB_NAMES)
        )
    return " ".join(parts) + "\n\nSee flowsheet for trends.\n"


def peer_notes(work: Path, ckpt: Path, quick: bool) -> tuple[Path, Path, dict]:
    """The benchmark's MIMIC-III-like mix (benchmarks/inputs.py write_notes: discharge summaries and short notes
    of the other categories, shuffled) with at least one note longer than 4,096 pieces and lab dumps whose one
    sentence is longer than 1,024 pieces. Written as Parquet (our job) and JSON lines (Spark NLP); stats are
    counted with the checkpoint's tokenizer."""
    import random

    import pandas as pd
    from transformers import AutoTokenizer

    from clinlong.export.synthetic_notes import generate_notes

    n, n_long, n_labs = (6, 1, 1) if quick else (40, 8, 2)
    tok = AutoTokenizer.from_pretrained(str(ckpt), model_max_length=10**9)  # counting only: no length warning
    pool = generate_notes(20 * n, seed=7)
    longs = [x for x in pool if x.category == "Discharge summary" and len(x.text) > 9000]
    longs.sort(key=lambda x: -len(tok(x.text)["input_ids"]))  # the longest first: > 4,096 pieces
    shorts = [x for x in pool if x.category != "Discharge summary"][: n - n_long - n_labs]
    notes = [(x.row_id, x.category, x.text) for x in longs[:n_long] + shorts]
    notes += [(900_000 + i, "Lab", lab_dump(i, 16)) for i in range(n_labs)]
    random.Random(0).shuffle(notes)
    pieces = [len(tok(t)["input_ids"]) for _, _, t in notes]
    work.mkdir(parents=True, exist_ok=True)
    tag = "quick" if quick else "full"
    parquet, jsonl = work / f"peer-notes-{tag}.parquet", work / f"peer-notes-{tag}.jsonl"
    pd.DataFrame(
        {"ROW_ID": [i for i, _, _ in notes], "CATEGORY": [c for _, c, _ in notes], "TEXT": [t for _, _, t in notes]}
    ).to_parquet(parquet)
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, _, t in notes))
    stats = {
        "notes": len(notes),
        "bpe_tokens": sum(pieces),
        "longest_note_pieces": max(pieces),
        "notes_over_4096_pieces": sum(p - 2 > 4096 for p in pieces),
        "lab_dump_notes": n_labs,
    }
    return parquet, jsonl, stats


def _jvm_env(py: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_HOME")}
    env.update(PYSPARK_PYTHON=str(py), PYSPARK_DRIVER_PYTHON=str(py), TF_CPP_MIN_LOG_LEVEL="3")
    return env


def run_sparknlp(
    export: Path,
    notes: Path,
    out: Path,
    cores: int,
    batch_sizes: list[int],
    compare_notes: Path | None,
    timeout: float = 3600,
) -> dict:
    """Spark NLP's pipeline over the notes in one JVM: at its defaults (nothing set: the batchSize and
    maxSentenceLength the loaded model reports), at each other batch size of the sweep (maxSentenceLength 1,024),
    then the card's maxSentenceLength 4,096 at the fastest batch size; then, untimed, vectors and pieces for
    the comparison (defaults)."""
    runs = [{"tag": "defaults"}]
    runs += [{"tag": f"batch{b}", "batch_size": b, "max_sentence_length": DEFAULT_MAX_SENTENCE} for b in batch_sizes]
    runs += [{"tag": "card4096", "batch_size": "best", "max_sentence_length": 4096}]
    cmp = {"notes": str(compare_notes), "partitions": cores} if compare_notes else None
    result = _jvm(export, notes, out, cores, runs, cmp, timeout)
    default_batch = result["defaults"]["batchSize"]
    result["runs"] = [
        r
        for r in result["runs"]
        if r["tag"] == "defaults" or r["batch_size"] != default_batch or r["tag"] == "card4096"
    ]  # a sweep point equal to the defaults is the defaults row
    return result


def _jvm(export: Path, notes: Path, out: Path, cores: int, runs: list, compare: dict | None, timeout: float) -> dict:
    from clinlong.benchmarks import sparknlp_jvm

    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": str(export),
        "notes": str(notes),
        "runs": runs,
        "partitions": cores,
        "master": f"local[{cores}]",
        "classpath": sparknlp_jvm.classpath(),
        "out": str(out),
        **({"compare": compare} if compare else {}),
    }
    (out / "spec.json").write_text(json.dumps(spec))
    py = sparknlp_jvm.python()
    proc = subprocess.run(
        [str(py), str(PEER_RUNNER), str(out / "spec.json")],
        capture_output=True,
        text=True,
        env=_jvm_env(py),
        timeout=timeout,
        cwd=out,
    )
    if proc.returncode != 0 or not (out / "result.json").exists():
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith("at ")][-15:]
        raise RuntimeError(f"Spark NLP's peer run failed (rc {proc.returncode}):\n" + "\n".join(tail))
    return json.loads((out / "result.json").read_text())


def run_ours(notes: Path, art: Path, out: Path, cores: int, context: str) -> dict:
    """Our job at token granularity, fp32, in a fresh Python process and JVM (so the executor's memory is this
    run's): wall seconds of the job, peak executor RSS (JVM and Python workers, sampled), coverage."""
    spec = {"notes": str(notes), "model": str(art), "out": str(out), "cores": cores, "context": context}
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "clinlong.benchmarks.peer", "--ours", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"our job ({context} context) failed: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ours_main(spec: dict) -> dict:
    from clinlong.benchmarks.inputs import local_spark
    from clinlong.benchmarks.peer_runner import TreeMemory
    from clinlong.pipelines.core.engine import EmbedOptions
    from clinlong.pipelines.delta.sink import read_table
    from clinlong.pipelines.jobs.embed_notes import JobConfig, run

    spark = local_spark(spec["cores"])
    try:
        with TreeMemory(spark.sparkContext._gateway.proc.pid) as mem:
            mem.reset()
            start = time.perf_counter()
            summary = run(
                JobConfig(
                    notes=spec["notes"],
                    model=spec["model"],
                    out=spec["out"],
                    mode="overwrite",
                    granularity="token",
                    run_id=f"peer-{time.time_ns()}",
                    partitions=spec["cores"],
                    options=EmbedOptions(precision="fp32", context=spec["context"]),
                ),
                spark,
            )
            seconds = time.perf_counter() - start
            peak = mem.peak_mb
    finally:
        spark.stop()
    table = read_table(spec["out"], ["note_id", "embedding"])
    nulls = table.column("embedding").null_count
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(peak, 1),
        "summary_seconds": summary["seconds"],
        "coverage": {
            "notes_in": summary["rows_in"],
            "notes_embedded": summary["embedded"],
            "notes_dropped": summary["rows_in"] - summary["embedded"],
            "errors": summary["errors"],
            "tokens": table.num_rows,
            "tokens_with_vector": table.num_rows - nulls,
            "tokens_without_vector": nulls,
            "warnings": summary["warnings"],
        },
        "bpe_tokens": summary["bpe_tokens"],
        "windows": summary["windows"],
    }


def compare_sentence_vectors(compare: dict, vectors: dict, texts: dict, ckpt: Path, table: Path) -> dict:
    """Spark NLP's token vectors against ours at sentence context, where both ran a sentence on the same pieces:
    the sentence spans agree and Spark NLP's piece ids for it (read from its JVM) equal the checkpoint
    tokenizer's ids of the sentence's text. Counted from the data; nothing is compared elsewhere."""
    from transformers import AutoTokenizer

    from clinlong.pipelines.core.text import detect_sentences
    from clinlong.pipelines.delta.sink import read_table

    tok = AutoTokenizer.from_pretrained(str(ckpt), model_max_length=10**9)
    ours = read_table(str(table), ["note_id", "begin", "embedding"]).to_pandas()
    ours_by = {(int(r.note_id), int(r.begin)): r.embedding for r in ours.itertuples() if r.embedding is not None}
    sentences = agree = compared = 0
    worst_diff, worst_cos = 0.0, 1.0
    for i, note_id in enumerate(compare["ids"]):
        text = texts[note_id]
        our_spans = set(detect_sentences(text))
        embs = compare["embeddings"][i]
        for s, (ids, _) in enumerate(compare["pieces"][i]):
            sentences += 1
            span = next(((b, e) for b, e, _, idx in compare["sentences"][i] if idx == s), None)
            if span is None or span not in our_spans:
                continue
            if (
                ids != tok(text[span[0] : span[1] + 1], add_special_tokens=False)["input_ids"]
                or len(ids) > compare["max_sentence_length"] - 2
            ):
                continue
            agree += 1
            for k, (begin, _, _, sent, _) in enumerate(embs):
                if sent != s or (note_id, begin) not in ours_by:
                    continue
                got, want = vectors[f"compare_{i}"][k], np.asarray(ours_by[(note_id, begin)], np.float32)
                worst_diff = max(worst_diff, float(np.abs(got - want).max()))
                worst_cos = min(worst_cos, float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)))
                compared += 1
    return {
        "sentences": sentences,
        "sentences_same_pieces": agree,
        "token_vectors_compared": compared,
        "max_abs_diff": round(worst_diff, 8) if compared else None,
        "min_cosine": round(worst_cos, 8) if compared else None,
    }


def unavailable() -> str | None:
    """One line saying why Spark NLP's JVM cannot run here, or None."""
    from clinlong.benchmarks.sparknlp_jvm import unavailable_reason

    return unavailable_reason()


def peer_benchmark(work: Path, quick: bool, cores: int, batch_sizes: list[int] | None = None) -> dict:
    """The peer rows, in one run. Raises RuntimeError where a side fails; the caller checks `unavailable()` first."""
    started = time.perf_counter()
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if quick:
        ckpt = wide_checkpoint(work / "checkpoint-tiny-wide")
        art, label = native_artifact(ckpt, work / "artifact-tiny-wide", "synthetic-longformer-tiny-wide"), "tiny-wide"
    else:
        (ckpt, art), label = ensure_artifact(work), "base"
    export = sparknlp_export(ckpt, label)
    setup_s = time.perf_counter() - started
    parquet, jsonl, stats = peer_notes(work, ckpt, quick)
    batch_sizes = batch_sizes or ([4] if quick else [4, 16])  # beside the defaults (the loaded model's: 8)
    # The comparison run: every note with --quick; else the short notes (its vectors cross py4j, untimed).
    compare = jsonl
    if not quick:
        lines = [ln for ln in jsonl.read_text().splitlines() if len(json.loads(ln)["text"]) < 3000][:8]
        compare = work / "peer-compare.jsonl"
        compare.write_text("".join(ln + "\n" for ln in lines))
    log.info(
        "peer: Spark NLP's pipeline (%d notes, %d BPE tokens), batch sizes %s",
        stats["notes"],
        stats["bpe_tokens"],
        batch_sizes,
    )
    snlp = run_sparknlp(export, jsonl, work / "peer-sparknlp", cores, batch_sizes, compare)
    ours = {}
    for context in ("sentence", "note"):
        log.info("peer: our job, token granularity, %s context, fp32", context)
        ours[context] = run_ours(parquet, art, work / f"peer-ours-{context}", cores, context)
    texts = {json.loads(ln)["id"]: json.loads(ln)["text"] for ln in compare.read_text().splitlines()}
    vectors = dict(np.load(work / "peer-sparknlp" / "vectors.npz"))
    equal = compare_sentence_vectors(snlp["compare"], vectors, texts, ckpt, work / "peer-ours-sentence")
    max_pieces = max((len(ids) for note in snlp["compare"]["pieces"] for ids, _ in note), default=0)

    tokens = stats["bpe_tokens"]
    rows = []
    for r in snlp["runs"]:
        name = (
            f"sparknlp_defaults_batch{r['batch_size_used']}"
            if r["tag"] == "defaults"
            else f"sparknlp_card_maxlen4096_batch{r['batch_size_used']}"
            if r["tag"] == "card4096"
            else f"sparknlp_batch{r['batch_size_used']}"
        )
        rows.append(
            {
                "name": name,
                "side": "sparknlp",
                "batch_size": r["batch_size_used"],
                "max_sentence_length": r["max_sentence_length_used"],
                "wall_s": r["seconds"],
                "peak_rss_mb_per_executor": r["peak_rss_mb"],
                "coverage": r["coverage"],
            }
        )
    sweep = [r for r in rows if r["max_sentence_length"] == DEFAULT_MAX_SENTENCE]
    best = min(sweep, key=lambda r: r["wall_s"])
    best["best_batch_size"] = True
    for context in ("sentence", "note"):
        o = ours[context]
        rows.append(
            {
                "name": f"ours_job_token_{context}_context_fp32",
                "side": "ours",
                "context": context,
                "wall_s": o["seconds"],
                "peak_rss_mb_per_executor": o["peak_rss_mb"],
                "coverage": o["coverage"],
                "windows": o["windows"],
            }
        )
    defaults = rows[0]
    for r in rows:
        r["tokens_per_s"] = round(tokens / r["wall_s"], 1)
        r["x_sparknlp_defaults"] = round(defaults["wall_s"] / r["wall_s"], 2)
        r["x_sparknlp_best"] = round(best["wall_s"] / r["wall_s"], 2)
    return {
        "quick": quick,
        "checkpoint": label,
        "cores": cores,
        "notes": stats,
        "bpe_tokens": tokens,
        "sparknlp": {
            "versions": snlp["versions"],
            "defaults_read_from_model": snlp["defaults"],
            "load_s": snlp["load_s"],
            "startup_s": snlp["startup_s"],
            "best_batch_size": best["batch_size"],
            "batch_sizes": batch_sizes,
            "max_sentence_pieces_seen": max_pieces,
        },
        "rows": rows,
        "sentence_context_vectors_vs_sparknlp": equal,
        "seconds": {"setup": round(setup_s, 1), "peer": round(time.perf_counter() - started - setup_s, 1)},
    }


def format_peer(p: dict) -> str:
    lines = [
        f"peer benchmark ({p['checkpoint']} checkpoint, {p['notes']['notes']} notes, {p['bpe_tokens']} "
        f"BPE tokens, {p['notes']['notes_over_4096_pieces']} over 4,096 pieces, "
        f"{p['notes']['lab_dump_notes']} lab dumps; "
        f"local[{p['cores']}], fp32; Spark NLP {p['sparknlp']['versions']['sparknlp']}, "
        f"TF {p['sparknlp']['versions']['tensorflow']}):",
        f"{'row':<40} {'wall s':>7} {'tok/s':>7} {'x def':>6} {'x best':>6} {'RSS MB':>7} "
        f"{'no vec':>6} {'trunc':>6} {'dropped':>7}",
    ]
    for r in p["rows"]:
        c = r["coverage"]
        trunc = c.get("tokens_truncated", "")
        dropped = c["notes_dropped"] + c.get("notes_without_any_vector", 0)
        lines.append(
            f"{r['name'] + (' (best)' if r.get('best_batch_size') else ''):<40} {r['wall_s']:>7.1f} "
            f"{r['tokens_per_s']:>7.0f} {r['x_sparknlp_defaults']:>6.2f} {r['x_sparknlp_best']:>6.2f} "
            f"{r['peak_rss_mb_per_executor']:>7.0f} {c['tokens_without_vector']:>6} {trunc!s:>6} {dropped:>7}"
        )
    e = p["sentence_context_vectors_vs_sparknlp"]
    if e["token_vectors_compared"]:
        compared = (
            f"{e['token_vectors_compared']} token vectors compared, max |diff| {e['max_abs_diff']:.2e}, "
            f"min cosine {e['min_cosine']:.7f}"
        )
    else:
        compared = (
            "vectors not compared (Spark NLP BPE-encodes each of its tokens alone and prefixes its first "
            "piece with the space mark, so its sentences' pieces differ)"
        )
    lines.append(
        f"sentence context vs Spark NLP: {e['sentences_same_pieces']} of {e['sentences']} sentences on the "
        f"same pieces; {compared}"
    )
    lines.append(
        "tok/s: the notes' BPE tokens (checkpoint tokenizer, <s> and </s> included; the same count for every "
        "row) per wall second; x def / x best: against Spark NLP at its defaults / at its fastest batch size; "
        "RSS: sampled peak of the local executor (JVM and Python workers); no vec: tokens without a vector "
        "(each side's own tokens); trunc: Spark NLP's tokens past maxSentenceLength pieces; dropped: notes "
        "missing or without any vector"
    )
    lines.append(
        f"Spark NLP: defaults read from the model {p['sparknlp']['defaults_read_from_model']}, model load "
        f"{p['sparknlp']['load_s']} s (outside its rows' wall time), longest sentence it saw "
        f"{p['sparknlp']['max_sentence_pieces_seen']} pieces"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m clinlong.benchmarks.peer", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--work", default="work/bench")
    p.add_argument(
        "--batch-sizes",
        help="Spark NLP batch sizes swept at maxSentenceLength 1,024 beside its defaults "
        "(default: 4 with --quick, else 4,16)",
    )
    p.add_argument("--ours", help=argparse.SUPPRESS)  # internal: one job run in a fresh process (run_ours)
    args = p.parse_args(argv)
    if args.ours:
        print(json.dumps(_ours_main(json.loads(args.ours))))
        return 0
    from clinlong.pipelines.core.logs import configure

    configure()
    reason = unavailable()
    if reason:
        print(f"peer benchmark skipped: Spark NLP's JVM: {reason}")
        return 0 if not os.environ.get("CI") else 1
    result = peer_benchmark(
        Path(args.work),
        args.quick,
        os.cpu_count() or 1,
        [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(format_peer(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
