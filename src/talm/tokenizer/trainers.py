"""The two BPE trainers behind `talm.tokenizer.train`, each giving the same thing: the ordinary tokens' bytes
in talm's id order (bytes 0..255, then merged tokens in learned order) and the HF merge list.

- rustbpe (the default where its wheel installs): the Rust trainer nanochat uses, ~2x Hugging Face's. It runs
  in a child process: its merge loop holds the GIL for seconds to minutes, so in-process a Ctrl-C would wait
  for the end of training; the parent stays free to answer it and stops the child.
- Hugging Face `tokenizers`' BpeTrainer: the fallback where rustbpe is not installed (no wheel for the platform).

Both read the text with `read_text_blocks` (bounded memory, cut where the regex split is unchanged) and split it
with SPLIT_PATTERN, and `train.py` writes what either gives in one format. Imports no torch.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from talm.errors import TalmError
from talm.tokenizer import rustbpe_worker
from talm.tokenizer.config import Trainer
from talm.tokenizer.fast import tiktoken_bpe
from talm.tokenizer.formats import SPLIT_PATTERN, hf_merges, split_pre_tokenizer
from talm.tokenizer.textfiles import progress_stream

Learned = tuple[list[bytes], list[tuple[bytes, bytes]]]  # (token bytes in id order, merges in learned order)


def rustbpe_available() -> bool:
    return importlib.util.find_spec("rustbpe") is not None


def resolve(trainer: Trainer) -> Literal["rustbpe", "huggingface"]:
    """The trainer `trainer` names ("auto": rustbpe when installed, else Hugging Face's)."""
    if trainer == "auto":
        return "rustbpe" if rustbpe_available() else "huggingface"
    if trainer == "rustbpe" and not rustbpe_available():
        raise TalmError(
            "the rustbpe trainer is not installed: `pip install rustbpe`, or pass --trainer huggingface"
        )
    return trainer


# ------------------------------------------------------------------------------------------------- rustbpe


def rank_consistent(ranked: list[bytes]) -> Learned:
    """talm's vocabulary from rustbpe's tokens in rank order, with each token's merge as tiktoken's rank rule
    builds it (the split rustbpe used is not exported; this one is what tiktoken encodes with).

    A token that repeats an earlier one (the same bytes learned from two different pairs) or that the rank
    rule cannot build from two earlier tokens is left out, so the merges always pass `merges_match_ranks`
    and tiktoken encodes the file. Neither has been seen on real text; the vocabulary is then one smaller.
    """
    token_bytes = [bytes([b]) for b in range(256)]
    ranks = {token: i for i, token in enumerate(token_bytes)}
    merges: list[tuple[bytes, bytes]] = []
    for token in ranked[256:]:
        if token in ranks:
            continue
        parts = tiktoken_bpe(token, ranks, len(ranks))
        if len(parts) != 2:
            continue
        ranks[token] = len(token_bytes)
        token_bytes.append(token)
        merges.append((parts[0], parts[1]))
    return token_bytes, merges


def learn_rustbpe(files: list[Path], n_ordinary: int, block_bytes: int, progress: bool) -> Learned:
    """Train with rustbpe in a child process; `n_ordinary` counts the 256 byte tokens."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=rustbpe_worker.train,
        args=(send, files, n_ordinary, SPLIT_PATTERN, block_bytes, progress),
        name="talm-rustbpe",
        daemon=True,
    )
    child.start()
    send.close()
    try:
        while not receive.poll(0.1):
            if not child.is_alive() and not receive.poll(0):
                raise TalmError(
                    f"the rustbpe trainer stopped without a result (exit code {child.exitcode}): "
                    "retry, or pass --trainer huggingface"
                )
        status, result = receive.recv()
    except BaseException:
        child.kill()  # Ctrl-C or a failure: nothing has been written yet
        raise
    finally:
        receive.close()
        child.join()
    if status == "error":
        raise result
    return rank_consistent(result)


# -------------------------------------------------------------------------------------------- Hugging Face


def learn_huggingface(files: list[Path], n_ordinary: int, block_bytes: int, progress: bool) -> Learned:
    """Train with HF's BpeTrainer (in a thread, so Ctrl-C is answered at once) and lay its result out in
    talm's ids: HF numbers its alphabet by character, not byte."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tqdm import tqdm

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = split_pre_tokenizer(SPLIT_PATTERN)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_ordinary, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    stop = threading.Event()
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        stream = progress_stream(files, block_bytes, bar, stop)
        _run_interruptibly(lambda: hf.train_from_iterator(stream, trainer=trainer), stop)
    merges = hf_merges(json.loads(hf.to_str())["model"]["merges"])
    token_bytes = [bytes([b]) for b in range(256)]
    known = set(token_bytes)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            token_bytes.append(left + right)
    return token_bytes, merges  # type: ignore[return-value]


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


LEARN = {"rustbpe": learn_rustbpe, "huggingface": learn_huggingface}
# Whether a trainer's merges always pass fast.merges_match_ranks (rustbpe's go through rank_consistent), so the
# tokenizer it makes can skip that check (~0.5 s at vocab 32768).
FOLLOWS_RANKS = {"rustbpe": True, "huggingface": False}
