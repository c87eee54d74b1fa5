"""Training a tokenizer: a byte-level BPE learned by Hugging Face `tokenizers` from streamed text files, then
laid out in talm's id order (bytes, merges in learned order, specials) and written to tokenizers/NAME.json.

`train` is the in-memory trainer; `train_file` is what `train_tokenizer` runs: every check first (vocab size,
text files, output file), then training, then the atomic write. Imports no torch and no datasets.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from talm.errors import TalmError
from talm.files import check_output_file
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.config import SPECIAL_TOKENS, vocab_size_problem
from talm.tokenizer.formats import SPLIT_PATTERN, build_hf_bpe, hf_merges, parse_hf, split_pre_tokenizer
from talm.tokenizer.textfiles import READ_BLOCK_BYTES, check_text_files, read_text_blocks

if TYPE_CHECKING:
    import tokenizers

TOKENIZER_DIR = Path("tokenizers")  # where train_tokenizer writes NAME.json (relative to the project root)
_COMPRESSION_SAMPLE_BYTES = 8 << 20  # bytes/token is measured on (up to) the first 8 MB of training text


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
) -> tuple[Tokenizer, TrainStats]:
    """Train on the files and write directory/NAME.json atomically (refusing an existing one unless
    `overwrite`). Everything is checked before training starts; the tokenizer's `path` is the written file."""
    files = _check_inputs(text_files, vocab_size)
    out = output_path(name, overwrite=overwrite, directory=directory)
    tokenizer, stats = _train(files, vocab_size, name, progress, READ_BLOCK_BYTES)
    tokenizer.save(out, overwrite=overwrite)
    return tokenizer, stats


def train(
    text_files: Sequence[str | os.PathLike[str]],
    vocab_size: int,
    *,
    name: str = "tokenizer",
    progress: bool = True,
    block_bytes: int = READ_BLOCK_BYTES,
) -> tuple[Tokenizer, TrainStats]:
    """Train a byte-level BPE on the files (streamed) with `vocab_size` ids in total, specials included.

    The returned tokenizer lives in memory (`path` None); `save` writes it. The vocabulary can come out smaller
    than asked when the text has no more pairs to merge.
    """
    return _train(_check_inputs(text_files, vocab_size), vocab_size, name, progress, block_bytes)


def _train(
    files: list[Path], vocab_size: int, name: str, progress: bool, block_bytes: int
) -> tuple[Tokenizer, TrainStats]:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tqdm import tqdm

    total_bytes = sum(p.stat().st_size for p in files)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = split_pre_tokenizer(SPLIT_PATTERN)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample: list[str] = []
    sample_bytes = 0
    stop = threading.Event()

    def stream() -> Iterator[str]:
        nonlocal sample_bytes
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
            for path in files:
                for text, n_bytes in read_text_blocks(path, block_bytes=block_bytes):
                    if stop.is_set():
                        raise KeyboardInterrupt  # ends the abandoned training thread at its next read
                    bar.update(n_bytes)
                    if sample_bytes < _COMPRESSION_SAMPLE_BYTES:
                        sample.append(text)
                        sample_bytes += len(text.encode("utf-8"))
                    if text:
                        yield text
            bar.set_description(f"read {bar.n / 1e6:.0f} MB, now learning {vocab_size} tokens")

    start = time.perf_counter()
    _run_interruptibly(lambda: hf.train_from_iterator(stream(), trainer=trainer), stop)
    tokenizer = _relayout(hf, name)
    seconds = time.perf_counter() - start
    sample_tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    sample_bytes = sum(len(s.encode("utf-8")) for s in sample)
    return tokenizer, TrainStats(total_bytes, seconds, sample_bytes, sample_tokens)


def _run_interruptibly(work: Callable[[], object], stop: threading.Event) -> None:
    """Run `work` in a daemon thread while the main thread waits, so Ctrl-C is handled at once.

    HF's trainer pulls the text iterator from its own Rust threads, so a SIGINT would otherwise wait for the
    whole training to finish. On Ctrl-C, `stop` tells the reader to end the abandoned thread and the
    KeyboardInterrupt goes up; nothing has been written yet.
    """
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as err:  # handed to the main thread below
            failure.append(err)

    thread = threading.Thread(target=target, name="talm-train-tokenizer", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        stop.set()
        raise
    if failure:
        raise failure[0]


def _relayout(trained: tokenizers.Tokenizer, name: str) -> Tokenizer:
    """Rebuild a trained HF BPE in talm's id layout: bytes 0..255 in byte order, merged tokens in merge order,
    then the special tokens. (HF's trainer numbers its alphabet by character, not byte.)"""
    merges = hf_merges(json.loads(trained.to_str())["model"]["merges"])
    token_bytes = [bytes([b]) for b in range(256)]
    known = set(token_bytes)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            token_bytes.append(left + right)
    specials = {s: len(token_bytes) + i for i, s in enumerate(SPECIAL_TOKENS)}
    hf = build_hf_bpe(token_bytes, merges, specials, SPLIT_PATTERN)  # type: ignore[arg-type]
    text = hf.to_str(pretty=True)
    tokenizer = Tokenizer(parse_hf(json.loads(text), text, None))
    tokenizer.name = name
    return tokenizer
