"""Nearest notes by note vector (cosine) in a note-granularity embeddings table. Prints ids only, never text.

    python -m clinlong.pipelines.neighbours DELTA_PATH --note-id ID [--k 5] [--notes NOTEEVENTS.csv]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def nearest(table_path: str, note_id, k: int = 5) -> list[tuple[object, float]]:
    """The k notes closest to `note_id` by cosine similarity of their note vectors."""
    from clinlong.pipelines.delta.sink import read_table

    t = read_table(table_path, ["note_id", "embedding"]).to_pandas()
    t = t[t.embedding.notna()]
    ids = t.note_id.astype(str).tolist()
    if str(note_id) not in ids:
        raise KeyError(f"note {note_id} is not in {table_path} (or was skipped)")
    m = np.stack(t.embedding.to_numpy()).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q = m[ids.index(str(note_id))]
    sims = m @ q
    order = [i for i in np.argsort(-sims) if ids[i] != str(note_id)][:k]
    return [(t.note_id.iloc[i], float(sims[i])) for i in order]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinlong.pipelines.neighbours", description=__doc__.splitlines()[0])
    p.add_argument("table")
    p.add_argument("--note-id", required=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--notes", help="NOTEEVENTS CSV, to show each note's CATEGORY")
    args = p.parse_args(argv)
    categories = {}
    if args.notes:
        import pandas as pd

        df = pd.read_csv(args.notes, usecols=["ROW_ID", "CATEGORY"])
        categories = dict(zip(df.ROW_ID.astype(str), df.CATEGORY))
    try:
        hits = nearest(args.table, args.note_id, args.k)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"nearest notes to note {args.note_id} ({categories.get(str(args.note_id), '?')}) by cosine of note vectors:")
    for nid, sim in hits:
        print(f"  note {nid:>6}  cosine {sim:.4f}  {categories.get(str(nid), '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
