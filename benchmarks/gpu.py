"""`python -m clinlong.benchmarks.gpu`: the heavy step on a CUDA GPU (fp16, bf16), against the GPU's measured GEMM
peak, with GPU memory and the projection for all of MIMIC-III NOTEEVENTS.

    python -m clinlong.benchmarks.gpu [--work work/bench] [--notes 200] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MIMIC_NOTES = 2_083_180
MIMIC_TOKENS = 1.0e9  # on the order of a billion BPE tokens (about 4 GB of text)


def main(argv: list[str] | None = None) -> int:
    import torch

    from clinlong.benchmarks.__main__ import ensure_artifact
    from clinlong.benchmarks.measure import flops_per_token, gemm_peak
    from clinlong.export.synthetic_notes import generate_notes
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder

    p = argparse.ArgumentParser(prog="python -m clinlong.benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--work", default="work/bench")
    p.add_argument("--notes", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device; run this on a GPU machine")
        return 2
    _, art_path = ensure_artifact(Path(args.work))
    art = Artifact.open(art_path, verify=False)
    fpt = flops_per_token(art.encoder_config)
    texts = [n.text for n in generate_notes(args.notes, seed=7)]
    rows = []
    for prec in ("fp16", "bf16"):
        emb = NoteEmbedder(art, EmbedOptions(precision=prec), device="cuda:0")
        prepared = emb.prepare(texts)
        emb.encoder([prepared.runs[0][:64]])
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        emb.finish(prepared)
        torch.cuda.synchronize()
        secs = time.perf_counter() - start
        tokens = sum(r.n_tokens + 2 for r in prepared.results)
        peak = gemm_peak(prec, 1, device="cuda:0")
        tps = tokens / secs
        rows.append({"precision": prec, "notes": args.notes, "tokens": tokens, "seconds": round(secs, 2),
                     "tokens_per_s": round(tps), "gflops": round(tps * fpt / 1e9), "gemm_peak_gflops": round(peak),
                     "fraction_of_peak": round(tps * fpt / 1e9 / peak, 3),
                     "gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "mimic_projection_hours": round(MIMIC_TOKENS / tps / 3600, 2)})
    result = {"device": torch.cuda.get_device_name(0), "flops_per_token": fpt, "runs": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
