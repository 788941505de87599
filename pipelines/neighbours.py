"""Entry point: `python -m clinlong.pipelines.neighbours`, and the file `spark-submit pipelines/neighbours.py` runs
(the job itself is clinlong.pipelines.jobs.neighbours)."""

from clinlong.pipelines.jobs.neighbours import main

if __name__ == "__main__":
    raise SystemExit(main())
