"""Issue 24, point 2 (first piece): synthetic fine-tuned checkpoints, the layouts users fine-tune and then
export: ForSequenceClassification / ForTokenClassification of each family with id2label, label2id and
problem_type in config.json and a random head."""
from __future__ import annotations

import json

import pytest
import torch

from clinlong.export.synthetic import main, write_synthetic_checkpoint


@pytest.mark.parametrize("family,head,multi", [
    ("longformer", "sequence", False), ("longformer", "sequence", True), ("longformer", "token", False),
    ("bigbird", "sequence", False), ("bigbird", "token", False),
])
def test_synthetic_head_checkpoint_loads_in_hugging_faces_own_class(family, head, multi, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    labels = ["O", "B-PROBLEM", "I-PROBLEM"] if head == "token" else ["PNEUMONIA", "SEPSIS", "CHF"]
    out = write_synthetic_checkpoint(tmp_path / "ck", "tiny", 0, family, head, labels, multi)
    cfg = json.loads((out / "config.json").read_text())
    prefix = "BigBird" if family == "bigbird" else "Longformer"
    kind = "Sequence" if head == "sequence" else "Token"
    assert cfg["architectures"] == [f"{prefix}For{kind}Classification"]
    assert cfg["id2label"] == {str(i): n for i, n in enumerate(labels)}
    assert cfg["problem_type"] == ("multi_label_classification" if multi else "single_label_classification")
    auto = AutoModelForSequenceClassification if head == "sequence" else AutoModelForTokenClassification
    model = auto.from_pretrained(str(out)).eval()
    assert type(model).__name__ == cfg["architectures"][0] and model.num_labels == 3
    head_weights = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
    assert head_weights and all(v.abs().sum() > 0 for k, v in head_weights.items() if k.endswith("weight"))
    with torch.no_grad():
        logits = model(torch.tensor([[model.config.bos_token_id or 0, 10, 11, 12, 2]])).logits
    assert logits.shape[-1] == 3 and torch.isfinite(logits).all()


@pytest.mark.parametrize("argv,needle", [
    (["--labels", "A,B"], "--labels and --multi-label need --head"),
    (["--head", "token", "--labels", "A"], "at least two distinct labels"),
    (["--head", "token", "--labels", "O,B", "--multi-label"], "--multi-label is for sequence heads"),
])
def test_synthetic_head_refusals_are_one_line(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ck"), *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in err
    assert not (tmp_path / "ck").exists()


def test_export_of_a_fine_tuned_checkpoint_says_its_head_stays_behind(tmp_path, capfd):
    from clinlong.export.__main__ import run

    ckpt = write_synthetic_checkpoint(tmp_path / "ck", "tiny", 0, "longformer", "sequence", ["A", "B", "C"], False)
    result = run([str(ckpt), str(tmp_path / "art")])
    err = capfd.readouterr().err  # the clinlong loggers' handler writes to stderr
    assert "LongformerForSequenceClassification checkpoint (3 labels): its head is not exported" in err, err[-2000:]
    assert result["manifest"]["model_id"]  # the encoder is exported (as an embedding model)
