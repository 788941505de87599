"""Issue 24, points 4 and 5: the job's `--task classify` and `--task ner` through Delta, on tiny synthetic fine-tuned
Longformer checkpoints (single-label softmax, multi-label sigmoid, token IOB) exported once per module.

References are Hugging Face's own classes (AutoModelFor{Sequence,Token}Classification, fp32) run with plain loops:
per note, or per window for notes longer than the max length (the windows of pipelines/core/windows.py's
documented rule, written out again here; the notes hold accents, CRLF and MIMIC's [** … **] de-identification
brackets); classify averages (or maxes) the windows' logits, ner takes each piece's
logits from the window where it sits farthest from an edge and tags each token by its first piece. The job's
tables are read back with delta-rs. Also: labels from id2label, exactly-once reruns, incremental mode after an
edit, a note with no entity, the errors table, and one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from deltalake import DeltaTable

from clinlong.pipelines.core.heads import chunks_from_tags
from tests.conftest import HEAD_LABELS

ATOL = 1e-4
SEQUENCE_LABELS, TOKEN_LABELS = HEAD_LABELS["sequence"], HEAD_LABELS["token"]
MAX_LENGTH = 64  # small windows, so that a note of a few hundred pieces runs as several
NOTES = {
    1: "Pt admitted with fever and productive cough. CXR: RLL pneumonia. Started ceftriaxone.",
    2: "Dyspnea on exertion; BNP élevé. Echo: EF 30%.\r\nDx: CHF exacerbation, diuresed with furosemide.",
    3: "Short note.",
    4: " ".join(f"Day {d}: afebrile, tolerating diet, lactate {d}.{d % 7} mmol/L, WBC {9 + d % 5}." for d in range(30)),
    5: "Sepsis ruled out. Blood cultures negative x2 — discharged home.",
    7: "Seen at [**Hospital1 18**] by Dr. [**Last Name (STitle) 1234**] on [**2101-3-4**]; no acute distress.",
}


@pytest.fixture(scope="module")
def heads(head_model, tmp_path_factory):
    """name -> (checkpoint, artifact): classify (softmax), multi (sigmoid), ner (token), quiet (a token head
    whose "O" bias is +100: it tags every token O, so no note has an entity)."""
    import torch

    from clinlong.export.__main__ import run

    out = {"classify": head_model("sequence"), "multi": head_model("sequence", True), "ner": head_model("token")}
    out["bigbird"] = head_model("sequence", True, "bigbird")  # BigBird's twin (no global attention; [CLS] first)
    quiet = tmp_path_factory.mktemp("ckpt") / "longformer-quiet"
    shutil.copytree(out["ner"][0], quiet)
    weights = torch.load(quiet / "pytorch_model.bin", weights_only=True)  # the real checkpoint's layout
    weights["classifier.bias"][0] = 100.0
    torch.save(weights, quiet / "pytorch_model.bin")
    art = tmp_path_factory.mktemp("artifacts") / "quiet"
    run([str(quiet), str(art)])
    return {**out, "quiet": (quiet, art)}


@pytest.fixture(scope="module")
def notes_csv(tmp_path_factory):
    """NOTEEVENTS-style CSV: the notes above, one empty text, one null id."""
    import csv

    path = tmp_path_factory.mktemp("notes") / "notes.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ROW_ID", "TEXT"])
        for nid, text in NOTES.items():
            w.writerow([nid, text])
        w.writerow([6, ""])
        w.writerow(["", "a note without an id"])
    return path


def _job(art, notes, out, task, spark, **kw):
    from clinlong.pipelines.core.config import JobConfig
    from clinlong.pipelines.core.engine import EmbedOptions
    from clinlong.pipelines.jobs.embed_notes import run

    cfg = JobConfig(
        notes=str(notes),
        model=str(art),
        out=str(out),
        task=task,
        id_type="long",
        options=EmbedOptions(max_length=MAX_LENGTH),
        **kw,
    )
    return run(cfg, spark)


def _table(path) -> list[dict]:
    return DeltaTable(str(path)).to_pyarrow_table().to_pylist()


_HF: dict = {}


def _hf(ckpt, ids: list[int]) -> np.ndarray:
    """Hugging Face's own class, fp32, on one framed sequence (<s> ids </s>); its own default global attention
    (<s> for sequence classification, none for token classification)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging

    if ckpt not in _HF:
        logging.set_verbosity_error()
        auto = AutoModelForSequenceClassification
        if json.loads((ckpt / "config.json").read_text())["architectures"][0].endswith("TokenClassification"):
            auto = AutoModelForTokenClassification
        _HF[ckpt] = auto.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        return _HF[ckpt](input_ids=torch.tensor([ids])).logits[0].numpy()


