"""The data stage: resolve the source, then read -> tokenize -> write shards, holding the directory's lock.

`prepare(cfg)` is everything `download_data` does (for one worker): it loads the tokenizer, resolves the source
(sources.py), and runs `write_shards`, which overlaps reading the stream (streaming.py), tokenizing on
--num-proc threads (default: every core) and writing shards (writer.py) in three threads. A Python caller of
`prepare` gets exactly what the command line gets, minus the printing.

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from talm.data.config import DownloadConfig
from talm.data.conversations import ConversationEncoder, MalformedRows, json_kind
from talm.data.manifest import lock_name
from talm.data.preferences import PreferenceEncoder
from talm.data.sources import resolve_source
from talm.data.streaming import SourceDataError, TextStream
from talm.data.writer import ShardWriter, TokenBatch
from talm.errors import TalmError
from talm.files import RunLock, check_writable_dir

BATCH_BYTES = 4 << 20  # text per tokenizer call: large enough to use every core, small enough to bound memory
PROGRESS_INTERVAL_S = 30.0  # without a terminal (a log file), one progress line this often

# ------------------------------------------------------------------------------------------------ pipeline


def tokenize_batch(
    tokenizer: Any,
    texts: list[str | None],
    utf8_bytes: np.ndarray,
    state_before: dict,
    num_threads: int | None = None,
) -> TokenBatch:
    """Encode a batch of texts (on `num_threads` threads, default every core, via `Tokenizer.encode_batch`);
    empty or null texts become zero-length documents, so the writer can count them."""
    keep = [i for i, t in enumerate(texts) if t]
    kept = texts if len(keep) == len(texts) else [texts[i] for i in keep]
    arrays = tokenizer.encode_batch(kept, num_threads=num_threads) if kept else []
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    doc_tokens = np.zeros(len(texts), dtype=np.int64)
    doc_tokens[keep] = lengths + 1
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=tokenizer.token_dtype)
    # one vectorised insert of an eot before every document (not a Python list of 2N pieces)
    tokens = np.insert(flat, np.cumsum(lengths) - lengths, tokenizer.eot_id)
    return TokenBatch(tokens.astype(tokenizer.token_dtype, copy=False), doc_tokens, utf8_bytes, state_before)


class TextEncoder:
    """`tokenize_batch` of a batch's texts (the default `encode` of `write_shards`); a row whose value is not
    text (a number, a list: local JSON rows keep their own types) is malformed: skipped, counted and named."""

    def __init__(self, tokenizer: Any, num_threads: int | None = None, column: str = "text") -> None:
        self.tokenizer, self.num_threads, self.column = tokenizer, num_threads, column
        self.valid = 0
        self.malformed = MalformedRows()

    def __call__(self, batch: Any, state_before: dict) -> TokenBatch:
        texts = batch.texts
        bad = [i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)]
        if bad:
            texts = list(texts)
            for i in bad:
                where = (
                    batch.places[i] if batch.places else f"document {self.valid + self.malformed.count + 1}"
                )
                self.malformed.add(where, f"{self.column!r} holds {json_kind(texts[i])}, not text")
                texts[i] = None
        self.valid += sum(1 for t in texts if t)
        return tokenize_batch(self.tokenizer, texts, batch.utf8_bytes, state_before, self.num_threads)

    def no_valid_document(self, source: Any) -> TalmError:
        """The refusal when the whole source held no text, only malformed rows."""
        return TalmError(
            f"{source.source} held no text: {self.malformed.count:,} malformed rows skipped (the first: "
            f"{self.malformed.first[0]}): pass the column holding the text with --text-column"
        )


@dataclass
class WriteStats:
    """What one run of `write_shards` did, for the summary line."""

    tokens: int  # tokens written to shards by this run
    documents: int  # documents written by this run
    empty_documents: int  # documents without text, skipped
    text_bytes: int  # UTF-8 text read by this run
    seconds: float
    malformed: int = 0  # documents skipped because their row was malformed (counted in empty_documents too)
    first_malformed: list[str] = field(default_factory=list)  # the first few, each named by place and why

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


class _End:
    """Marks the end of a stage's output (with the exception that ended it, if any)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _End()


