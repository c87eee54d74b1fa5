"""The Tokenizer API: round trips on both file formats, the fast engine against HF's ids, specials, dtypes,
fingerprints, training determinism and streaming, and the errors a user can cause."""

from __future__ import annotations

import base64
import json
import multiprocessing
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE_TOKENIZER, ORIGINAL_TOKENIZER, SHAKESPEARE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talm.errors import TalmError
from talm.tokenizer.api import (
    _DOC_SEPARATOR,
    Tokenizer,
    _build_hf_bpe,
    _merges_match_ranks,
    read_text_blocks,
    train,
)
from talm.tokenizer.config import SPECIAL_TOKENS

BASE = Tokenizer.from_file(BASE_TOKENIZER)
ORIGINAL = Tokenizer.from_file(ORIGINAL_TOKENIZER)
BOTH = pytest.mark.parametrize("tok", [BASE, ORIGINAL], ids=["talm", "original"])

SAMPLES = [
    "",
    "Hello, world!",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n\n",
    "naïve café — “quotes” «guillemets» ½ № ™",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "combining: e\u0301 a\u0308\u0323 Z\u0351\u0345\u036b",
    "controls: \x00\x01\x07\x1b[0m\x7f\x85\u2028\u2029 tabs\t\tand\r\nCRLF\r",
    "code: def f(x):\n    return x**2  # 1234567890 3.14159\n\tif (a && b) { c++; }\n",
    "specials as text: <|endoftext|> <|user|>hi<|assistant|> <|system|> <|endoftext",
    "   leading and trailing spaces   \n  \n",
    "I'll we've they're it's DON'T WE'LL",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी",
    "\ufeffBOM and zero\u200bwidth\u200d joiners \ufffd replacement",
]


def hf_ids(tok: Tokenizer, text: str) -> list[int]:
    """The reference ids: HF's own encoder (for original files, the converted HF tokenizer)."""
    return tok._hf.encode(text, add_special_tokens=False).ids


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


def _varied_documents(n: int, seed: int = 0) -> list[str]:
    """Shakespeare slices of random lengths mixed with the multilingual / emoji / code samples."""
    rng = random.Random(seed)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    docs = []
    for _ in range(n):
        start = rng.randrange(len(text))
        doc = text[start : start + rng.choice([0, 1, 7, 150, 1000, 5000])]
        if rng.random() < 0.3:
            doc = doc + rng.choice(SAMPLES) + doc[: rng.randrange(50)]
        docs.append(doc)
    return docs


@BOTH
def test_encode_batch_equals_hf_on_varied_documents(tok: Tokenizer) -> None:
    docs = _varied_documents(3000)
    got = tok.encode_batch(docs)
    want = tok._hf.encode_batch(docs, add_special_tokens=False)
    assert len(got) == len(docs)
    for doc, ids, ref in zip(docs, got, want, strict=True):
        assert ids.dtype == tok.token_dtype
        assert ids.tolist() == ref.ids, doc[:80]


def test_encode_batch_edge_cases() -> None:
    assert BASE.encode_batch([]) == []
    docs = ["", "", "a", "", _DOC_SEPARATOR, "x" + _DOC_SEPARATOR + "y", "<|endoftext|>", ""]
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
    docs = _varied_documents(200) * 20  # large enough for the thread pool
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


# -------------------------------------------------------------------------- merge order vs rank order


def _tiny_tokenizer(merges: list[tuple[bytes, bytes]]) -> Tokenizer:
    token_bytes = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    specials = {s: len(token_bytes) + i for i, s in enumerate(SPECIAL_TOKENS)}
    text = _build_hf_bpe(token_bytes, merges, specials, r"\p{L}+|\s+|[^\s\p{L}]+").to_str()
    return Tokenizer._from_hf(json.loads(text), text, None)


