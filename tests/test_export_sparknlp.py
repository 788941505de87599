"""`--format sparknlp`: the TensorFlow SavedModel folder Spark NLP's loadSavedModel imports.

TensorFlow lives in the optional `sparknlp` extra, so this test installs that extra into its own
virtual environment (.venv-sparknlp, reused when present) and runs export and checks there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

VERIFY = r"""
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, torch
from transformers import AutoTokenizer, LongformerModel
import tensorflow as tf  # after torch and transformers: importing triton (CUDA torch) after TF 2.21 segfaults
folder, ckpt = sys.argv[1], sys.argv[2]
loaded = tf.saved_model.load(folder)
sig = loaded.signatures["serving_default"]
inputs = {k: (v.dtype.name, v.shape.as_list()) for k, v in sig.structured_input_signature[1].items()}
outputs = sorted(sig.structured_outputs)
from tensorflow.core.protobuf import saved_model_pb2
graph = saved_model_pb2.SavedModel.FromString(open(folder + "/saved_model.pb", "rb").read()).meta_graphs[0]
newer_ops = sorted({n.op for f in graph.graph_def.library.function for n in f.node_def} & {"DisableCopyOnRead"}
                   | {o.name for o in graph.meta_info_def.stripped_op_list.op} & {"DisableCopyOnRead"})
tok = AutoTokenizer.from_pretrained(ckpt)
model = LongformerModel.from_pretrained(ckpt, add_pooling_layer=False).eval()
rng = np.random.default_rng(0)
diffs = {}
for n in (1, 9, 300, 700, 1500):
    ids = np.array([[0, *rng.integers(4, len(tok) - 1, max(n - 2, 0)), 2][:n]])
    got = sig(input_ids=tf.constant(ids, tf.int32),
              attention_mask=tf.ones(ids.shape, tf.int32))["last_hidden_state"].numpy()
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor(ids),
                    attention_mask=torch.ones(ids.shape, dtype=torch.long)).last_hidden_state.numpy()
    diffs[n] = float(np.abs(got - ref).max())
print(json.dumps({"inputs": inputs, "outputs": outputs, "diffs": diffs, "newer_ops": newer_ops}))
"""


def _sparknlp_python() -> Path:
    from clinlong.benchmarks.sparknlp_jvm import tf_python

    return tf_python()


@pytest.mark.slow
def test_sparknlp_savedmodel_loads_with_parity_and_assets(tiny_checkpoint, tmp_path):
    python = _sparknlp_python()
    out = tmp_path / "sparknlp"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [str(python), "-m", "clinlong.export", str(tiny_checkpoint), str(out), "--format", "sparknlp"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "saved_model.pb").exists() and (out / "variables").is_dir()
    report = json.loads((out / "sparknlp_parity.json").read_text())
    assert report["passed"] and report["max_abs_diff"] <= 1e-4
    # Rewritten for the TF 2.4.1 runtime in Spark NLP 5.5.3's JAR (export/sparknlp.py: downgrade_graph).
    assert report["graph_rewrites"]["VarHandleOp.debug_name"] > 0, report["graph_rewrites"]
    assert b"debug_name" not in (out / "saved_model.pb").read_bytes()

    # Independent check in the TensorFlow environment: signature, and parity with torch.
    check = subprocess.run(
        [str(python), "-c", VERIFY, str(out), str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert result["inputs"] == {"input_ids": ["int32", [None, None]], "attention_mask": ["int32", [None, None]]}
    assert result["outputs"] == ["last_hidden_state"]
    assert result["newer_ops"] == [], result["newer_ops"]  # ops Spark NLP's TF 2.4.1 runtime does not know
    assert max(result["diffs"].values()) <= 1e-4, result["diffs"]

    # Assets: tokens in id order, one per line; merges as in the checkpoint.
    vocab = json.loads((tiny_checkpoint / "vocab.json").read_text(encoding="utf-8"))
    lines = (out / "assets" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert lines == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    ours = [
        m for m in (out / "assets" / "merges.txt").read_text(encoding="utf-8").splitlines() if not m.startswith("#")
    ]
    theirs = [
        m
        for m in (tiny_checkpoint / "merges.txt").read_text(encoding="utf-8").splitlines()
        if m and not m.startswith("#")
    ]
    assert ours == theirs


def test_sparknlp_without_tensorflow_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    if subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True).returncode == 0:
        pytest.skip("TensorFlow is installed in this environment")
    from clinlong.export.__main__ import main

    assert main([str(tiny_checkpoint), str(tmp_path / "out"), "--format", "sparknlp"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "clinlong[sparknlp]" in line and not (tmp_path / "out").exists()