def write_shards(
    stream: Any,
    tokenizer: Any,
    writer: ShardWriter,
    *,
    batch_bytes: int | None = None,
    queue_batches: int = 3,
    progress: bool = True,
    encode: Callable[[Any, dict], TokenBatch] | None = None,
    progress_lines: bool = False,
    num_threads: int | None = None,
) -> WriteStats:
    """Stream -> tokens -> shards, with reading, tokenizing (on `num_threads` threads) and writing overlapped
    in three threads. `progress` shows a tqdm bar; `progress_lines` instead prints a line to stderr every
    PROGRESS_INTERVAL_S (for logs, where a bar would be one endless line).

    Memory is bounded by the queues: at most `queue_batches` batches of `batch_bytes` text wait at each stage,
    and shards go to disk as they fill. Resumes from `writer.resume_state` when the writer was loaded from an
    interrupted run. `encode` turns a batch (`streaming.TextBatch`) into tokens (default: `TextEncoder`,
    `tokenize_batch` of texts on `num_threads` encoder threads; conversations: `ConversationEncoder`).
    """
    from tqdm import tqdm

    encode = encode or TextEncoder(tokenizer, num_threads)
    tokenizer.encode_batch(["build the engine here, not in the tokenizing thread"], num_threads=1)
    if writer.resume_state is not None:
        stream.load_state_dict(writer.resume_state)
    texts_q: queue.Queue = queue.Queue(maxsize=queue_batches)
    tokens_q: queue.Queue = queue.Queue(maxsize=queue_batches)
    stop = threading.Event()

    def read() -> None:
        try:
            before = stream.state_dict()
            for batch in stream.batches(batch_bytes or BATCH_BYTES):
                if not _put(texts_q, (batch, before), stop):
                    return
                before = batch.state
            _put(texts_q, _End(), stop)
        except BaseException as err:  # handed to the main thread, which raises it
            _put(texts_q, _End(err), stop)

    def tokenize() -> None:
        try:
            while True:
                item = _get(texts_q, stop)
                if isinstance(item, _End):
                    _put(tokens_q, item, stop)
                    return
                batch, before = item
                encoded = encode(batch, before)
                if batch.ends_val:
                    encoded = dataclasses.replace(encoded, ends_val=True)
                if not _put(tokens_q, (encoded, int(batch.utf8_bytes.sum()), len(batch.texts)), stop):
                    return
        except BaseException as err:
            _put(tokens_q, _End(err), stop)

    threads = [
        threading.Thread(target=read, name="talm-read", daemon=True),
        threading.Thread(target=tokenize, name="talm-tokenize", daemon=True),
    ]
    start = time.perf_counter()
    before = writer.state_dict()["totals"]
    read_docs = text_bytes = 0
    total = None
    if writer.max_tokens is not None and writer.val_tokens is not None:
        total = writer.max_tokens + writer.val_tokens - before["tokens"]
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress, smoothing=0.1
    )
    next_line = start + PROGRESS_INTERVAL_S
    for t in threads:
        t.start()
    try:
        while True:
            item = _get(tokens_q, stop)
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                writer.finish()
                break
            encoded, n_bytes, n_docs = item
            done = writer.add(encoded)
            read_docs += n_docs
            text_bytes += n_bytes
            bar.update(len(encoded.tokens))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{read_docs:,} docs, {text_bytes / 1e6 / elapsed:.1f} MB/s", refresh=False)
            if progress_lines and time.perf_counter() >= next_line:
                next_line = time.perf_counter() + PROGRESS_INTERVAL_S
                _progress_line(bar.n, total, read_docs, text_bytes, elapsed)
            if done:
                break
    finally:
        stop.set()
        bar.close()
        writer.close()  # a shard still being written when the run stops is dropped (the next run makes it)
        for t in threads:
            t.join(timeout=5)
    return _stats(writer, before, text_bytes, time.perf_counter() - start, encode)


def _stats(writer: ShardWriter, before: dict, text_bytes: int, seconds: float, encode: Any) -> WriteStats:
    """What this run of `write_shards` did, from the writer's totals before and after it and the encoder's
    tally of malformed rows (if it keeps one)."""
    after = writer.state_dict()["totals"]
    malformed = getattr(encode, "malformed", None) or MalformedRows()
    return WriteStats(
        tokens=after["tokens"] - before["tokens"],
        documents=after["documents"] - before["documents"],
        empty_documents=after["empty_documents"] - before["empty_documents"],
        text_bytes=text_bytes,
        seconds=seconds,
        malformed=malformed.count,
        first_malformed=list(malformed.first),
    )


def _progress_line(tokens: int, total: int | None, docs: int, text_bytes: int, elapsed: float) -> None:
    share = f" of {total:,} ({tokens / total:.0%})" if total else ""
    print(
        f"download_data: {tokens:,}{share} tokens, {docs:,} documents, {text_bytes / 1e6:,.0f} MB of text in "
        f"{elapsed:.0f} s ({text_bytes / 1e6 / elapsed:.1f} MB/s)",
        file=sys.stderr,
        flush=True,
    )


