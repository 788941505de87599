"""Nearest notes by note vector (cosine) in a note-granularity embeddings table. Prints ids only, never text.

python -m clinlong.pipelines.neighbours DELTA_PATH --note-id ID [--k 5] [--notes NOTEEVENTS.csv]
    [--storage-option KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from clinlong.pipelines.core.errors import NeighboursError  # noqa: F401 - re-exported: defined in core.errors
from clinlong.pipelines.core.storage import StorageError, parse_storage_options


def nearest(table_path: str, note_id, k: int = 5, storage_options: dict | None = None) -> list[tuple[object, float]]:
    """The k notes closest to `note_id` by cosine similarity of their note vectors, best first, as (note_id,
    cosine). Reads either vector dtype (array<float>, float16 binary). Raises NeighboursError for a table of
    another granularity (its rows are sentences or tokens, not notes) or a note it does not hold."""
    from clinlong.pipelines.core.schema import read_vectors
    from clinlong.pipelines.delta.sink import existing_table_schema, read_table

    schema = existing_table_schema(table_path, storage_options)
    if schema is None:
        raise NeighboursError(f"no Delta table at {table_path}")
    if "embedding" not in schema.names or {"sentence_index", "token_index"} & set(schema.names):
        kind = "token" if "token_index" in schema.names else "sentence" if "sentence_index" in schema.names else "other"
        raise NeighboursError(
            f"{table_path} is a {kind}-granularity table; neighbours ranks notes by their note "
            "vectors: point it at a table written with --granularity note (the default)"
        )
    t = read_table(table_path, ["note_id", "embedding"], storage_options)
    m, valid = read_vectors(t.column("embedding"))
    raw_ids = [i for i, ok in zip(t.column("note_id").to_pylist(), valid) if ok]
    ids = [str(i) for i in raw_ids]
    if str(note_id) not in ids:
        raise NeighboursError(f"note {note_id} is not in {table_path} (or has no vector: see its errors table)")
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    sims = m @ m[ids.index(str(note_id))]
    order = [i for i in np.argsort(-sims, kind="stable") if ids[i] != str(note_id)][:k]
    return [(raw_ids[i], float(sims[i])) for i in order]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinlong.pipelines.neighbours", description=__doc__.splitlines()[0])
    p.add_argument("table")
    p.add_argument("--note-id", required=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--notes", help="NOTEEVENTS CSV, to show each note's CATEGORY")
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="delta-rs storage option (repeatable), as the job takes them",
    )
    args = p.parse_args(argv)
    categories = {}
    try:
        options = parse_storage_options(args.storage_option)
        if args.notes:
            import pandas as pd

            df = pd.read_csv(args.notes, usecols=["ROW_ID", "CATEGORY"])
            categories = dict(zip(df.ROW_ID.astype(str), df.CATEGORY))
        hits = nearest(args.table, args.note_id, args.k, options)
    except (NeighboursError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"nearest notes to note {args.note_id} ({categories.get(str(args.note_id), '?')}) by cosine of note vectors:")
    for nid, sim in hits:
        print(f"  note {nid:>6}  cosine {sim:.4f}  {categories.get(str(nid), '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
