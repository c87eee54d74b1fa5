"""Training (talm.tokenizer.train, .trainers, .textfiles): determinism, streaming, text-file and vocab checks,
the output-path convention. Every training test runs with both trainers (rustbpe and Hugging Face's), which
must write the same format with the same guarantees."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BASE_TOKENIZER, SHAKESPEARE

from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.textfiles import read_text_blocks
from talm.tokenizer.train import output_path, train, train_file
from talm.tokenizer.trainers import rustbpe_available

TRAINERS = [
    pytest.param(
        "rustbpe", marks=pytest.mark.skipif(not rustbpe_available(), reason="rustbpe is not installed")
    ),
    "huggingface",
]


@pytest.fixture(params=TRAINERS)
def trainer(request: pytest.FixtureRequest) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------------- training


def test_shipped_base_is_reproducible(tmp_path: Path) -> None:
    """base.json is exactly what `train_tokenizer -vs 1024 -n base` writes on tiny-shakespeare (the default
    trainer, rustbpe; training is deterministic)."""
    if not rustbpe_available():
        pytest.skip("base.json is trained by rustbpe, which is not installed")
    tok, stats = train([SHAKESPEARE], 1024, name="base", progress=False)
    tok.save(tmp_path / "base.json")
    assert (tmp_path / "base.json").read_bytes() == BASE_TOKENIZER.read_bytes()
    assert stats.text_bytes == SHAKESPEARE.stat().st_size
    assert 2.0 < stats.bytes_per_token < 4.0


def test_training_is_deterministic(tmp_path: Path, trainer: str) -> None:
    first, _ = train([SHAKESPEARE], 700, progress=False, trainer=trainer)
    second, _ = train([SHAKESPEARE], 700, progress=False, trainer=trainer)
    assert first.to_hf().to_str() == second.to_hf().to_str()
    assert first.fingerprint == second.fingerprint


def test_streaming_in_small_blocks_trains_the_same_tokenizer(tmp_path: Path, trainer: str) -> None:
    shakespeare = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    indented = "".join(f"    {line}\n" for line in shakespeare.splitlines()[:3000])  # no newline + non-space
    text = shakespeare + "\n\n  \n日本語 😀 " * 50 + indented + "\r\n\t x1234 ½ ² \n" * 100
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    whole, _ = train([corpus], 600, progress=False, block_bytes=1 << 22, trainer=trainer)
    # 997-byte blocks cut inside multi-byte characters
    streamed, _ = train([corpus], 600, progress=False, block_bytes=997, trainer=trainer)
    assert streamed.to_hf().to_str() == whole.to_hf().to_str()


def test_read_text_blocks_covers_the_file(tmp_path: Path) -> None:
    text = "line one\n  indented\n\nünïcödé 😀\n  only indented lines here\n  and here\nlast line, no newline"
    path = tmp_path / "t.txt"
    path.write_text(text * 100, encoding="utf-8")
    blocks = list(read_text_blocks(path, block_bytes=7))
    assert "".join(b for b, _ in blocks) == text * 100
    assert sum(n for _, n in blocks) == path.stat().st_size


def test_several_files_and_small_text(tmp_path: Path, trainer: str) -> None:
    (tmp_path / "a.txt").write_text("hello hello hello world\n")
    (tmp_path / "b.txt").write_text("world wide web\n")
    tok, stats = train([tmp_path / "a.txt", tmp_path / "b.txt"], 100_000, progress=False, trainer=trainer)
    assert tok.vocab_size < 100_000  # the text runs out of pairs before the asked size
    assert tok.encode(" hello") == [tok._ranks[b" hello"]]
    assert stats.text_bytes == 39


def test_non_utf8_names_the_place(tmp_path: Path, trainer: str) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine line\nsecond line caf\xe9\n" + b"x" * 100_000)
    with pytest.raises(TalmError, match=r"latin1.txt.*not UTF-8.*0xe9 at byte offset 25 \(line 2\)"):
        train([path], 300, progress=False, trainer=trainer)
    path.write_bytes(b"x" * 70_000 + b"\n\xf0\x9f\x98")  # truncated emoji at the very end
    with pytest.raises(TalmError, match=r"0xf0 at byte offset 70001 \(line 2\)"):
        train([path], 300, progress=False, trainer=trainer)


@pytest.mark.parametrize("vocab_size", [0, 259, 2**20 + 1])
def test_train_rejects_vocab_sizes(vocab_size: int) -> None:
    with pytest.raises(TalmError, match="vocab_size"):
        train([SHAKESPEARE], vocab_size, progress=False)


def test_output_path_is_the_tokenizers_folder_convention(tmp_path: Path) -> None:
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


def test_train_file_checks_everything_before_training(tmp_path: Path, trainer: str) -> None:
    folder = tmp_path / "tokenizers"
    folder.mkdir()
    (folder / "mine.json").write_text("precious")
    for text_files, vocab_size, message in [
        ([SHAKESPEARE], 259, r"vocab_size=259: must be at least 260"),
        ([tmp_path / "missing.txt"], 300, r"missing\.txt' not found"),
        ([SHAKESPEARE], 300, r"mine\.json' already exists: pick another name, or pass --force"),
    ]:
        with pytest.raises(TalmError, match=message):
            train_file(text_files, vocab_size, "mine", directory=folder, progress=False, trainer=trainer)
        assert [p.name for p in tmp_path.rglob("*")] == ["tokenizers", "mine.json"]
        assert (folder / "mine.json").read_text() == "precious"
    tok, stats = train_file(
        [SHAKESPEARE], 300, "mine", directory=folder, overwrite=True, progress=False, trainer=trainer
    )
    assert tok.path == folder / "mine.json" and Tokenizer.from_file(tok.path).fingerprint == tok.fingerprint
    assert tok.vocab_size == 300 and stats.text_bytes == SHAKESPEARE.stat().st_size
