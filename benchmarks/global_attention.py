"""What global attention on `<s>` costs on a CPU (issue 24's goal: `--global-attention cls` at most 15% over local
attention alone at 4,096 tokens).

    python -m clinlong.benchmarks.global_attention [--layers 2,4] [--threads 1,2] [--runs 5] [--json OUT]

The packed encoder (pipelines/core/model.py, torch, fp32, the `blocks` kernel the CPU path runs) at the real
Clinical-Longformer dimensions (hidden 768, 12 heads, windows 512; random weights; fewer layers, since each layer
costs the same), one row of 4,096 tokens: one sequence of 4,096, or four of 1,024 (global attention on each one's
`<s>`). Local-only and `cls` calls alternate, `--runs` times each after one untimed call of each; reported: the
median and best seconds of each and the median ratio `cls / local - 1`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

LENGTH = 4096


def cost(layers: int, threads: int, runs: int, sequences: int) -> dict:
    import torch

    from clinlong.export.synthetic import CLINICAL_LONGFORMER_CONFIG
    from clinlong.pipelines.core.encoder_config import EncoderConfig
    from clinlong.pipelines.core.model import PackedEncoder

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = EncoderConfig.from_hf_dict(
        {**CLINICAL_LONGFORMER_CONFIG, "num_hidden_layers": layers, "attention_window": [512] * layers}
    )
    model = PackedEncoder(cfg).eval()
    each = LENGTH // sequences
    ids = torch.randint(3, cfg.vocab_size, (1, LENGTH))
    starts = torch.arange(sequences) * each
    ids[0, starts] = 0  # <s>
    pos = (torch.arange(LENGTH) % each + cfg.pad_token_id + 1)[None]  # RoBERTa positions, per sequence
    globs = starts[None]
    seconds: dict[str, list[float]] = {"none": [], "cls": []}
    with torch.inference_mode():
        for r in range(runs + 1):
            for mode in ("none", "cls"):
                start = time.perf_counter()
                model(ids, pos, globs if mode == "cls" else None)
                if r:  # the first call of each is untimed
                    seconds[mode].append(time.perf_counter() - start)
    ratios = [c / n - 1 for n, c in zip(seconds["none"], seconds["cls"])]
    return {
        "layers": layers,
        "threads": threads,
        "sequences": f"{sequences} x {each}",
        "local_s": {"median": round(statistics.median(seconds["none"]), 3), "best": round(min(seconds["none"]), 3)},
        "cls_s": {"median": round(statistics.median(seconds["cls"]), 3), "best": round(min(seconds["cls"]), 3)},
        "cls_over_local": round(statistics.median(ratios), 4),
    }


def main(argv: list[str] | None = None) -> int:
    from clinlong.benchmarks.measure import machine

    p = argparse.ArgumentParser(
        prog="python -m clinlong.benchmarks.global_attention", description=__doc__.split("\n")[0]
    )
    p.add_argument("--layers", default="2,4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = [
        cost(layers, threads, args.runs, sequences)
        for layers, threads in zip(map(int, args.layers.split(",")), map(int, args.threads.split(",")))
        for sequences in (1, 4)
    ]
    for r in rows:
        print(
            f"{r['layers']} layers, {r['threads']} thread(s), {r['sequences']}: local {r['local_s']['median']} s, "
            f"cls {r['cls_s']['median']} s, cls/local - 1 = {100 * r['cls_over_local']:+.1f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": args.runs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
