"""The Tokenizer's public surface (talm.tokenizer.api): round trips on both file formats, batches,
pickling, special tokens, id layout, decode, dtypes, saving."""

from __future__ import annotations

import base64
import json
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE_TOKENIZER, ORIGINAL_TOKENIZER, SHAKESPEARE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_cases import BASE, BOTH, ORIGINAL, SAMPLES, varied_documents

from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.config import SPECIAL_TOKENS
from talm.tokenizer.fast import DOC_SEPARATOR

# ------------------------------------------------------------------------------------------------- round trip


@BOTH
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_round_trip_any_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_batch([text])[0]) == text


@BOTH
@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.one_of(
            st.sampled_from([*SPECIAL_TOKENS, "<|", "|>", " ", "\n", "😀", "e\u0301"]), st.text(max_size=20)
        ),
        max_size=12,
    )
)
def test_round_trip_with_special_spellings(tok: Tokenizer, parts: list[str]) -> None:
    text = "".join(parts)
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())  # spellings are ordinary text by default
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text


@BOTH
@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_shakespeare() -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    for tok in (BASE, ORIGINAL):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8")) / 2  # the BPE actually compresses


def test_lone_surrogates_become_replacement_characters() -> None:
    text = "a\ud800b\udfffc"  # not valid Unicode text: no UTF-8 exists for it
    for tok in (BASE, ORIGINAL):
        assert tok.decode(tok.encode(text)) == "a\ufffdb\ufffdc"
        assert tok.decode(tok.encode_batch(["ok", text])[1]) == "a\ufffdb\ufffdc"
    # an escaped surrogate *pair* is the character it encodes
    assert BASE.decode(BASE.encode("x\ud83d\ude00y")) == "x😀y"


def test_encode_batch_edge_cases() -> None:
    assert BASE.encode_batch([]) == []
    docs = ["", "", "a", "", DOC_SEPARATOR, "x" + DOC_SEPARATOR + "y", "<|endoftext|>", ""]
    for batch in (docs, docs * 5000):  # one call, and many threaded groups
        got = BASE.encode_batch(batch)
        assert [ids.tolist() for ids in got] == [BASE.encode(d) for d in batch]
        assert all(ids.dtype == np.uint16 for ids in got)


