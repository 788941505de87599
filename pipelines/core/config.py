"""The job's configuration: one frozen record, shared by the job, its writers and its planning (kept
apart from the job module so that nothing imports the job to learn its options)."""
from __future__ import annotations

from dataclasses import dataclass, field

from clinlong.pipelines.core.engine import EmbedOptions

MODES = ("append", "overwrite", "incremental")
WRITERS = ("auto", "delta-rs", "delta-spark")
DEFAULT_CHUNK_NOTES = 100_000
DEFAULT_TARGET_FILE_MB = 256
TASKS_PER_CORE = 3  # default tasks per embedding stage: a few per core, so a slow task does not idle the rest


@dataclass(frozen=True)
class JobConfig:
    notes: str
    model: str
    out: str
    id_col: str = "ROW_ID"
    text_col: str = "TEXT"
    id_type: str = "auto"
    input_format: str = "auto"
    granularity: str = "note"
    mode: str = "append"
    partitions: int = 0  # tasks per chunk of the embedding stage; 0: TASKS_PER_CORE x the cluster's cores
    vector_dtype: str = "float32"
    writer: str = "auto"
    progress_every: float = 30.0
    gpus_per_task: float = 0.0
    errors_out: str = ""  # default: OUT_errors
    chunk_notes: int = DEFAULT_CHUNK_NOTES
    run_id: str = ""  # default: derived from the input, model and options
    partition_by: str = ""  # an input column carried into the output as its Delta partition column
    target_file_mb: float = DEFAULT_TARGET_FILE_MB
    storage_options: dict = field(default_factory=dict)  # delta-rs options (--storage-option), beyond the env
    options: EmbedOptions = EmbedOptions()

    @property
    def errors_path(self) -> str:
        return self.errors_out or self.out.rstrip("/") + "_errors"
