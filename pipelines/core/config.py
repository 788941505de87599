"""The job's configuration: one frozen record whose fields are also the command line
(`pipelines.core.options`), shared by the job, its writers and its planning; kept apart from the job
module so that nothing imports the job to learn its options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.core.heads import WINDOW_POOLINGS
from clinlong.pipelines.core.options import option
from clinlong.pipelines.core.schema import GRANULARITIES, TASKS, VECTOR_DTYPES
from clinlong.pipelines.core.storage import parse_storage_options

MODES = ("append", "overwrite", "incremental")
WRITERS = ("auto", "delta-rs", "delta-spark")
INPUT_FORMATS = ("auto", "delta", "parquet", "csv", "table")
ID_TYPES = ("auto", "long", "string")
DEFAULT_CHUNK_NOTES = 100_000
DEFAULT_TARGET_FILE_MB = 256.0
TASKS_PER_CORE = 3  # default tasks per embedding stage: a few per core, so a slow task does not idle the rest


@dataclass(frozen=True)
class JobConfig:
    notes: str = option(
        help="catalog table (db.table, catalog.schema.table), or a Delta, Parquet or CSV "
        "(NOTEEVENTS layout) path or URI (s3a://, s3://, abfss://, gs://, dbfs:/, /Volumes/..., file:)"
    )
    model: str = option(help="native artifact directory written by `python -m clinlong.export`")
    out: str = option(help="output Delta table path or URI (s3://, s3a://, abfss://, gs://, local)")
    id_col: str = option("ROW_ID", "note id column")
    text_col: str = option("TEXT", "note text column")
    id_type: str = option(
        "auto", "auto keeps the id column's type (integers as long); long/string cast it", choices=ID_TYPES
    )
    input_format: str = option(
        "auto",
        "auto: a catalog table if one has that name, a Delta table if the path has a "
        "Delta log, else CSV or Parquet from the names of its files",
        choices=INPUT_FORMATS,
    )
    task: str = option(
        "embed",
        "embed: vectors; classify: a fine-tuned *ForSequenceClassification export's label and scores per note; "
        "ner: a fine-tuned *ForTokenClassification export's entity chunks (output tables: README)",
        choices=TASKS,
    )
    granularity: str = option("note", "one row per note, sentence or token (--task embed)", choices=GRANULARITIES)
    window_pooling: str = option(
        "mean",
        "--task classify, notes longer than --max-length: each window runs with global attention on its <s>; "
        "mean: the windows' logits averaged, max: each label's largest (then softmax/sigmoid)",
        choices=WINDOW_POOLINGS,
    )
    mode: str = option(
        "append",
        "append; overwrite (the first chunk replaces the table); incremental: embed only "
        "notes whose (id, text sha256) is not yet in OUT for this model (embed errors are retried), "
        "then drop rows of notes whose text changed",
        choices=MODES,
    )
    partitions: int = option(
        0,
        f"tasks per chunk of the embedding stage, balanced by text length "
        f"(0: {TASKS_PER_CORE} per core of the cluster)",
    )
    vector_dtype: str = option(
        "float32", "float32: array<float>; float16: binary of little-endian halves", choices=VECTOR_DTYPES
    )
    writer: str = option("auto", "auto: delta-spark when its JARs are on the classpath, else delta-rs", choices=WRITERS)
    progress_every: float = option(30.0, "seconds between progress logs (notes/s, tokens/s, ETA); 0 turns them off")
    gpus_per_task: float = option(
        0.0,
        "GPUs the embedding stage's tasks ask for (fractions share a GPU); > 0 puts "
        "a ResourceProfile on that stage only",
    )
    errors_out: str = option("", "Delta table of input rows that were not embedded (default: OUT_errors)")
    chunk_notes: int = option(
        DEFAULT_CHUNK_NOTES,
        "commit every ~N notes (a crash loses at most the chunk in flight; a rerun resumes); 0: one commit",
    )
    run_id: str = option(
        "",
        "name of this run in Delta's transaction ids (default: derived from the input's "
        "data, the model and the options, so rerunning the same command resumes it)",
    )
    partition_by: str = option("", "input column (e.g. CATEGORY) carried into the output as its Delta partition column")
    target_file_mb: float = option(DEFAULT_TARGET_FILE_MB, "size of the Parquet files each task writes (delta-rs)")
    storage_options: dict = option(
        help="delta-rs storage option KEY=VALUE (repeatable), beyond the AWS_*, AZURE_*, "
        "GOOGLE_* environment variables",
        flag="--storage-option",
        repeat=parse_storage_options,
        default_factory=dict,
    )
    options: EmbedOptions = EmbedOptions()

    @property
    def errors_path(self) -> str:
        return self.errors_out or self.out.rstrip("/") + "_errors"

    def validate(self, artifact: Artifact) -> "JobConfig":
        """Check the options against the artifact; one-line ValueError or ArtifactError.

        --task classify / ner need an export of a fine-tuned head of the matching kind (core.head_runs.check_head),
        and run with the head's own global attention (Longformer's sequence head: `cls`); the embedding table's
        options (--granularity, --vector-dtype, --token-vector) do not apply to them and are refused when set;
        classify runs whole notes (--context note)."""
        from clinlong.pipelines.core.head_runs import TASK_KINDS, check_head

        if self.task == "embed":
            self.options.validate(artifact)
            return self
        check_head(artifact, TASK_KINDS[self.task], f"--task {self.task}")
        head = artifact.head
        defaults = JobConfig(notes="", model="", out="")
        for name, flag in (("granularity", "--granularity"), ("vector_dtype", "--vector-dtype")):
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"{flag} applies to --task embed; --task {self.task} writes its own table (README)")
        if self.options.token_vector != defaults.options.token_vector:
            raise ValueError("--token-vector applies to --task embed; --task ner tags a token by its first piece")
        if self.options.global_attention not in ("none", head.global_attention):
            raise ValueError(
                f"--global-attention {self.options.global_attention}: --task {self.task} runs the head with the "
                f"global attention it was trained with ({head.global_attention})"
            )
        if self.task == "classify" and self.options.context != "note":
            raise ValueError("--task classify labels whole notes: use --context note (long notes run as windows)")
        dataclasses.replace(self.options, global_attention=head.global_attention).validate(artifact)
        return self
