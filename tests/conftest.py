"""Shared fixtures: synthetic checkpoints and exported artifacts, built once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; fail fast, never hang
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from export.synthetic import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-clinical-longformer", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory) -> Path:
    from export.__main__ import run

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    run([str(tiny_checkpoint), str(out)])
    return out


def hf_reference(checkpoint: Path, ids: list[int]):
    """Hugging Face LongformerModel's last_hidden_state (fp32) for one unpadded sequence."""
    import torch
    from transformers import LongformerModel

    model = _hf_models.get(checkpoint)
    if model is None:
        model = _hf_models[checkpoint] = LongformerModel.from_pretrained(str(checkpoint), add_pooling_layer=False).eval()
    with torch.inference_mode():
        t = torch.tensor([ids])
        return model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state[0].numpy()


_hf_models: dict = {}
