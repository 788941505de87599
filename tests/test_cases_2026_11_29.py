"""Issue 22: the seven kinds of fault found by trying public bug reports (inputs in tests/cases/2026-11-29),
each tested on the given input and on inputs of our own."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from clinlong.pipelines.core.engine import EmbedOptions, NoteEmbedder
from clinlong.pipelines.core.text import detect_sentences, lowercase_keep_offsets, tokenize

# The handed inputs, copied byte for byte from shared/cases/2026-11-29 (.gitattributes keeps their CRLFs).
CASES = Path(__file__).resolve().parent / "cases" / "2026-11-29"
TEXTS = json.loads((CASES / "texts.json").read_text(encoding="utf-8"))


def words(text: str) -> list[tuple[int, int]]:
    return [(b, e) for b, e, _ in tokenize(text, detect_sentences(text))]


# ---- kind 1: the text as stored --------------------------------------------------------------------------


def test_line_ending_of_the_first_record():
    from clinlong.pipelines.spark.sources import line_ending

    assert line_ending(b'ROW_ID,TEXT\r\n1,"a\nb"\r\n') == "\r\n"
    assert line_ending(b'\xef\xbb\xbfROW_ID,TEXT\n1,"a\r\nb"\n') == "\n"
    assert line_ending(b'ROW_ID,TEXT\r1,"a"\r') == "\r"
    assert line_ending(b'"ROW\nID",TEXT\r\n') == "\r\n"  # a line ending inside a quoted header name is not one
    assert line_ending(b"ROW_ID,TEXT") is None and line_ending(b"ROW_ID,TEXT\r") is None


def test_crlf_noteevents_job_embeds_hashes_and_offsets_the_text_as_stored(tiny_artifact, spark, tmp_path):
    from deltalake import DeltaTable

    from clinlong.pipelines.jobs.embed_notes import JobConfig, run

    want = json.loads((CASES / "crlf_noteevents.expected_texts.json").read_text())
    out = str(tmp_path / "t")
    summary = run(
        JobConfig(
            notes=str(CASES / "crlf_noteevents.csv"),
            model=str(tiny_artifact),
            out=out,
            granularity="token",
            options=EmbedOptions(precision="fp32"),
        ),
        spark,
    )
    assert summary["rows_in"] == 4 and summary["embedded"] == 4
    t = DeltaTable(out).to_pyarrow_table().to_pandas()
    for note_id, rows in t.groupby("note_id"):
        text = want[str(note_id)]
        assert set(rows.text_sha256) == {hashlib.sha256(text.encode()).hexdigest()}
        assert all(text[b : e + 1] == tok for b, e, tok in zip(rows.begin, rows.end, rows.token))
    assert "\r\n" in want["101"] and (t.note_id == "101").sum() > 10  # (CSV ids are strings)
    # A Parquet copy of the same notes: the same hashes, so --mode incremental finds nothing changed.
    import pandas as pd

    pq = tmp_path / "notes.parquet"
    pd.DataFrame({"ROW_ID": list(want), "TEXT": list(want.values())}).to_parquet(pq)
    again = run(
        JobConfig(
            notes=str(pq),
            model=str(tiny_artifact),
            out=out,
            granularity="token",
            mode="incremental",
            options=EmbedOptions(precision="fp32"),
        ),
        spark,
    )
    assert again["embedded"] == 0 and again.get("stale_rows_deleted", 0) == 0


TEXTS_AS_STORED = ["a\r\nb", "c\nd", "e\rf", "g\r\n\r\nh\u2028i\u0085j\fk\tl", 'm "q" n', "\ufeffo", "p\r"]


@pytest.mark.parametrize("sep,bom", [("\r\n", False), ("\n", False), ("\r", False), ("\r\n", True), ("\n", True)])
def test_csv_fields_are_read_as_stored_with_every_line_ending(spark, tmp_path, sep, bom):
    from clinlong.pipelines.spark import sources

    body = sep.join(
        ["ROW_ID,TEXT"] + [f'{i},"{t.replace(chr(34), chr(34) * 2)}"' for i, t in enumerate(TEXTS_AS_STORED)]
    )
    path = tmp_path / "notes.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (body + sep).encode())
    df = sources.select_notes(sources.read_notes(spark, str(path)), "ROW_ID", "TEXT", "long")
    got = {r["note_id"]: r["text"] for r in df.collect()}
    assert got == dict(enumerate(TEXTS_AS_STORED))


def test_csv_folder_with_mixed_record_separators_is_refused_in_one_line(spark, tmp_path):
    from clinlong.pipelines.spark import sources

    (tmp_path / "a.csv").write_bytes(b'ROW_ID,TEXT\r\n1,"x\r\ny"\r\n')
    (tmp_path / "b.csv").write_bytes(b'ROW_ID,TEXT\n2,"z"\n')
    with pytest.raises(sources.InputError) as e:
        sources.read_notes(spark, str(tmp_path), "csv")
    assert "lineSep" in str(e.value) and "\n" not in str(e.value) and "CRLF in a.csv" in str(e.value)


# ---- kind 2: no invented vectors (SentencePiece families) -------------------------------------------------

SP_FAMILIES = ["drbert-4096", "bigbird"]


def _uncovered(tokenizer, c: str) -> bool:
    """Independent of the product: a character is covered when the tokenizer's normalizer keeps something
    of it that is not whitespace."""
    return not tokenizer.normalizer.normalize_str(c).strip()


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_sentencepiece_dropped_characters_get_no_vector(family_model, family):
    from clinlong.pipelines import load
    from clinlong.pipelines.core.artifact import Artifact

    _, art = family_model(family)
    tok = Artifact.open(art).tokenizer
    texts = TEXTS["sentencepiece_dropped_chars (DrBERT-4096, Clinical-BigBird)"]
    nlp = load(str(art), precision="fp32")
    toks = nlp.predict(texts, output_level="token")
    for r in toks.itertuples():
        none = all(_uncovered(tok, c) for c in r.token)
        assert (r.embedding is None) == none, (r.note_id, r.begin)
        assert r.skip_reason == ("token has no BPE piece" if none else None)
        if not none:
            assert np.abs(np.asarray(r.embedding)).sum() > 0
    assert toks.embedding.isna().sum() == 7  # \x10 (5), U+200B (2)
    sents = nlp.predict(texts, output_level="sentence")
    missing = sents[sents.embedding.isna()]
    assert [(r.note_id, r.begin, r.end) for r in missing.itertuples()] == [(1, 15, 16), (2, 14, 15)]
    assert set(missing.skip_reason) == {"sentence has no BPE piece"}
    assert all(np.abs(np.asarray(v)).sum() > 0 for v in sents.embedding.dropna())  # never an all-zero vector
    # The covered tokens' vectors: the piece whose offsets (the tokenizer's own) contain the token's first
    # covered character, from an independent encoding of the note.
    emb = NoteEmbedder(Artifact.open(art), EmbedOptions(precision="fp32"))
    res = emb.embed([texts[0]])[0]
    enc = tok.encode(texts[0], add_special_tokens=False)
    for (b, e, _), fp in zip(res.tokens, res.first_pieces()):
        first = next((i for i in range(b, e + 1) if not _uncovered(tok, texts[0][i])), None)
        if first is None:
            assert fp == -1
        else:
            a, z = enc.offsets[fp]
            assert a <= first < z or enc.tokens[fp].startswith("\u2581"), (b, enc.tokens[fp])


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_every_character_class_the_normalizer_drops_or_blanks_gets_no_vector(family_model, family):
    from clinlong.pipelines import load
    from clinlong.pipelines.core.artifact import Artifact

    _, art = family_model(family)
    tok = Artifact.open(art).tokenizer
    # C0 controls, DEL, C1 controls, zero-width characters, separators, BOM, U+FFFD, the marker itself
    odd = [
        "\x01",
        "\x08",
        "\x0e",
        "\x10",
        "\x1b",
        "\x7f",
        "\x8f",
        "\x9f",
        "\u200b",
        "\u200c",
        "\u200d",
        "\u200e",
        "\u200f",
        "\ufeff",
        "\ufffd",
        "\u2581",
        "\u2028",
    ]
    assert all(_uncovered(tok, c) for c in odd)
    texts = [f"Avant {c}{c} apres {c} fin." for c in odd] + [c * 3 for c in odd]
    nlp = load(str(art), precision="fp32")
    out = nlp.predict(texts, output_level="token")
    for r in out.itertuples():
        if r.note_id >= len(odd):
            assert r.skip_reason in ("no BPE pieces", "whitespace-only text") and r.embedding is None
        else:
            none = r.token is not None and all(_uncovered(tok, c) for c in r.token)
            assert (r.embedding is None) == none and (r.skip_reason is not None) == none, (r.note_id, r.begin)
    doc = nlp.predict(texts, output_level="document")
    assert len(doc) == len(texts) and doc.embedding.isna().sum() == len(odd)
    # NFKC merges: ligatures, ellipsis, full-width letters and decomposed accents are covered, never null.
    merged = nlp.predict(["ﬁèvre … ＡＢＣ e\u0301te\u0301 x\u00b2"], output_level="token")
    assert merged.embedding.notna().all() and merged.skip_reason.isna().all()


def test_job_and_stages_give_null_vectors_counted_in_the_summary(family_model, spark, tmp_path):
    from deltalake import DeltaTable
    from pyspark.ml import Pipeline

    from clinlong.pipelines import (
        DocumentAssembler,
        LongformerEmbeddings,
        SentenceDetector,
        SentenceEmbeddings,
        Tokenizer,
    )
    from clinlong.pipelines.jobs.embed_notes import JobConfig, run

    _, art = family_model("drbert-4096")
    out = str(tmp_path / "t")
    summary = run(
        JobConfig(
            notes=str(CASES / "sentencepiece_dropped_chars.csv"),
            model=str(art),
            out=out,
            granularity="sentence",
            options=EmbedOptions(precision="fp32"),
        ),
        spark,
    )
    assert summary["embedded"] == 2 and summary["warnings"] == {"null vector: sentence has no BPE piece": 2}
    t = DeltaTable(out).to_pyarrow_table().to_pandas().sort_values(["note_id", "sentence_index"])
    assert t.embedding.isna().tolist() == [False, True, False] * 2
    assert all(np.abs(np.asarray(v)).sum() > 0 for v in t.embedding.dropna())
    texts = TEXTS["sentencepiece_dropped_chars (DrBERT-4096, Clinical-BigBird)"]
    df = spark.createDataFrame(list(enumerate(texts)), "id long, text string")
    model = Pipeline(
        stages=[
            DocumentAssembler().setInputCol("text").setOutputCol("document"),
            SentenceDetector().setInputCols(["document"]).setOutputCol("sentence"),
            Tokenizer().setInputCols(["sentence"]).setOutputCol("token"),
            LongformerEmbeddings().setModelPath(str(art)).setPrecision("fp32").setInputCols(["document", "token"]),
            SentenceEmbeddings().setInputCols(["sentence", "embeddings"]).setOutputCol("sentence_embeddings"),
        ]
    ).fit(df)
    rows = {r["id"]: r for r in model.transform(df).collect()}
    empty = [(i, a["result"]) for i, r in rows.items() for a in r["embeddings"] if not a["embeddings"]]
    assert sorted(empty) == [(0, "\x10")] * 3 + [(1, "\x10")] * 2 + [(2, "\u200b")] * 2
    assert all(
        a["metadata"]["skip_reason"] == "token has no BPE piece"
        for r in rows.values()
        for a in r["embeddings"]
        if not a["embeddings"]
    )
    sent = [(i, a["begin"]) for i, r in rows.items() for a in r["sentence_embeddings"] if not a["embeddings"]]
    assert sorted(sent) == [(1, 15), (2, 14)]
    # For Spark NLP's annotators, which need a vector in every annotation: keepTokensWithoutVector=False leaves
    # exactly those tokens out; every other annotation is the same, and the token column still has them all.
    model.stages[3].setKeepTokensWithoutVector(False)
    dropped = {r["id"]: r for r in model.transform(df).collect()}
    for i, r in rows.items():
        kept = [(a["begin"], a["end"], a["result"], list(a["embeddings"])) for a in r["embeddings"] if a["embeddings"]]
        assert [(a["begin"], a["end"], a["result"], list(a["embeddings"])) for a in dropped[i]["embeddings"]] == kept
        assert len(dropped[i]["token"]) == len(r["token"]) == len(r["embeddings"])


# ---- kind 3: words are whole in any Unicode form ----------------------------------------------------------

WORDS = [
    "L'hôpital de jour a reçu le patient, fièvre résolue.",
    "Bệnh nhân được xuất viện hôm nay.",  # Vietnamese: stacked marks
    "रोगी की हालत स्थिर है।",  # Devanagari: spacing marks and virama
    "המטופל יציב. שָׁלוֹם",  # Hebrew points
    "ผู้ป่วยอาการคงที่",  # Thai vowels and tone marks
    "환자는 안정적입니다.",  # Hangul: NFD gives conjoining jamo
    "می\u200cخواهم بیمار را ببینم.",  # Persian ZWNJ
    "Pain 3/10 \u2764\ufe0f, nurse \U0001f469\u200d\u2695\ufe0f on call; Ǆ ﬁne.",  # VS16, ZWJ emoji
]


@pytest.mark.parametrize("text", WORDS)
def test_nfc_and_nfd_give_the_same_words_at_their_own_offsets(text):
    forms = {f: unicodedata.normalize(f, text) for f in ("NFC", "NFD")}
    got = {f: [unicodedata.normalize("NFC", t[b : e + 1]) for b, e in words(t)] for f, t in forms.items()}
    assert got["NFC"] == got["NFD"]
    for t in forms.values():  # no token starts with a mark or joiner: nothing is cut off its word
        assert all(unicodedata.category(t[b])[0] != "M" and t[b] not in "\u200c\u200d\ufe0f" for b, _ in words(t))


def test_joiners_and_variation_selectors_stay_inside_their_word():
    text = "a\u200db c\u200cd e\ufe0e f\U000e0100g \U0001f469\u200d\u2695\ufe0f"
    assert [text[b : e + 1] for b, e in words(text)] == [
        "a\u200db",
        "c\u200cd",
        "e\ufe0e",
        "f\U000e0100g",
        "\U0001f469\u200d\u2695\ufe0f",
    ]


@pytest.mark.parametrize("family", ["longformer", "drbert-4096"])
def test_nfd_french_gives_eleven_whole_words_in_the_one_liner(family_model, tiny_artifact, family):
    from clinlong.pipelines import load

    art = tiny_artifact if family == "longformer" else family_model(family)[1]
    case = TEXTS["nfd_french (every family)"]
    out = load(str(art), precision="fp32").predict([case["nfc"], case["nfd"]], output_level="token")
    nfc, nfd = (out[out.note_id == i] for i in (0, 1))
    assert len(nfc) == len(nfd) == 11
    assert [unicodedata.normalize("NFC", t) for t in nfd.token] == list(nfc.token)
    assert all(case["nfd"][b : e + 1] == t for b, e, t in zip(nfd.begin, nfd.end, nfd.token))
    assert nfd.embedding.notna().all()


# ---- kind 4: every input accounted for in predict ------------------------------------------------------------


@pytest.mark.parametrize("family", ["longformer", "bigbird"])
def test_predict_returns_one_row_per_input_in_order_with_reasons(family_model, tiny_artifact, spark, family):
    import pandas as pd

    from clinlong.pipelines import load

    art = tiny_artifact if family == "longformer" else family_model(family)[1]
    texts = TEXTS["predict_unusable_texts (one-liner)"]
    sp = family == "bigbird"  # \x10 and U+200B: no piece in SentencePiece, bytes in byte-level BPE
    want = [
        None,
        "empty text",
        "null text",
        "whitespace-only text",
        "no BPE pieces" if sp else None,
        "no BPE pieces" if sp else None,
    ]
    nlp = load(str(art), precision="fp32")
    out = nlp.predict(texts, output_level="document")
    assert out.note_id.tolist() == list(range(6)) and out.skip_reason.tolist() == want
    assert out.embedding.isna().tolist() == [w is not None for w in want]
    frame = pd.DataFrame({"text": [texts[0], np.nan, pd.NA, texts[3]]}, index=[40, 30, 20, 10])
    got = nlp.predict(frame, output_level="token")
    assert got.note_id.tolist()[-3:] == [30, 20, 10] and got.skip_reason.tolist()[-3:] == [
        "null text",
        "null text",
        "whitespace-only text",
    ]
    assert (got.note_id == 40).sum() == len(words(texts[0])) and got[got.note_id == 40].embedding.notna().all()
    sdf = spark.createDataFrame(list(enumerate(texts)), "ROW_ID long, TEXT string")
    rows = nlp.predict(sdf, output_level="document", text_col="TEXT", id_col="ROW_ID").toPandas()
    assert rows.sort_values("note_id").skip_reason.tolist() == want


# ---- kind 5: a value the setter accepts runs ---------------------------------------------------------------


def _long_text(n_words: int) -> str:
    return " ".join(f"word{i % 97} stable." for i in range(n_words // 2))


@pytest.mark.parametrize("max_length", [512, 128])
def test_stage_max_sentence_length_runs_and_every_token_gets_a_vector(tiny_artifact, spark, max_length):
    from pyspark.ml import Pipeline

    from clinlong.pipelines import DocumentAssembler, LongformerEmbeddings, SentenceDetector, Tokenizer
    from clinlong.pipelines.core.artifact import Artifact

    text = _long_text(600)
    art = Artifact.open(tiny_artifact)
    res = NoteEmbedder(art, EmbedOptions(max_length=max_length, precision="fp32")).embed([text])[0]
    assert res.n_tokens >= 1020 and res.n_windows > 1
    df = spark.createDataFrame([(1, text)], "id long, text string")
    stage = (
        LongformerEmbeddings().setModelPath(str(tiny_artifact)).setMaxSentenceLength(max_length).setPrecision("fp32")
    )
    model = Pipeline(
        stages=[
            DocumentAssembler().setInputCol("text").setOutputCol("document"),
            SentenceDetector().setInputCols(["document"]).setOutputCol("sentence"),
            Tokenizer().setInputCols(["sentence"]).setOutputCol("token"),
            stage.setInputCols(["document", "token"]),
        ]
    ).fit(df)
    anns = model.transform(df).collect()[0]["embeddings"]
    got = np.array([a["embeddings"] for a in anns], np.float32)
    assert len(anns) == len(res.tokens) and got.shape[1] == art.dimension
    np.testing.assert_allclose(got, res.token_vectors(), atol=1e-5)


def test_overlap_follows_max_length_in_load_and_the_cli(tiny_artifact):
    import argparse

    from clinlong.pipelines import load
    from clinlong.pipelines.core.options import add_arguments, from_arguments

    assert EmbedOptions().window_overlap == 512 and EmbedOptions(max_length=512).window_overlap == 127
    assert EmbedOptions(max_length=128).window_overlap == 31 and EmbedOptions(max_length=3).window_overlap == 0
    assert load(str(tiny_artifact), max_length=512).options.window_overlap == 127
    parser = argparse.ArgumentParser()
    add_arguments(parser, EmbedOptions)
    assert from_arguments(EmbedOptions, parser.parse_args(["--max-length", "512"])).window_overlap == 127
    assert from_arguments(EmbedOptions, parser.parse_args(["--window-overlap", "7"])).window_overlap == 7
    with pytest.raises(ValueError, match=r"window_overlap, --window-overlap"):
        load(str(tiny_artifact), max_length=10, window_overlap=8)


@pytest.mark.parametrize("max_length,overlap", [(3, 0), (12, 9)])  # the smallest max length; overlap max - 3
def test_window_boundaries_equal_hugging_face_on_the_chosen_window(tiny_artifact, tiny_checkpoint, max_length, overlap):
    from clinlong.pipelines.core.artifact import Artifact
    from tests.conftest import hf_reference

    art = Artifact.open(tiny_artifact)
    text = "Pt. is stable today, BP 120/80."
    emb = NoteEmbedder(art, EmbedOptions(max_length=max_length, window_overlap=overlap, precision="fp32"))
    res = emb.embed([text])[0]
    ids = art.tokenizer.encode(text, add_special_tokens=False).ids
    n, width = len(ids), max_length - 2
    starts = _readme_windows(n, width, overlap)
    assert res.n_windows == len(starts)
    bos, eos = art.sequence_frame
    for p in range(n):
        w = _readme_choice(p, starts, len_of(n, width, overlap))
        s = starts[w]
        ref = hf_reference(tiny_checkpoint, [bos, *ids[s : s + len_of(n, width, overlap)], eos])[p - s + 1]
        np.testing.assert_allclose(res.piece_vectors[p], ref, atol=1e-4)


def len_of(n: int, width: int, overlap: int) -> int:
    k = -(-(n - overlap) // (width - overlap))
    return -(-(n + (k - 1) * overlap) // k)


def _readme_windows(n: int, width: int, overlap: int) -> list[int]:
    """The README's words: k = ceil((n - overlap) / (W - overlap)) windows of L pieces, window i at i * (L -
    overlap) for i < k - 1, the last at n - L."""
    if n <= width:
        return [0]
    k = -(-(n - overlap) // (width - overlap))
    length = len_of(n, width, overlap)
    return [i * (length - overlap) for i in range(k - 1)] + [n - length]


def _readme_choice(p: int, starts: list[int], length: int) -> int:
    """The window where piece p sits farthest from an edge; ties: the earlier."""
    best, margin = 0, -1
    for w, s in enumerate(starts):
        if s <= p < s + length and min(p - s, s + length - 1 - p) > margin:
            best, margin = w, min(p - s, s + length - 1 - p)
    return best


# ---- kind 6: case-insensitive mode is context-free --------------------------------------------------------


def _simple_lower(text: str) -> str:
    """Independent of the product: each character lowercased alone, the first character of its full mapping
    (Unicode's simple mapping for the one character, U+0130, whose full mapping is longer)."""
    return "".join(c.lower()[0] if c.lower() else c for c in text)


def test_lowercasing_is_context_free_and_keeps_offsets():
    for text in ["ODYSSEUΣ", "ΟΔΥΣΣΕΥΣ protocol", "İstanbul İ", "Σ", "ΣΑΣ.Σ", "straße ǅ ǈ ﬃ"]:
        low = lowercase_keep_offsets(text)
        assert len(low) == len(text) and low == _simple_lower(text)
    assert lowercase_keep_offsets("ODYSSEUΣ") == "odysseuσ" and lowercase_keep_offsets("İ") == "i"
    every = "".join(chr(c) for c in range(0x20, 0x3000) if not 0xD800 <= c < 0xE000)
    assert lowercase_keep_offsets(every) == _simple_lower(every)


def test_case_insensitive_word_is_the_same_input_whatever_else_the_note_holds(tiny_artifact, tiny_checkpoint):
    from clinlong.pipelines.core.artifact import Artifact
    from tests.conftest import hf_reference

    a, b = TEXTS["case_insensitive (one-liner, case_sensitive=False)"]
    art = Artifact.open(tiny_artifact)
    emb = NoteEmbedder(art, EmbedOptions(case_sensitive=False, precision="fp32"))
    without = "Transfer from clinic; ODYSSEUΣ protocol."
    for text in (a, b, without):
        res = emb.embed([text])[0]
        ids = art.tokenizer.encode(_simple_lower(text), add_special_tokens=False).ids
        bos, eos = art.sequence_frame
        np.testing.assert_allclose(res.piece_vectors, hf_reference(tiny_checkpoint, [bos, *ids, eos])[1:-1], atol=1e-4)
        assert "İ" not in _simple_lower(text) and "ς" not in _simple_lower(text)
    # The word is the same model input with and without the 'İ' elsewhere in the note.
    tail = "odysseuσ protocol."
    assert lowercase_keep_offsets(b).endswith(tail) and lowercase_keep_offsets(without).endswith(tail)
    assert lowercase_keep_offsets(b).startswith("transfer from istanbul")
