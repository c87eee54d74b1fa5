"""The two trainers (talm.tokenizer.trainers) give tokenizers with the same guarantees: talm's id layout, the
tiktoken rank check passes (so the fast engine encodes), ids equal HF's and transformers', every round trip
holds, and the two learn nearly the same vocabulary. Also: choosing a trainer, and rustbpe's rank rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHAKESPEARE
from test_train import TRAINERS
from tokenizer_cases import SAMPLES, hf_ids, varied_documents

from talm.errors import TalmError
from talm.tokenizer import trainers
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.config import SPECIAL_TOKENS
from talm.tokenizer.fast import merges_match_ranks
from talm.tokenizer.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    path.write_text(text + "\n".join(SAMPLES * 20) + "def f(x):\n    return x ** 2\n" * 50, encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=TRAINERS)
def trained(request: pytest.FixtureRequest, corpus: Path) -> Tokenizer:
    tok, _ = train([corpus], 800, progress=False, trainer=request.param)
    return tok


def test_layout_and_specials(trained: Tokenizer) -> None:
    assert trained.vocab_size == 800
    assert trained._token_bytes[:256] == [bytes([b]) for b in range(256)]
    assert len(set(trained._token_bytes)) == len(trained._token_bytes)
    assert list(trained.special_tokens) == list(SPECIAL_TOKENS)
    assert list(trained.special_tokens.values()) == list(range(796, 800))


def test_rank_check_passes_and_fast_ids_equal_hf(trained: Tokenizer) -> None:
    assert merges_match_ranks(trained._merges, trained._ranks)
    assert trained._tiktoken is not None
    docs = varied_documents(200, seed=3) + SAMPLES
    fast = trained.encode_batch(docs)
    for doc, ids in zip(docs, fast, strict=True):
        assert ids.tolist() == hf_ids(trained, doc)
        assert trained.decode(ids) == doc


def test_saved_file_loads_in_transformers_with_the_same_ids(trained: Tokenizer, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    path = trained.save(tmp_path / "t.json")
    loaded = Tokenizer.from_file(path)
    assert loaded.fingerprint == trained.fingerprint
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(path))
    plain = [s for s in SAMPLES if "<|" not in s]  # transformers reads special spellings as the specials
    text = SHAKESPEARE.read_text(encoding="utf-8")[500_000:505_000] + "".join(plain)
    assert theirs(text)["input_ids"] == loaded.encode(text) == trained.encode(text)
    assert theirs.decode(loaded.encode(text)) == text


@pytest.mark.skipif(not trainers.rustbpe_available(), reason="rustbpe is not installed")
def test_the_trainers_learn_nearly_the_same_vocabulary(corpus: Path) -> None:
    """They differ only where pairs tie in count (each breaks ties its own way)."""
    rust, _ = train([corpus], 800, progress=False, trainer="rustbpe")
    hf, _ = train([corpus], 800, progress=False, trainer="huggingface")
    shared = set(rust._token_bytes) & set(hf._token_bytes)
    assert len(shared) >= 0.97 * len(rust._token_bytes)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:100_000]
    assert abs(len(rust.encode(text)) - len(hf.encode(text))) <= 0.01 * len(hf.encode(text))


def test_rank_rule_drops_repeated_and_unbuildable_tokens() -> None:
    byte_tokens = [bytes([b]) for b in range(256)]
    ranked = [*byte_tokens, b"ab", b"bc", b"abc", b"abc", b"xyzw", b"abcd"]
    token_bytes, merges = trainers.rank_consistent(ranked)
    # b"abc" twice: kept once; b"xyzw" has no two-token split (no "xy", "yz", "zw"): dropped
    assert token_bytes[256:] == [b"ab", b"bc", b"abc", b"abcd"]
    assert merges == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"abc", b"d")]
    assert merges_match_ranks(merges, {t: i for i, t in enumerate(token_bytes)})


def test_choosing_a_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainers, "rustbpe_available", lambda: False)
    assert trainers.resolve("auto") == "huggingface"
    assert trainers.resolve("huggingface") == "huggingface"
    with pytest.raises(TalmError, match=r"rustbpe trainer is not installed: `pip install rustbpe`"):
        train([SHAKESPEARE], 300, progress=False, trainer="rustbpe")
    monkeypatch.setattr(trainers, "rustbpe_available", lambda: True)
    assert trainers.resolve("auto") == "rustbpe"