def _windows(n: int) -> list[tuple[int, int]]:
    """(start, length) of each window over n content pieces: the fewest windows of at most MAX_LENGTH - 2 pieces
    overlapping by the default overlap ((MAX_LENGTH - 2) // 4), of equal length, the last ending at the end."""
    width, overlap = MAX_LENGTH - 2, (MAX_LENGTH - 2) // 4
    if n <= width:
        return [(0, n)]
    k = -(-(n - overlap) // (width - overlap))
    length = -(-(n + (k - 1) * overlap) // k)
    return [(i * (length - overlap), length) for i in range(k - 1)] + [(n - length, length)]


def _pieces(art, text: str):
    from clinlong.pipelines.core.artifact import Artifact

    a = Artifact.open(art, verify=False)
    enc = a.tokenizer.encode(text, add_special_tokens=False)
    return a.sequence_frame, enc.ids, enc.offsets


def _hf_classify(ckpt, art, text: str, pooling: str) -> tuple[np.ndarray, int]:
    """The note's logits pooled over its windows (each run alone by Hugging Face), and how many windows."""
    (bos, eos), ids, _ = _pieces(art, text)
    logits = np.stack([_hf(ckpt, [bos, *ids[s : s + n], eos]) for s, n in _windows(len(ids))])
    return (logits.mean(0) if pooling == "mean" else logits.max(0)), len(logits)


def _hf_entities(ckpt, art, text: str) -> list[tuple]:
    """(begin, end, entity, score) of the note's chunks, by plain loops: each piece's logits from the window where
    it sits farthest from an edge (the earlier on a tie), each token (the text rules' tokens) tagged by its first
    piece's argmax (the piece that contains its first character), chunks by Spark NLP's IOB rules, sentence by
    sentence."""
    from clinlong.pipelines.core.text import detect_sentences, tokenize

    (bos, eos), ids, offsets = _pieces(art, text)
    wins = _windows(len(ids))
    per_window = [_hf(ckpt, [bos, *ids[s : s + n], eos])[1:-1] for s, n in wins]
    piece_logits = []
    for p in range(len(ids)):
        best, margin = None, -1
        for w, (s, n) in enumerate(wins):
            if s <= p < s + n and min(p - s, s + n - 1 - p) > margin:
                best, margin = w, min(p - s, s + n - 1 - p)
        piece_logits.append(per_window[best][p - wins[best][0]])
    by_sentence: dict = {}
    for b, e, sent in tokenize(text, detect_sentences(text)):
        # the first piece containing the token's first character (a zero-width piece, such as the lone "Ġ" before
        # a split accented character, contains none): README "Definitions"
        first = next((p for p, (ps, pe) in enumerate(offsets) if ps <= b < pe), None)
        if first is None:
            tag, conf = "", None
        else:
            x = piece_logits[first].astype(np.float64)
            prob = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
            tag, conf = TOKEN_LABELS[int(np.argmax(prob))], float(prob.max())
        by_sentence.setdefault(sent, []).append((b, e, tag, "", conf))
    return [(b, e, ent, c) for s in sorted(by_sentence) for b, e, ent, _, c in chunks_from_tags(by_sentence[s])]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _softmax(x):
    x = np.asarray(x, np.float64)
    return np.exp(x - x.max()) / np.exp(x - x.max()).sum()


@pytest.mark.parametrize(
    "model,pooling", [("classify", "mean"), ("multi", "max"), ("multi", "mean"), ("bigbird", "mean")]
)
def test_classify_equals_hugging_face_per_window(model, pooling, heads, notes_csv, spark, tmp_path):
    ckpt, art = heads[model]
    s = _job(art, notes_csv, tmp_path / "o", "classify", spark, window_pooling=pooling)
    assert (s["rows_in"], s["embedded"], s["task"]) == (8, 6, "classify")
    assert s["errors"] == {"check: null text": 1, "check: null note id": 1}
    rows = {r["note_id"]: r for r in _table(tmp_path / "o")}
    assert set(rows) == set(NOTES)
    assert rows[4]["n_windows"] >= 3  # the long note ran as windows
    for nid, text in NOTES.items():
        r = rows[nid]
        logits, n_windows = _hf_classify(ckpt, art, text, pooling)
        want = _sigmoid(logits) if model in ("multi", "bigbird") else _softmax(logits)
        np.testing.assert_allclose(r["scores"], want, atol=ATOL, err_msg=f"note {nid}")
        assert r["labels"] == list(SEQUENCE_LABELS)  # the checkpoint's id2label, in id order
        assert r["label"] == SEQUENCE_LABELS[int(np.argmax(want))] and r["n_windows"] == n_windows
        if model == "classify":
            assert abs(sum(r["scores"]) - 1) < 1e-5
    assert {r["model_id"] for r in rows.values()} == {json.loads((art / "manifest.json").read_text())["model_id"]}
    errors = _table(tmp_path / "o_errors")
    assert sorted(e["reason"] for e in errors) == ["null note id", "null text"]


def test_ner_equals_hugging_face_per_window(heads, notes_csv, spark, tmp_path):
    ckpt, art = heads["ner"]
    s = _job(art, notes_csv, tmp_path / "o", "ner", spark)
    assert (s["rows_in"], s["embedded"]) == (8, 6)
    rows = _table(tmp_path / "o")
    found = 0
    for nid, text in NOTES.items():
        mine = sorted((r for r in rows if r["note_id"] == nid), key=lambda r: r["chunk_index"] or 0)
        want = _hf_entities(ckpt, art, text)
        if not want:
            assert len(mine) == 1 and mine[0]["chunk_index"] is None and mine[0]["entity"] is None
            continue
        found += len(want)
        assert [(r["begin"], r["end"], r["entity"]) for r in mine] == [(b, e, ent) for b, e, ent, _ in want], nid
        assert [r["chunk_index"] for r in mine] == list(range(len(want)))
        assert [(r["begin"], r["end"], r["entity"]) for r in mine] == [(b, e, ent) for b, e, ent, _ in want]
        for r, (b, e, _, score) in zip(mine, want):
            assert r["chunk"] == text[b : e + 1]  # end inclusive, offsets into the text as stored (CRLF, accents)
            assert abs(r["score"] - score) < ATOL
    assert found >= 5  # a random head tags plenty: the comparison is not vacuous
    assert {r["entity"] for r in rows} <= {"PROBLEM", None}


def test_a_note_with_no_entity_has_one_empty_row_and_reruns_are_exactly_once(heads, notes_csv, spark, tmp_path):
    _, art = heads["quiet"]
    out = tmp_path / "o"
    s = _job(art, notes_csv, out, "ner", spark, mode="incremental")
    rows = _table(out)
    assert s["embedded"] == 6 and len(rows) == 6
    assert all(r["chunk_index"] is None and r["chunk"] is None and r["entity"] is None for r in rows)
    again = _job(art, notes_csv, out, "ner", spark, mode="incremental")
    assert again["rows_in"] == 0 and len(_table(out)) == 6  # each run note is found: nothing is run twice


def test_incremental_classify_reruns_only_an_edited_note(heads, notes_csv, spark, tmp_path):
    ckpt, art = heads["classify"]
    out = tmp_path / "o"
    first = _job(art, notes_csv, out, "classify", spark, mode="incremental")
    assert first["embedded"] == 6
    assert _job(art, notes_csv, out, "classify", spark, mode="incremental")["rows_in"] == 0
    edited = tmp_path / "edited.csv"
    edited.write_bytes(notes_csv.read_bytes().replace(b"Short note.", b"Short note; edited."))  # the rest as it was
    s = _job(art, edited, out, "classify", spark, mode="incremental")
    assert (s["rows_in"], s["embedded"], s["stale_rows_deleted"]) == (1, 1, 1)
    rows = {r["note_id"]: r for r in _table(out)}
    assert len(rows) == 6
    logits, _ = _hf_classify(ckpt, art, "Short note; edited.", "mean")
    np.testing.assert_allclose(rows[3]["scores"], _softmax(logits), atol=ATOL)


def test_append_resumes_a_run_and_never_writes_it_twice(heads, notes_csv, spark, tmp_path):
    _, art = heads["ner"]
    out = tmp_path / "o"
    s = _job(art, notes_csv, out, "ner", spark, chunk_notes=2)
    n = len(_table(out))
    assert s["chunks"] >= 3 and n >= 6
    again = _job(art, notes_csv, out, "ner", spark, chunk_notes=2)
    assert again["chunks_resumed_from"] == again["chunks"] and len(_table(out)) == n


@pytest.mark.parametrize(
    "model,task,kw,needle",
    [
        ("ner", "classify", {}, "holds a token head"),
        ("classify", "ner", {}, "holds a sequence head"),
        ("classify", "classify", {"granularity": "token"}, "--granularity applies to --task embed"),
        ("ner", "ner", {"vector_dtype": "float16"}, "--vector-dtype applies to --task embed"),
    ],
)
def test_wrong_task_options_are_refused_in_one_line(model, task, kw, needle, heads, notes_csv, tmp_path, capsys):
    from clinlong.pipelines.jobs.embed_notes import main

    _, art = heads[model]
    argv = ["--notes", str(notes_csv), "--model", str(art), "--out", str(tmp_path / "o"), "--task", task]
    argv += [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_an_embedding_model_is_refused_for_a_head_task(tiny_artifact, notes_csv, tmp_path, capsys):
    from clinlong.pipelines.jobs.embed_notes import main

    argv = ["--notes", str(notes_csv), "--model", str(tiny_artifact), "--out", str(tmp_path / "o"), "--task", "ner"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no fine-tuned head" in err and len(err.splitlines()) == 1


def test_a_table_of_another_task_is_refused(heads, notes_csv, spark, tmp_path):
    from clinlong.pipelines.core.errors import OutputError

    _, art = heads["classify"]
    _job(art, notes_csv, tmp_path / "o", "classify", spark)
    with pytest.raises(OutputError, match="another schema"):
        _job(heads["ner"][1], notes_csv, tmp_path / "o", "ner", spark)


# --- the one-liner (issue 24, point 3): load(...).predict(...) gives the job's tables --------------------------


def test_one_liner_classify_in_process_and_through_spark(heads, spark, tmp_path, monkeypatch):
    from clinlong.pipelines import HeadPipeline, load

    ckpt, art = heads["multi"]
    models = tmp_path / "models"
    models.mkdir()
    (models / "icd_en").symlink_to(art)
    monkeypatch.setenv("CLINLONG_MODELS", str(models))
    nlp = load("en.classify.longformer.icd", max_length=MAX_LENGTH)
    assert isinstance(nlp, HeadPipeline) and nlp.task == "classify"
    texts = [*NOTES.values(), None]
    got = nlp.predict(texts, window_pooling="max")
    assert list(got.note_id) == list(range(len(texts)))  # every input, in order
    assert got.skip_reason.tolist() == [None] * len(NOTES) + ["null text"] and got.label.iloc[-1] is None
    for i, text in enumerate(NOTES.values()):
        logits, n_windows = _hf_classify(ckpt, art, text, "max")
        np.testing.assert_allclose(got.scores.iloc[i], _sigmoid(logits), atol=ATOL)
        assert list(got.labels.iloc[i]) == list(SEQUENCE_LABELS) and got.n_windows.iloc[i] == n_windows
    sdf = spark.createDataFrame([(k, v) for k, v in NOTES.items()], "id long, text string")
    rows = {r["note_id"]: r for r in nlp.predict(sdf, id_col="id", window_pooling="max").collect()}
    for i, nid in enumerate(NOTES):
        np.testing.assert_allclose(rows[nid]["scores"], got.scores.iloc[i], atol=1e-6)
        assert rows[nid]["label"] == got.label.iloc[i] and rows[nid]["skip_reason"] is None


def test_one_liner_ner_equals_hugging_face_and_names_are_checked(heads, tmp_path, monkeypatch):
    from clinlong.pipelines import load
    from clinlong.pipelines.core.artifact import ArtifactError

    ckpt, art = heads["ner"]
    nlp = load(str(art), max_length=MAX_LENGTH)
    assert nlp.task == "ner"
    got = nlp.predict([NOTES[2], NOTES[4], ""])
    for i, nid in enumerate((2, 4)):
        mine = got[got.note_id == i]
        want = _hf_entities(ckpt, art, NOTES[nid])
        assert [(r.begin, r.end, r.entity) for r in mine.itertuples()] == [(b, e, ent) for b, e, ent, _ in want]
        assert all(r.chunk == NOTES[nid][r.begin : r.end + 1] for r in mine.itertuples())
    assert got[got.note_id == 2].skip_reason.tolist() == ["empty text"]
    models = tmp_path / "models"
    models.mkdir()
    (models / "problems_en").symlink_to(art)
    monkeypatch.setenv("CLINLONG_MODELS", str(models))
    with pytest.raises(ArtifactError, match="holds a token head") as e:
        load("en.classify.longformer.problems")
    assert "\n" not in str(e.value)
    assert type(load("en.ner.longformer.problems")).__name__ == "HeadPipeline"


@pytest.mark.parametrize("mode", ["append", "incremental"])
def test_a_classify_run_killed_between_commits_resumes_exactly_once(mode, heads, notes_csv, spark, tmp_path):
    """SIGKILL of the job's driver (python -m, its own JVM) between a chunk's errors-table and output commits;
    the rerun completes the table, which then equals a clean run's: each note once, the same scores."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    _, art = heads["classify"]
    clean = tmp_path / "clean"
    _job(art, notes_csv, clean, "classify", spark)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "clinlong.pipelines.embed_notes", "--notes", str(notes_csv), "--model", str(art)]
    cmd += ["--out", str(out), "--task", "classify", "--id-type", "long", "--max-length", str(MAX_LENGTH)]
    cmd += ["--chunk-notes", "2", "--mode", mode, "--progress-every", "0", "--master", "local[2,2]"]

    def job(fault: str = "") -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CLINLONG_FAULTPOINT": fault}
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    killed = job("driver-between-commits:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ids = [r["note_id"] for r in _table(out)]
    assert len(ids) == len(set(ids)) and len(ids) < len(NOTES)  # whole chunks only, the killed one not
    done = job()
    assert done.returncode == 0, done.stderr[-2000:]
    got, want = ({r["note_id"]: r for r in _table(p)} for p in (out, clean))
    assert sorted(got) == sorted(want) == sorted(NOTES)  # each note exactly once
    for nid in NOTES:
        np.testing.assert_allclose(got[nid]["scores"], want[nid]["scores"], atol=1e-6)
        assert got[nid]["label"] == want[nid]["label"]
    assert sorted(r["reason"] for r in _table(f"{out}_errors")) == ["null note id", "null text"]