def test_encode_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        BASE.encode_batch(["ok", b"bytes"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        BASE.encode(None)  # type: ignore[arg-type]


@BOTH
def test_pickles_for_worker_processes(tok: Tokenizer) -> None:
    tok.encode("warm the engines up")
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.fingerprint == tok.fingerprint and copy.vocab_size == tok.vocab_size
    assert copy.encode_batch(SAMPLES)[5].tolist() == tok.encode(SAMPLES[5])
    assert len(pickle.dumps(tok)) < 2 * tok.path.stat().st_size + 100_000


def test_encode_batch_in_a_forked_child_after_use_in_the_parent() -> None:
    docs = varied_documents(200) * 20  # large enough for the thread pool
    want = [a.tolist() for a in BASE.encode_batch(docs)]  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_encode_in_child, (docs,)).get(timeout=60)  # would hang on the parent's pool
    assert got == want


def _encode_in_child(docs: list[str]) -> list[list[int]]:
    return [a.tolist() for a in BASE.encode_batch(docs)]


def test_encode_batch_accepts_any_sequence() -> None:
    docs = ("to be", "or not")
    assert [a.tolist() for a in BASE.encode_batch(docs)] == [BASE.encode(d) for d in docs]


# ---------------------------------------------------------------------------------------- special tokens


@BOTH
def test_special_tokens(tok: Tokenizer) -> None:
    assert set(tok.special_tokens) == set(SPECIAL_TOKENS)
    assert tok.eot_id == tok.special_tokens["<|endoftext|>"]
    assert sorted(tok.special_tokens.values()) == list(range(tok.vocab_size - 4, tok.vocab_size))
    ids = tok.encode("a<|endoftext|>b<|user|>", allow_special=True)
    assert tok.eot_id in ids and tok.special_tokens["<|user|>"] in ids
    assert tok.decode(ids) == "a<|endoftext|>b<|user|>"
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.eot_id not in tok.encode("<|endoftext|>")


def test_base_layout() -> None:
    assert BASE.vocab_size == 1024
    assert BASE.special_tokens == {s: 1020 + i for i, s in enumerate(SPECIAL_TOKENS)}
    assert [BASE.decode([b]).encode("utf-8") for b in range(128)] == [bytes([b]) for b in range(128)]
    assert BASE.name == "base" and BASE.path == BASE_TOKENIZER


def test_original_fixture_keeps_its_ids() -> None:
    document = json.loads(ORIGINAL_TOKENIZER.read_text())
    assert ORIGINAL.vocab_size == len(document["vocab"]) + len(document["special_tokens"])
    assert ORIGINAL.special_tokens == document["special_tokens"]
    assert ORIGINAL.name == document["name"]
    ranks = {base64.b64decode(k): v for k, v in document["vocab"].items()}
    assert ORIGINAL.encode(" the") == [ranks[b" the"]]


def test_decode_accepts_lists_and_any_int_array() -> None:
    ids = BASE.encode("To be, or not to be")
    forms = (ids, np.array(ids, dtype=np.uint16), np.array(ids, dtype=np.int64), tuple(ids), np.int32(ids))
    for form in forms:
        assert BASE.decode(form) == "To be, or not to be"
    assert BASE.decode([]) == ""
    assert BASE.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte character is replaced, never raises
    with pytest.raises(ValueError, match="outside"):
        BASE.decode([BASE.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        BASE.decode([-1])


def test_to_hf_gives_the_same_ids() -> None:
    text = "KING RICHARD III:\nNow is the winter of our discontent<|endoftext|>😀 e\u0301"
    for tok in (BASE, ORIGINAL):
        hf = tok.to_hf()
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, allow_special=True)
        assert hf.get_vocab_size() == tok.vocab_size


# --------------------------------------------------------------------------------------------------- dtypes


def _synthetic_original(path: Path, n_ordinary: int, last: bytes = b"ab") -> Path:
    """An original-format file with `n_ordinary` tokens: bytes, then 2-byte tokens, `last` ranked last."""
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
    triples = [bytes([a, b, c]) for a in range(97, 123) for b in range(97, 123) for c in range(97, 123)]
    longer = [t for t in pairs + triples if t != last]
    tokens = [bytes([b]) for b in range(256)] + longer[: n_ordinary - 257] + [last]
    document = {
        "name": path.stem,
        "regex_pattern": r"\p{L}+|\s+|[^\s\p{L}]+",
        "vocab": {base64.b64encode(t).decode(): i for i, t in enumerate(tokens)},
        "special_tokens": {s: n_ordinary + i for i, s in enumerate(SPECIAL_TOKENS)},
    }
    path.write_text(json.dumps(document))
    return path


def test_dtype_uint32_beyond_65536_ids(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(_synthetic_original(tmp_path / "big.json", 70_000))
    assert tok.vocab_size == 70_004 and tok.token_dtype == np.uint32
    (ids,) = tok.encode_batch(["ab"])
    assert ids.dtype == np.uint32 and ids.tolist() == [69_999]  # an id that uint16 would truncate
    assert tok.decode(ids) == "ab"
    assert tok.encode_batch(["x<|endoftext|>"])[0].dtype == np.uint32


def test_dtype_uint16_up_to_65536_ids(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(_synthetic_original(tmp_path / "edge.json", 65_536 - 4))
    assert tok.vocab_size == 65_536 and tok.token_dtype == np.uint16
    assert tok.encode_batch(["ab"])[0].tolist() == [65_531]
    assert BASE.token_dtype == np.uint16


def test_save_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    out.write_text("precious")
    with pytest.raises(TalmError, match="already exists"):
        BASE.save(out)
    assert out.read_text() == "precious"
    BASE.save(out, overwrite=True)
    assert out.read_bytes() == BASE_TOKENIZER.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temp files left behind


def test_save_failure_is_one_line_naming_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("precious")
    for target in (blocker / "t.json", blocker / "sub" / "t.json"):  # the folder is a file
        with pytest.raises(
            TalmError, match=r"cannot write .*t\.json.*: free some space or fix its permissions"
        ):
            BASE.save(target)
    assert blocker.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
