"""Entry point: `python -m clinlong.pipelines.embed_notes`, and the file `spark-submit pipelines/embed_notes.py` runs
(the job itself is clinlong.pipelines.jobs.embed_notes)."""

from clinlong.pipelines.jobs.embed_notes import main

if __name__ == "__main__":
    raise SystemExit(main())