def test_merges_disagreeing_with_ranks_fall_back_to_hf() -> None:
    # HF applies (b,c) then has no merge for (a, bc); tiktoken's rank rule would merge a+bc -> "abc".
    tok = _tiny_tokenizer([(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert not _merges_match_ranks(tok._merges, tok._ranks)
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
    with pytest.raises(TalmError, match="special tokens among its ordinary ids"):
        Tokenizer.from_file(_foreign_hf_file(tmp_path / "first.json", specials_first=True))


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


# ---------------------------------------------------------------------------------------------------- training


def test_shipped_base_is_reproducible(tmp_path: Path) -> None:
    """base.json is exactly what training on tiny-shakespeare at vocab 1024 writes (training is deterministic)."""
    tok, stats = train([SHAKESPEARE], 1024, name="base", progress=False)
    tok.save(tmp_path / "base.json")
    assert (tmp_path / "base.json").read_bytes() == BASE_TOKENIZER.read_bytes()
    assert stats.text_bytes == SHAKESPEARE.stat().st_size
    assert 2.0 < stats.bytes_per_token < 4.0


def test_streaming_in_small_blocks_trains_the_same_tokenizer(tmp_path: Path) -> None:
    shakespeare = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    indented = "".join(f"    {line}\n" for line in shakespeare.splitlines()[:3000])  # no newline + non-space
    text = shakespeare + "\n\n  \n日本語 😀 " * 50 + indented + "\r\n\t x1234 ½ ² \n" * 100
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    whole, _ = train([corpus], 600, progress=False, block_bytes=1 << 22)
    streamed, _ = train([corpus], 600, progress=False, block_bytes=997)  # cuts inside multi-byte characters
    assert streamed.to_hf().to_str() == whole.to_hf().to_str()


def test_read_text_blocks_covers_the_file(tmp_path: Path) -> None:
    text = "line one\n  indented\n\nünïcödé 😀\n  only indented lines here\n  and here\nlast line, no newline"
    path = tmp_path / "t.txt"
    path.write_text(text * 100, encoding="utf-8")
    blocks = list(read_text_blocks(path, block_bytes=7))
    assert "".join(b for b, _ in blocks) == text * 100
    assert sum(n for _, n in blocks) == path.stat().st_size


def test_several_files_and_small_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello hello hello world\n")
    (tmp_path / "b.txt").write_text("world wide web\n")
    tok, stats = train([tmp_path / "a.txt", tmp_path / "b.txt"], 100_000, progress=False)
    assert tok.vocab_size < 100_000  # the text runs out of pairs before the asked size
    assert tok.encode(" hello") == [tok._ranks[b" hello"]]
    assert stats.text_bytes == 39


def test_non_utf8_names_the_place(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine line\nsecond line caf\xe9\n" + b"x" * 100_000)
    with pytest.raises(TalmError, match=r"latin1.txt.*not UTF-8.*0xe9 at byte offset 25 \(line 2\)"):
        train([path], 300, progress=False)
    path.write_bytes(b"x" * 70_000 + b"\n\xf0\x9f\x98")  # truncated emoji at the very end
    with pytest.raises(TalmError, match=r"0xf0 at byte offset 70001 \(line 2\)"):
        train([path], 300, progress=False)


@pytest.mark.parametrize("vocab_size", [0, 259, 2**20 + 1])
def test_train_rejects_vocab_sizes(vocab_size: int) -> None:
    with pytest.raises(TalmError, match="vocab_size"):
        train([SHAKESPEARE], vocab_size, progress=False)


def test_save_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    out.write_text("precious")
    with pytest.raises(TalmError, match="already exists"):
        BASE.save(out)
    assert out.read_text() == "precious"
    BASE.save(out, overwrite=True)
    assert out.read_bytes() == BASE_TOKENIZER.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temp files left behind


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


def test_output_path_is_the_tokenizers_folder_convention(tmp_path: Path) -> None:
    from talm.tokenizer.api import output_path

    folder = tmp_path / "tokenizers"
    assert output_path("mine", directory=folder) == folder / "mine.json"
    assert not folder.exists()  # checked, nothing left behind
    folder.mkdir()
    (folder / "mine.json").write_text("{}")
    with pytest.raises(TalmError, match=r"already exists: pick another name, or pass --force"):
        output_path("mine", directory=folder)
    assert output_path("mine", directory=folder, overwrite=True) == folder / "mine.json"
    (folder / "d.json").mkdir()
    with pytest.raises(TalmError, match=r"d\.json' is a directory"):
        output_path("d", directory=folder, overwrite=True)
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(TalmError, match=r"is a file, not a directory"):
        output_path("t", directory=blocked / "tokenizers")
