"""The file formats (talm.tokenizer.formats): the fingerprint, and the errors a damaged or foreign file gives on load."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from conftest import BASE_TOKENIZER, ORIGINAL_TOKENIZER
from tokenizer_cases import BASE, ORIGINAL

from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer

# ----------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_ignores_path_and_whitespace(tmp_path: Path) -> None:
    for source in (BASE_TOKENIZER, ORIGINAL_TOKENIZER):
        document = json.loads(source.read_text())
        compact = tmp_path / "compact.json"
        compact.write_text(json.dumps(document, separators=(",", ":")))
        shuffled = tmp_path / "other-name.json"
        shuffled.write_text(json.dumps(dict(reversed(list(document.items()))), indent=7))
        fingerprints = {Tokenizer.from_file(p).fingerprint for p in (source, compact, shuffled)}
        assert len(fingerprints) == 1
        assert Tokenizer.from_file(source).fingerprint in fingerprints  # same file, same fingerprint again


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    document = json.loads(BASE_TOKENIZER.read_text())
    document["model"]["merges"] = document["model"]["merges"][:-1]
    token = next(t for t, i in document["model"]["vocab"].items() if i == 1019)
    del document["model"]["vocab"][token]
    for t in document["added_tokens"]:
        t["id"] -= 1
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(document))
    assert Tokenizer.from_file(changed).fingerprint != BASE.fingerprint
    assert BASE.fingerprint != ORIGINAL.fingerprint


def _swap_two_merges(d: dict) -> None:
    merges = d["model"]["merges"]
    merges[-1], merges[-2] = merges[-2], merges[-1]


def _rename_a_special(d: dict) -> None:
    d["added_tokens"][-1]["content"] = "<|renamed|>"


def _rename_an_original_special(d: dict) -> None:
    last = max(d["special_tokens"], key=d["special_tokens"].get)
    d["special_tokens"]["<|renamed|>"] = d["special_tokens"].pop(last)


@pytest.mark.parametrize(
    ("source", "change"),
    [
        (BASE_TOKENIZER, _swap_two_merges),
        (BASE_TOKENIZER, _rename_a_special),
        (ORIGINAL_TOKENIZER, _rename_an_original_special),
        (ORIGINAL_TOKENIZER, lambda d: d.update(regex_pattern=d["regex_pattern"] + "|x")),
    ],
    ids=["hf-merge-order", "hf-special-name", "original-specials", "original-regex"],
)
def test_any_change_of_merges_or_specials_changes_the_fingerprint(
    tmp_path: Path, source: Path, change
) -> None:
    document = json.loads(source.read_text())
    before = Tokenizer.from_file(source).fingerprint
    change(document)
    (tmp_path / "changed.json").write_text(json.dumps(document))
    after = Tokenizer.from_file(tmp_path / "changed.json")
    assert after.fingerprint != before


# --------------------------------------------------------------------------------------------- loading errors


def _merge_of_unknown_token(d: dict) -> None:
    d["model"]["merges"][5] = ["Ġ", "zz"]


def _merge_making_unknown_token(d: dict) -> None:
    d["model"]["merges"][5] = ["t", "q"]  # both known bytes, but "tq" is no token


def _bad_hf_regex(d: dict) -> None:
    d["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(abc"


def _bad_original_regex(d: dict) -> None:
    d["regex_pattern"] = "[a-"


@pytest.mark.parametrize(
    ("source", "damage", "message"),
    [
        (
            BASE_TOKENIZER,
            _merge_of_unknown_token,
            "is damaged: merge 6 (['Ġ', 'zz']) names b'zz', which is not in",
        ),
        (
            BASE_TOKENIZER,
            _merge_making_unknown_token,
            "is damaged: merge 6 (['t', 'q']) names b'tq', which is not",
        ),
        (BASE_TOKENIZER, _bad_hf_regex, "is damaged: its pre-tokenizer regex '(abc' does not compile"),
        (ORIGINAL_TOKENIZER, _bad_original_regex, "its regex_pattern: regex '[a-' does not compile"),
    ],
    ids=["hf-merge-names-unknown", "hf-merge-makes-unknown", "hf-regex", "original-regex"],
)
def test_files_broken_inside_are_refused_on_load(tmp_path: Path, source: Path, damage, message: str) -> None:
    document = json.loads(source.read_text())
    damage(document)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(document))
    with pytest.raises(TalmError) as err:
        Tokenizer.from_file(path)
    text = str(err.value)
    assert text.startswith(f"{str(path)!r} ") and message in text and "\n" not in text


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TalmError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(TalmError, match="not a file"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TalmError, match="not a tokenizer"):
        Tokenizer.from_file(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(TalmError, match="not a tokenizer"):
        Tokenizer.from_file(tmp_path / "other.json")
    document = json.loads(ORIGINAL_TOKENIZER.read_text())
    del document["vocab"][base64.b64encode(b"A").decode()]
    (tmp_path / "gap.json").write_text(json.dumps(document))
    with pytest.raises(TalmError, match="not a valid original"):
        Tokenizer.from_file(tmp_path / "gap.json")
