"""Training a tokenizer: a byte-level BPE learned from streamed text files (by rustbpe, or by Hugging Face
`tokenizers` where rustbpe is not installed: see talm.tokenizer.trainers), laid out in talm's id order (bytes,
merges in learned order, specials) and written to tokenizers/NAME.json in one format whichever trainer ran.

`train` is the in-memory trainer; `train_file` is what `train_tokenizer` runs: every check first (vocab size,
text files, output file), then training, then the atomic write. Imports no torch and no datasets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from talm.errors import TalmError
from talm.files import check_output_file
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.config import SPECIAL_TOKENS, Trainer, vocab_size_problem
from talm.tokenizer.formats import SPLIT_PATTERN, build_hf_bpe, parse_hf
from talm.tokenizer.textfiles import READ_BLOCK_BYTES, check_text_files, text_stream
from talm.tokenizer.trainers import FOLLOWS_RANKS, LEARN, resolve

TOKENIZER_DIR = Path("tokenizers")  # where train_tokenizer writes NAME.json (relative to the project root)
_COMPRESSION_SAMPLE_BYTES = 2 << 20  # bytes/token is measured on (up to) the first 2 MB of training text (a
# figure to 3 digits; encoding 8 MB cost 1.3 s of a 32k-vocab training run, docs/benchmarks.md)


@dataclass
class TrainStats:
    """What one training run did, for the summary line."""

    text_bytes: int
    seconds: float
    sample_bytes: int
    sample_tokens: int

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def bytes_per_token(self) -> float:
        return self.sample_bytes / max(self.sample_tokens, 1)


def output_path(
    name: str, *, overwrite: bool = False, directory: str | os.PathLike[str] = TOKENIZER_DIR
) -> Path:
    """Where a tokenizer called `name` is written (tokenizers/NAME.json), checked before any training: the
    folder can be created and written, the file is not a directory, and it is new unless `overwrite`."""
    out = Path(directory) / f"{name}.json"
    if out.is_dir():
        raise TalmError(f"{str(out)!r} is a directory: pick another name, or remove that directory")
    if out.exists() and not overwrite:
        raise TalmError(f"{str(out)!r} already exists: pick another name, or pass --force to overwrite it")
    return check_output_file(out, overwrite=True, instead="run train_tokenizer from another directory")


def _check_inputs(text_files: Sequence[str | os.PathLike[str]], vocab_size: int) -> list[Path]:
    problem = vocab_size_problem(vocab_size)
    if problem:
        raise TalmError(f"vocab_size={vocab_size}: {problem}")
    return check_text_files(text_files)


def train_file(
    text_files: Sequence[str | os.PathLike[str]],
    vocab_size: int,
    name: str,
    *,
    overwrite: bool = False,
    progress: bool = True,
    directory: str | os.PathLike[str] = TOKENIZER_DIR,
    trainer: Trainer = "auto",
) -> tuple[Tokenizer, TrainStats]:
    """Train on the files and write directory/NAME.json atomically (refusing an existing one unless
    `overwrite`). Everything is checked before training starts; the tokenizer's `path` is the written file."""
    files = _check_inputs(text_files, vocab_size)
    out = output_path(name, overwrite=overwrite, directory=directory)
    resolve(trainer)
    tokenizer, stats = _train(files, vocab_size, name, progress, READ_BLOCK_BYTES, trainer)
    tokenizer.save(out, overwrite=overwrite)
    return tokenizer, stats


def train(
    text_files: Sequence[str | os.PathLike[str]],
    vocab_size: int,
    *,
    name: str = "tokenizer",
    progress: bool = True,
    block_bytes: int = READ_BLOCK_BYTES,
    trainer: Trainer = "auto",
) -> tuple[Tokenizer, TrainStats]:
    """Train a byte-level BPE on the files (streamed) with `vocab_size` ids in total, specials included,
    with `trainer` ("auto": rustbpe when installed, else Hugging Face's).

    The returned tokenizer lives in memory (`path` None); `save` writes it. The vocabulary can come out smaller
    than asked when the text has no more pairs to merge.
    """
    files = _check_inputs(text_files, vocab_size)
    return _train(files, vocab_size, name, progress, block_bytes, trainer)


def _train(
    files: list[Path], vocab_size: int, name: str, progress: bool, block_bytes: int, trainer: Trainer
) -> tuple[Tokenizer, TrainStats]:
    start = time.perf_counter()
    which = resolve(trainer)
    token_bytes, merges = LEARN[which](files, vocab_size - len(SPECIAL_TOKENS), block_bytes, progress)
    tokenizer = _layout(token_bytes, merges, name, FOLLOWS_RANKS[which])
    seconds = time.perf_counter() - start
    sample = _sample(files, block_bytes)
    sample_tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    sample_bytes = sum(len(s.encode("utf-8")) for s in sample)
    total_bytes = sum(p.stat().st_size for p in files)
    return tokenizer, TrainStats(total_bytes, seconds, sample_bytes, sample_tokens)


def _sample(files: list[Path], block_bytes: int) -> list[str]:
    """The first _COMPRESSION_SAMPLE_BYTES (or so) of the training text, for the bytes/token figure."""
    sample: list[str] = []
    n_bytes = 0
    for text in text_stream(files, block_bytes):
        sample.append(text)
        n_bytes += len(text.encode("utf-8"))
        if n_bytes >= _COMPRESSION_SAMPLE_BYTES:
            break
    return sample


def _layout(
    token_bytes: list[bytes], merges: list[tuple[bytes, bytes]], name: str, follows_ranks: bool
) -> Tokenizer:
    """A trained BPE (ordinary tokens in talm's id order and the merge list) as talm's one file format: the
    HF tokenizers JSON with the special tokens after the ordinary ones, parsed as `Tokenizer.from_file` would."""
    specials = {s: len(token_bytes) + i for i, s in enumerate(SPECIAL_TOKENS)}
    hf = build_hf_bpe(token_bytes, merges, specials, SPLIT_PATTERN)
    text = hf.to_str(pretty=True)
    content = parse_hf(json.loads(text), text, None)
    content.merges_follow_ranks = follows_ranks
    tokenizer = Tokenizer(content)
    tokenizer.name = name
    return tokenizer
