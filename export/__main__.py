"""`python -m clinlong.export CHECKPOINT OUT [--format native|sparknlp|all] [--overwrite]`: an encoder checkpoint
(LongformerForMaskedLM, ...) or a fine-tuned classification one (its head exported too, core.heads)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from clinlong.export.errors import ExportError

log = logging.getLogger("clinlong.export")


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clinlong.export",
        description="Turn a Hugging Face Longformer or BigBird checkpoint into verified model artifacts. A "
        "fine-tuned *ForSequenceClassification or *ForTokenClassification checkpoint keeps its head: "
        "head.safetensors, the labels of its id2label and its problem_type (single-label: softmax, "
        "multi-label: sigmoid; regression is refused) in the manifest, its logits checked against "
        "Hugging Face's own class; Longformer's sequence head runs with global attention on <s>, so "
        "its global graph is exported too.",
    )
    p.add_argument("checkpoint", help="local checkpoint directory, or a hub id where the hub is reachable")
    p.add_argument("out", help="artifact directory to create")
    p.add_argument(
        "--format",
        choices=("native", "sparknlp", "all"),
        default="native",
        help="native: ONNX + tokenizer + manifest at OUT; sparknlp: the folder Spark NLP's "
        "LongformerEmbeddings.loadSavedModel imports, at OUT; all: native at OUT and Spark NLP's "
        "folder at OUT/sparknlp",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    p.add_argument(
        "--name",
        help="artifact name used in model_id (default: the name of the artifact --overwrite "
        "replaces, so a re-export keeps its model_id; else the checkpoint directory's name)",
    )
    p.add_argument(
        "--global-attention",
        action="store_true",
        help="Longformer: also export encoder_global.onnx (a global_positions input) so that "
        "--global-attention cls runs on the onnxruntime backend too (the torch backend needs no "
        "second graph); checked against LongformerModel(global_attention_mask=...)",
    )
    p.add_argument("--atol", type=float, default=1e-3, help="parity: max abs difference per value (default 1e-3)")
    p.add_argument("--min-cosine", type=float, default=0.99999, help="parity: min cosine per token (default 0.99999)")
    return p


def _label_list(labels, shown: int = 8) -> str:
    return ", ".join(labels[:shown]) + (f", ... ({len(labels) - shown} more)" if len(labels) > shown else "")


def _existing_name(out) -> str | None:
    """The name in the manifest of the native artifact at `out` (which --overwrite replaces), if any: a
    re-export keeps the name, and so the model_id, of what it replaces unless --name says otherwise."""
    import json

    try:
        return json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("name") or None
    except (OSError, ValueError):
        return None


def run(argv: list[str] | None = None) -> dict:
    from pathlib import Path

    from clinlong.export.checkpoint import read_checkpoint
    from clinlong.export.native import write_native
    from clinlong.export.parity import Tolerance, format_report
    from clinlong.export.staging import staged_directory
    from clinlong.pipelines.core.logs import configure

    configure()
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    log.info(f"reading checkpoint {args.checkpoint}")
    ckpt = read_checkpoint(args.checkpoint)
    ec = ckpt.encoder_config
    attention = (
        f"blocks of {ec.block_size}, {ec.num_random_blocks} random"
        if ec.model_type == "big_bird"
        else f"windows {sorted(set(ec.attention_window))}"
    )
    log.info(
        f"{ec.model_type}: {ec.num_hidden_layers} layers, hidden {ec.hidden_size}, max length {ec.max_length}, "
        f"{attention}, weights {ckpt.weights_file}"
    )
    if ckpt.head is not None:
        h = ckpt.head.head
        log.info(
            f"{h.architecture}: a {h.kind} head, {h.num_labels} labels ({_label_list(h.labels)}), "
            f"{h.problem_type} ({h.activation})"
            + (
                ""
                if ckpt.head.problem_type_given
                else "; config.json names no problem_type: single-label softmax, as Hugging Face's pipelines read it"
            )
            + (
                "; its encoder runs with global attention on <s> (encoder_global.onnx is exported too)"
                if h.global_attention == "cls"
                else ""
            )
        )
        if args.format in ("sparknlp", "all"):
            log.warning(
                "the Spark NLP folder holds the encoder alone (LongformerEmbeddings); the head is exported "
                "in the native artifact (--format native or all)"
            )
    elif ckpt.other_head:  # a fine-tuned checkpoint whose head is not exported (question answering, ...)
        log.warning(
            f"{ckpt.name} is a {ckpt.other_head} checkpoint: its head is not exported (heads exported: "
            "*ForSequenceClassification, *ForTokenClassification); the artifact embeds with its "
            "fine-tuned encoder"
        )
    if args.format in ("sparknlp", "all"):
        from clinlong.export.sparknlp import check_supported

        check_supported(ckpt)  # before any work
    name = args.name or _existing_name(Path(args.out)) or ckpt.name
    tol = Tolerance(args.atol, args.min_cosine)
    result: dict = {}
    with staged_directory(args.out, args.overwrite) as staging:
        if args.format in ("native", "all"):
            manifest, report = write_native(ckpt, staging, name, tol, log.info, args.global_attention)
            result.update(manifest=manifest, report=report)
            print(format_report(report))
        if args.format in ("sparknlp", "all"):
            from clinlong.export.sparknlp import write_sparknlp

            target = staging / "sparknlp" if args.format == "all" else staging
            result["sparknlp"] = write_sparknlp(ckpt, target, tol, log.info)
    log.info(
        f"wrote {Path(args.out).resolve()} in {time.perf_counter() - start:.1f} s"
        + (f" (model_id {result['manifest']['model_id']})" if "manifest" in result else "")
    )
    return result


def _quiet_libraries() -> None:
    """Libraries' own chatter (length warnings, exporter registration notes) is not for users."""
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    _quiet_libraries()
    try:
        run(argv)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Exception) as e:  # also a library's error raised from the interrupt (raise X from it)
        if not _caused_by_interrupt(e):
            raise
        print("error: interrupted; no artifact was written", file=sys.stderr)
        return 130
    return 0


def _caused_by_interrupt(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


if __name__ == "__main__":
    raise SystemExit(main())
