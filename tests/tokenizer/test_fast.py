"""The fast engine (talm.tokenizer.fast): tiktoken gives exactly HF's ids, and is refused where it would not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHAKESPEARE
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_cases import BASE, BOTH, ORIGINAL, SAMPLES, hf_ids, varied_documents

from talm.tokenizer.api import Tokenizer
from talm.tokenizer.config import SPECIAL_TOKENS
from talm.tokenizer.fast import merges_match_ranks
from talm.tokenizer.formats import build_hf_bpe, parse_hf

# ---------------------------------------------------------------------------------- fast engine == HF's ids


def test_fast_engine_is_used_for_talm_files() -> None:
    assert BASE._tiktoken is not None


@settings(max_examples=400, deadline=None)
@given(text=st.text(max_size=300))
def test_fast_ids_equal_hf_ids_any_text(text: str) -> None:
    assert BASE.encode(text) == hf_ids(BASE, text)
    assert BASE.encode(text, allow_special=True) == BASE._hf_with_specials.encode(text).ids


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_original_format_matches_its_hf_conversion(text: str) -> None:
    assert ORIGINAL.encode(text) == hf_ids(ORIGINAL, text)


@BOTH
def test_encode_batch_equals_hf_onvaried_documents(tok: Tokenizer) -> None:
    docs = varied_documents(3000)
    got = tok.encode_batch(docs)
    want = tok._hf.encode_batch(docs, add_special_tokens=False)
    assert len(got) == len(docs)
    for doc, ids, ref in zip(docs, got, want, strict=True):
        assert ids.dtype == tok.token_dtype
        assert ids.tolist() == ref.ids, doc[:80]


# -------------------------------------------------------------------------- merge order vs rank order


def _tiny_tokenizer(merges: list[tuple[bytes, bytes]]) -> Tokenizer:
    token_bytes = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    specials = {s: len(token_bytes) + i for i, s in enumerate(SPECIAL_TOKENS)}
    text = build_hf_bpe(token_bytes, merges, specials, r"\p{L}+|\s+|[^\s\p{L}]+").to_str()
    return Tokenizer(parse_hf(json.loads(text), text, None))


def test_merges_disagreeing_with_ranks_fall_back_to_hf() -> None:
    # HF applies (b,c) then has no merge for (a, bc); tiktoken's rank rule would merge a+bc -> "abc".
    tok = _tiny_tokenizer([(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert not merges_match_ranks(tok._merges, tok._ranks)
    assert tok._tiktoken is None
    assert tok.encode("abc") == hf_ids(tok, "abc") == [ord("a"), 256]
    assert [a.tolist() for a in tok.encode_batch(["abc", "xabcx"])] == [[97, 256], hf_ids(tok, "xabcx")]
    assert tok.decode(tok.encode("abc cab")) == "abc cab"
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"  # lone surrogates, as on the fast engine
    assert tok.decode(tok.encode_batch(["c", "a\udc00b"])[1]) == "a\ufffdb"
    with pytest.raises(TypeError):
        tok.encode_batch(["ok", b"bytes"])  # type: ignore[list-item]


def test_consistent_merges_use_the_fast_engine() -> None:
    tok = _tiny_tokenizer([(b"a", b"b"), (b"ab", b"c"), (b"b", b"c")])
    assert tok._tiktoken is not None
    for text in ["abc", "bcab", "abcbc cbabc", "aabbcc"]:
        assert tok.encode(text) == hf_ids(tok, text)


def _foreign_hf_file(path: Path, specials_first: bool) -> Path:
    """A byte-level BPE trained by HF the usual way (GPT-2 style: ByteLevel's own regex), not by talm."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials if specials_first else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([SHAKESPEARE.read_text(encoding="utf-8")[:100_000]], trainer)
    if not specials_first:
        hf.add_special_tokens(specials)
    hf.save(str(path))
    return path


def test_foreign_hf_byte_level_bpe_is_encoded_by_hf(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(_foreign_hf_file(tmp_path / "gpt2like.json", specials_first=False))
    assert tok._tiktoken is None  # not talm's pipeline: HF encodes it
    assert tok.special_tokens == {"<|endoftext|>": 400, "<|pad|>": 401} and tok.eot_id == 400
    for text in SAMPLES:
        assert tok.encode(text) == hf_ids(tok, text)
        assert tok.decode(tok.encode(text)) == text
    # Special tokens first (as SmolLM's): loads too, encoded by HF (--init-from reads such files).
    first = Tokenizer.from_file(_foreign_hf_file(tmp_path / "first.json", specials_first=True))
    assert first._tiktoken is None and first.special_tokens == {"<|endoftext|>": 0, "<|pad|>": 1}
    for text in SAMPLES:
        assert first.encode(text) == hf_ids(first, text) and first.decode(first.encode(text)) == text


def test_encode_batch_on_an_explicit_number_of_threads() -> None:
    import threading

    docs = varied_documents(400, seed=5)
    default = [ids.tolist() for ids in BASE.encode_batch(docs)]
    for n in (1, 3):
        assert [ids.tolist() for ids in BASE.encode_batch(docs, num_threads=n)] == default
    assert sum(t.name.startswith("talm-encode") for t in threading.enumerate()) >= 3  # the 3-thread pool
