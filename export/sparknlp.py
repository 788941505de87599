"""The folder Spark NLP's `LongformerEmbeddings.loadSavedModel(folder, spark)` imports.

Spark NLP's Longformer loader takes a TensorFlow SavedModel (not ONNX) whose `serving_default`
signature has `input_ids` and `attention_mask` inputs and a `last_hidden_state` output, with the
BPE tokenizer as `assets/vocab.txt` (tokens in id order, one per line) and `assets/merges.txt`.
Needs the `sparknlp` extra (tensorflow-cpu, tf-keras); TensorFlow is imported only here.

The graph is written by TensorFlow 2.21 but read by the TensorFlow runtime beside Spark NLP's JAR, which
is older: Spark NLP 5.5.3 declares JSL's TF-Java 0.4 build (`tensorflow-cpu_2.12:0.4.4`, not served here);
benchmarks/sparknlp-jvm.pom.xml gives it TF-Java's `org.tensorflow:tensorflow-core-api:0.4.2`, TF 2.7.4
(first measured with JSL's 0.3.3, TF 2.4.1). `downgrade_graph` rewrites the two things TF 2.21 writes that
these runtimes reject (measured with Spark NLP 5.5.3's own loader on TF 2.4.1; the op registry of TF 2.7.4,
read through TF-Java 0.4.2, still has no `DisableCopyOnRead` and no `debug_name` attr on `VarHandleOp`):
- `VarHandleOp` nodes carry a `debug_name` attr -> "NodeDef mentions attr 'debug_name' not in
  Op<name=VarHandleOp ...>"; the attr is informational and is dropped;
- the saver function calls `DisableCopyOnRead` (a newer op) on each variable before
  saving; it only switches a variable's copy-on-read mode, so it becomes a `NoOp` (same name, so the
  nodes that wait on it still resolve).
The rewritten graph is then parity-checked in TF 2.21 like before, and in Spark NLP's JVM by
tests/test_sparknlp_jvm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clinlong.export.checkpoint import Checkpoint
from clinlong.export.errors import ExportError
from clinlong.export.parity import PARITY_LENGTHS, Tolerance, _compare, parity_sequences, reference_model

REPORT_FILE = "sparknlp_parity.json"


def _import_tensorflow():
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers' TF models need Keras 2 (tf-keras)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tf_keras  # noqa: F401
        from transformers import TFLongformerModel
    except ImportError as e:
        raise ExportError(
            f"--format sparknlp needs TensorFlow ({e.name} is missing); "
            "install the extra: pip install 'clinlong[sparknlp]'"
        ) from None
    return tf, TFLongformerModel


def check_supported(ckpt: Checkpoint) -> None:
    """Spark NLP's LongformerEmbeddings imports Longformers with a byte-level BPE tokenizer only."""
    if ckpt.encoder_config.model_type != "longformer":
        raise ExportError(
            f"Spark NLP has no annotator that imports a {ckpt.encoder_config.model_type} model; "
            "use --format native (the pipeline's BigBirdEmbeddings runs it)"
        )
    kind = json.loads(ckpt.tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if kind != "BPE":
        raise ExportError(
            "Spark NLP's LongformerEmbeddings reads a byte-level BPE tokenizer "
            f"(vocab.txt + merges.txt); this checkpoint's is {kind}: use --format native"
        )


def write_assets(ckpt: Checkpoint, assets: Path) -> None:
    """vocab.txt (tokens in id order) and merges.txt, as Spark NLP's BPE tokenizer reads them."""
    assets.mkdir(parents=True, exist_ok=True)
    model = json.loads(ckpt.tokenizer.backend_tokenizer.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ExportError("the tokenizer's ids are not contiguous from 0; Spark NLP's vocab.txt cannot express it")
    if any("\n" in tok for tok, _ in by_id):
        raise ExportError("a vocabulary token contains a newline; Spark NLP's vocab.txt cannot express it")
    (assets / "vocab.txt").write_text("".join(f"{tok}\n" for tok, _ in by_id), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (assets / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


def check_savedmodel_parity(folder: Path, ckpt: Checkpoint, tol: Tolerance) -> dict:
    """Run the SavedModel's serving signature against Hugging Face's torch LongformerModel."""
    import torch

    tf, _ = _import_tensorflow()
    serving = tf.saved_model.load(str(folder)).signatures["serving_default"]
    torch_model = reference_model(ckpt)
    rows = []
    for n, ids in parity_sequences(ckpt, PARITY_LENGTHS, ckpt.encoder_config.max_length).items():
        with torch.inference_mode():
            t = torch.from_numpy(ids)[None]
            ref = torch_model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state[0].numpy()
        got = serving(input_ids=tf.constant(ids[None].astype(np.int32)), attention_mask=tf.ones((1, n), tf.int32))[
            "last_hidden_state"
        ].numpy()[0]
        diff, cos = _compare(ref, got)
        rows.append(
            {
                "length": n,
                "max_abs_diff": diff,
                "min_cosine": cos,
                "passed": bool(diff <= tol.max_abs_diff and cos >= tol.min_cosine),
            }
        )
    return {
        "passed": all(r["passed"] for r in rows),
        "tolerance": {"max_abs_diff": tol.max_abs_diff, "min_cosine": tol.min_cosine},
        "reference": "transformers LongformerModel (torch, fp32)",
        "candidate": f"TensorFlow {tf.__version__} SavedModel serving_default",
        "results": rows,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "min_cosine": min(r["min_cosine"] for r in rows),
    }


def downgrade_graph(folder: Path) -> dict:
    """Rewrite `folder/saved_model.pb` for TensorFlow runtimes as old as 2.4 (see the module docstring)."""
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    path = folder / "saved_model.pb"
    model = saved_model_pb2.SavedModel()
    model.ParseFromString(path.read_bytes())
    counts = {"VarHandleOp.debug_name": 0, "DisableCopyOnRead": 0}
    for graph in model.meta_graphs:
        for nodes in [graph.graph_def.node, *(f.node_def for f in graph.graph_def.library.function)]:
            for node in nodes:
                if node.op == "VarHandleOp" and "debug_name" in node.attr:
                    del node.attr["debug_name"]
                    counts["VarHandleOp.debug_name"] += 1
                elif node.op == "DisableCopyOnRead":
                    node.op = "NoOp"
                    controls = [i for i in node.input if i.startswith("^")]
                    del node.input[:]
                    node.input.extend(controls)  # a NoOp takes no data inputs; nodes that wait on it still can
                    for name in [a for a in node.attr if not a.startswith("_")]:
                        del node.attr[name]
                    counts["DisableCopyOnRead"] += 1
        ops = graph.meta_info_def.stripped_op_list.op  # the op definitions the graph declares it uses
        for op in ops:
            if op.name == "VarHandleOp":
                kept = [a for a in op.attr if a.name != "debug_name"]
                del op.attr[:]
                op.attr.extend(kept)
        if counts["DisableCopyOnRead"]:
            kept = [op for op in ops if op.name != "DisableCopyOnRead"]
            if not any(op.name == "NoOp" for op in kept):
                kept.append(op_def_pb2.OpDef(name="NoOp"))
            del ops[:]
            ops.extend(kept)
    path.write_bytes(model.SerializeToString())
    return counts


def write_sparknlp(ckpt: Checkpoint, out: Path, tol: Tolerance, log: Callable[[str], None] = lambda _: None) -> dict:
    """Write the SavedModel + assets into `out` (inside the export's staging directory)."""
    tf, TFLongformerModel = _import_tensorflow()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clinlong-tf-") as tmp:
        weights_dir = Path(tmp) / "checkpoint"
        weights_dir.mkdir()
        for name in ("config.json", ckpt.weights_file):
            os.symlink((ckpt.path / name).resolve(), weights_dir / name)  # a relative checkpoint path too
        model = TFLongformerModel.from_pretrained(str(weights_dir), from_pt=True)
        spec = {
            "input_ids": tf.TensorSpec((None, None), tf.int32, name="input_ids"),
            "attention_mask": tf.TensorSpec((None, None), tf.int32, name="attention_mask"),
        }

        @tf.function(input_signature=[spec])
        def serving(inputs):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], training=False)
            return {"last_hidden_state": out.last_hidden_state}

        model.save_pretrained(tmp + "/tf", saved_model=True, signatures={"serving_default": serving})
        out.mkdir(parents=True, exist_ok=True)
        for item in (Path(tmp) / "tf" / "saved_model" / "1").iterdir():
            shutil.move(str(item), out / item.name)
    write_assets(ckpt, out / "assets")
    rewritten = downgrade_graph(out)
    log(f"graph rewritten for Spark NLP's TensorFlow runtime: {rewritten}")
    log(f"Spark NLP SavedModel written ({time.perf_counter() - start:.1f} s)")
    report = check_savedmodel_parity(out, ckpt, tol)
    report["graph_rewrites"] = rewritten
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise ExportError(
            f"the Spark NLP SavedModel misses parity (max |diff| {report['max_abs_diff']:.2e}); "
            "no artifact written. Check the tensorflow/transformers versions of the sparknlp extra"
        )
    log(
        f"Spark NLP SavedModel parity passed: max |diff| {report['max_abs_diff']:.2e}, "
        f"min cosine {report['min_cosine']:.7f}"
    )
    return report
