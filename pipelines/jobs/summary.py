"""What a run did, as the job returns it (a dict, also stored cumulatively in every chunk's Delta commit
info) and prints it (`format_summary`): rows in = embedded + errors (by stage and reason), tokens, windows,
throughput, devices, where the tables are."""

from __future__ import annotations

from clinlong.pipelines.core.config import JobConfig
from clinlong.pipelines.delta.run_plan import RunPlan
from clinlong.pipelines.delta.writers import Totals


def summary(t: Totals, seconds: float, model_id: str, cfg: JobConfig, plan: RunPlan) -> dict:
    """What this invocation did: rows in = embedded + errors (by stage and reason), tokens, throughput."""
    return {
        "rows_in": t.notes,
        "embedded": t.embedded,
        "errors": dict(t.errors),
        "warnings": dict(t.warnings),
        "tasks": t.tasks,
        "model_loads_in_tasks": t.model_loads,
        "input_rows": plan.input_rows,
        "chunks_resumed_from": plan.first,
        "chunks": plan.chunks,
        "run_id": plan.run_id,
        "devices": dict(t.devices),
        "gpu_addresses": dict(t.gpus),
        "rows_written": t.rows,
        "bpe_tokens": t.tokens,
        "windows": t.windows,
        "seconds": round(seconds, 2),
        "notes_per_s": round(t.notes / seconds, 2),
        "tokens_per_s": round(t.tokens / seconds, 1),
        "model_id": model_id,
        "task": cfg.task,
        "granularity": cfg.granularity,
        "context": cfg.options.context,
        "vector_dtype": cfg.vector_dtype,
        "precision": cfg.options.precision,
        "out": cfg.out,
        "errors_out": cfg.errors_path,
        "mode": cfg.mode,
    }


def format_summary(s: dict) -> str:
    """The summary as the job prints it (ids and counts only, never text)."""
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none"
    warnings = ", ".join(f"{k}: {v}" for k, v in sorted(s["warnings"].items()))
    resumed = f" (resumed at chunk {s['chunks_resumed_from']})" if s["chunks_resumed_from"] else ""
    if s["input_rows"] == 0 and s["chunks"] == 0:
        resumed = f" (nothing to do: no input rows{' left to embed' if s['mode'] == 'incremental' else ''})"
    elif s["chunks_resumed_from"] == s["chunks"]:
        resumed = (
            f" (nothing to do: run {s['run_id']} had committed all {s['chunks']} chunk(s); "
            "pass --run-id to write the same input again)"
        )
    total = s.get("input_total", s["input_rows"])
    of_input = (
        f" of {total} input rows, {total - s['input_rows']} already embedded or recorded"
        if s["mode"] == "incremental"
        else ""
    )
    errors_out = (
        f"errors in {s['errors_out']}" if s.get("errors_version") is not None else "no errors table (no error rows)"
    )
    return (
        f"rows in {s['rows_in']}{of_input}{resumed}, embedded {s['embedded']}, errors {sum(s['errors'].values())} "
        f"({errors}){'; warnings: ' + warnings if warnings else ''}\n"
        f"rows written {s['rows_written']} ({_table_kind(s)}, {s['context']} context), "
        f"BPE tokens {s['bpe_tokens']}, windows {s['windows']}\n"
        f"{s['seconds']} s, {s['notes_per_s']} notes/s, {s['tokens_per_s']} tokens/s\n"
        f"devices: {_counted(s['devices']) or 'none'}; "
        f"GPU addresses assigned: {_counted(s['gpu_addresses']) or 'none'}"
        + (
            f"; models loaded by the embedding tasks: {s['model_loads_in_tasks']} (the others were preloaded)"
            if s["tasks"]
            else ""
        )
        + "\n"
        + (
            f"stale rows deleted: {s['stale_rows_deleted']}, retried embed errors cleared: "
            f"{s['retried_error_rows_deleted']}\n"
            if "stale_rows_deleted" in s
            else ""
        )
        + f"Delta table {s['out']} version {s['version']}, {errors_out} (model {s['model_id']})"
    )


def _counted(counts: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def _table_kind(s: dict) -> str:
    task = s.get("task", "embed")
    if task == "embed":
        return f"{s['granularity']} granularity"
    return "one per note: label and scores" if task == "classify" else "one per entity chunk, or per note with none"
