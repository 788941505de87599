"""The fine-tuned heads' throughput against embedding (issue 24's goal: classification and NER within 10% of the
embedding job's tokens/s on the same notes; a head is one matrix product on the encoder's output).

    python -m clinlong.benchmarks.heads [--size tiny|base] [--notes N] [--long N] [--repeat R] [--json OUT]

One run, one local Spark session on every core, the same notes (the CPU benchmark's MIMIC-III-like mix: discharge
summaries over 4,096 pieces and short notes of the other categories): synthetic fine-tuned checkpoints of `size`
(a sequence head, a token head; random weights, the real layouts) are exported once under --work, then the job
runs `--task embed` (note granularity, the default table) and `--task classify` on the sequence head's artifact
(one encoder: the export keeps the fine-tuned encoder) and `--task embed` and `--task ner` on the token head's, each
R times after one untimed run (the Python workers' start and the model loads out of the figure), fp32, into
Delta. Reported: wall seconds (median), BPE tokens/s (the summary's `bpe_tokens` over the wall time) and each
head's ratio to its own artifact's embedding run. Classification runs with global attention on `<s>` (Longformer's
sequence head is trained so), embedding without: the classify ratio includes that cost; the NER ratio is the
head, the tags and the chunks alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

log = logging.getLogger("clinlong.benchmarks")

LABELS = {"sequence": "PNEUMONIA,SEPSIS,CHF,COPD,AKI", "token": "O,B-PROBLEM,I-PROBLEM,B-TREATMENT,I-TREATMENT"}


def head_artifact(work: Path, size: str, kind: str) -> Path:
    """The synthetic fine-tuned checkpoint of `kind` and its export under `work`, built once."""
    from clinlong.benchmarks.inputs import native_artifact
    from clinlong.export.synthetic import write_synthetic_checkpoint

    ckpt, art = work / f"checkpoint-{size}-{kind}", work / f"artifact-{size}-{kind}"
    if not (ckpt / "config.json").exists():
        log.info("writing the %s-size synthetic %s-head checkpoint", size, kind)
        write_synthetic_checkpoint(ckpt, size, 0, "longformer", kind, tuple(LABELS[kind].split(",")))
    return native_artifact(ckpt, art, f"synthetic-longformer-{size}-{kind}")


def heads_benchmark(work: Path, size: str, n_notes: int, long_notes: int, repeat: int) -> dict:
    from clinlong.benchmarks.inputs import local_spark, write_notes
    from clinlong.benchmarks.measure import machine
    from clinlong.pipelines.core.config import JobConfig
    from clinlong.pipelines.core.engine import EmbedOptions
    from clinlong.pipelines.jobs.embed_notes import run

    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    arts = {kind: head_artifact(work, size, kind) for kind in ("sequence", "token")}
    notes, _ = write_notes(work, n_notes, long_notes)
    cores = os.cpu_count() or 1
    spark = local_spark(cores)
    rows: dict[str, dict] = {}
    stamp = time.strftime("%Y%m%d%H%M%S")
    plan = [("sequence", "embed"), ("sequence", "classify"), ("token", "embed"), ("token", "ner")]
    for kind, task in plan:
        seconds, tokens = [], 0
        for attempt in range(repeat + 1):  # the first run is untimed
            cfg = JobConfig(
                notes=str(notes),
                model=str(arts[kind]),
                out=str(work / f"out-{kind}-{task}"),
                task=task,
                mode="overwrite",
                progress_every=0,
                run_id=f"{kind}-{task}-{attempt}-{stamp}",  # a new run each time (a finished run id does nothing)
                options=EmbedOptions(precision="fp32"),
            )
            start = time.perf_counter()
            s = run(cfg, spark)
            if attempt:
                seconds.append(time.perf_counter() - start)
            tokens = s["bpe_tokens"]
        wall = statistics.median(seconds)
        rows[f"{kind}/{task}"] = {"seconds": [round(x, 2) for x in seconds], "tokens_per_s": round(tokens / wall, 1)}
        log.info("%s head, --task %s: %.1f s, %.1f tokens/s", kind, task, wall, tokens / wall)
    spark.stop()
    for kind, task in (("sequence", "classify"), ("token", "ner")):
        rows[f"{kind}/{task}"]["x_embed"] = round(
            rows[f"{kind}/{task}"]["tokens_per_s"] / rows[f"{kind}/embed"]["tokens_per_s"], 3
        )
    return {
        "size": size,
        "notes": n_notes,
        "long_notes": long_notes,
        "bpe_tokens": tokens,
        "repeat": repeat,
        "cores": cores,
        "machine": machine(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinlong.benchmarks.heads", description=__doc__.splitlines()[0])
    p.add_argument("--work", default="work/bench-heads", help="checkpoints, artifacts, notes and tables")
    p.add_argument("--size", default="tiny", choices=("tiny", "base"))
    p.add_argument("--notes", type=int, default=40)
    p.add_argument("--long", type=int, default=4, help="discharge summaries among the notes (over 4,096 pieces)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[heads] %(message)s")
    result = heads_benchmark(Path(args.work), args.size, args.notes, args.long, args.repeat)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
