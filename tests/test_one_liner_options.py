"""The one-liner as a new user meets it: options refused in one line naming the option, paths that are not
artifacts named as such, and integer columns that stay integers when some inputs are skipped."""

from __future__ import annotations

import pytest

from clinlong.pipelines import load
from clinlong.pipelines.core.artifact import ArtifactError


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"case_sensitive": "no"}, "option case_sensitive must be bool, got 'no'"),
        ({"max_length": "512"}, "option max_length must be int, got '512'"),
        ({"max_length": 512.7}, "option max_length must be int, got 512.7"),
        ({"window_overlap": True}, "option window_overlap must be int, got True"),
        ({"precision": "fp64"}, "option precision must be one of"),
        ({"max_lenght": 512}, "unknown option(s) max_lenght; load() takes: context, max_length"),
    ],
)
def test_load_refuses_a_bad_option_in_one_line(tiny_artifact, options, needle):
    with pytest.raises(ValueError) as err:
        load(str(tiny_artifact), **options)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_load_of_a_path_that_is_not_an_artifact(tmp_path):
    for path, what in ((tmp_path / "missing", "does not exist"), (tmp_path, "is a folder without manifest.json")):
        with pytest.raises(ArtifactError) as err:
            load(str(path))
        assert f"{path} {what}" in str(err.value) and "python -m clinlong.export CHECKPOINT" in str(err.value)


def test_predict_keeps_integer_columns_when_inputs_are_skipped(tiny_artifact):
    texts = ["Pt. stable. Continue ASA.", "", None, "  "]
    tokens = load(str(tiny_artifact), precision="fp32").predict(texts)
    assert str(tokens.begin.dtype) == "Int32" and str(tokens.token_index.dtype) == "Int32"
    embedded = tokens[tokens.skip_reason.isna()]
    assert [texts[0][b : e + 1] for b, e in zip(embedded.begin, embedded.end)] == embedded.token.tolist()
    assert tokens.skip_reason.tolist()[-3:] == ["empty text", "null text", "whitespace-only text"]
    assert tokens.begin.isna().sum() == 3