# ------------------------------------------------------------------------------------------------ the stage


@dataclass
class PrepareResult:
    """Outcome of `prepare`: where the data is, whether this run did anything, and its figures."""

    out_dir: Path
    manifest: dict[str, Any]
    status: str  # "new", "resume" or "complete" (nothing to do)
    stats: WriteStats | None
    repaired: str | None = None  # the damaged shard this run resumed before ("shard 'x.npy' is missing")

    def split_tokens(self, split: str) -> int:
        """Tokens of a split ("train" or "val") in the directory, from the manifest."""
        return sum(s["tokens"] for s in self.manifest["shards"] if s["split"] == split)


def _share(total: int, workers: int, index: int) -> int:
    """Worker `index`'s part of `total` when split as evenly as possible."""
    return total // workers + (1 if index < total % workers else 0)


@contextmanager
def locked(out_dir: Path, tag: str) -> Iterator[None]:
    """Hold the data directory's `RunLock` (one per worker tag: the workers of a layout write disjoint files
    and may run at once) for the whole run. The lock removes its file on release, and a directory it had to
    create if the run left nothing else in it (a run refused for bad input leaves nothing behind)."""
    with RunLock(out_dir, "download_data", name=lock_name(tag)):
        yield


def prepare(cfg: DownloadConfig, *, progress: bool = True, progress_lines: bool = False) -> PrepareResult:
    """The whole data stage for one worker: resolve the source, then stream, tokenize (on `cfg.num_proc`
    threads, default every core) and shard it, holding the directory's lock. `progress`: a tqdm bar;
    `progress_lines`: a line on stderr every PROGRESS_INTERVAL_S instead (see `write_shards`)."""
    from talm.tokenizer.api import Tokenizer

    tokenizer = Tokenizer.from_file(cfg.tokenizer_path)
    source = resolve_source(cfg)
    workers, index = cfg.num_workers, cfg.worker_index
    max_tokens = None if cfg.max_tokens is None else _share(cfg.max_tokens, workers, index)
    if max_tokens == 0:
        raise TalmError(f"--max-tokens {cfg.max_tokens} is fewer than one token per worker: raise it")
    tokenizer_info = {
        "path": str(cfg.tokenizer_path),
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
    }
    header = {"dataset": source.dataset, **source.describe(), "tokenizer": tokenizer_info}
    encoder: ConversationEncoder | PreferenceEncoder | TextEncoder
    if source.preferences:
        encoder = PreferenceEncoder(tokenizer)  # checks the role tokens
        header.update(kind="preferences", loss_mask=True)
    elif source.conversations:
        encoder = ConversationEncoder(tokenizer)  # checks the role tokens
        header.update(kind="conversations", loss_mask=True)
    else:
        encoder = TextEncoder(tokenizer, cfg.num_proc, column=source.text_column)
        header["kind"] = "text"
    arguments = {
        **source.describe(),
        "tokenizer": tokenizer.fingerprint,
        "shard_size": cfg.shard_size,
        "val_tokens": cfg.val_target,
        "max_tokens": cfg.max_tokens,
        "num_workers": workers,
    }
    writer = ShardWriter(
        cfg.out_dir,
        header=header,
        arguments=arguments,
        dtype=tokenizer.token_dtype,
        shard_size=cfg.shard_size,
        val_tokens=None if cfg.val_target is None else _share(cfg.val_target, workers, index),
        max_tokens=max_tokens,
        worker_index=index,
        num_workers=workers,
    )
    check_writable_dir(cfg.out_dir, instead="pass another --data-root")  # before the lock creates it
    with locked(Path(cfg.out_dir), writer.tag):
        status = writer.open(overwrite=cfg.overwrite)
        if status == "complete":
            return PrepareResult(cfg.out_dir, writer.state_dict(), status, None)
        stream = TextStream(source, num_workers=workers, worker_index=index)
        try:
            stats = write_shards(
                stream,
                tokenizer,
                writer,
                progress=progress,
                encode=encoder,
                progress_lines=progress_lines,
                num_threads=cfg.num_proc,
            )
        except SourceDataError:
            if status == "new" and not writer.repaired:
                writer.discard()  # nothing usable came of the bad input: leave nothing behind
            raise
        except TalmError:
            if encoder.valid == 0 and encoder.malformed.count and not writer.shards:
                if isinstance(encoder, ConversationEncoder | PreferenceEncoder):
                    raise encoder.no_valid_conversation(source) from None
                raise encoder.no_valid_document(source) from None
            raise
        return PrepareResult(cfg.out_dir, writer.state_dict(), status, stats, writer.repaired)
