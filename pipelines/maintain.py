"""Entry point: `python -m clinlong.pipelines.maintain TABLE [--compact] [--vacuum] ...` (the table
upkeep itself is clinlong.pipelines.delta.maintain)."""

from clinlong.pipelines.delta.maintain import main

if __name__ == "__main__":
    raise SystemExit(main())
