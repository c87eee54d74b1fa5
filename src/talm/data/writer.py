"""Token shards: tokenize a text stream into .npy files plus a JSON manifest, atomically and resumably.

A data directory (data/<dataset>/<[prefix_]sample>/) holds 1-D `.npy` shards of token ids (the tokenizer's
token_dtype; every document preceded by <|endoftext|>) and a manifest `meta.json` describing them: source,
tokenizer, and per shard its split, token, document and UTF-8 byte counts. Several workers can fill one
directory (`--num-workers W --worker-index I`): each writes `meta.wIII-of-WWW.json` and shards with the same tag.

Invariants, at every instant: the manifest lists only complete shards; a shard is written to a temp file, synced
and renamed into place before the manifest that lists it is (also atomically) replaced. The manifest carries
the stream position of its last shard boundary (`resume`), so a rerun continues there and ends byte-identical
to a run that was never interrupted.

Layout of the token stream: the validation split is the first `val_tokens` of the stream, rounded up to whole
documents; training tokens follow, cut into shards of exactly `shard_size` tokens (a document may continue in
the next shard; the last shard of each split may be shorter). A document's UTF-8 bytes are shared between the
shards it spans in proportion to its tokens there, so the byte counts of a split add up exactly.

This module imports no torch.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from talm.data.config import DownloadConfig
from talm.data.corpus import SourceDataError, TextStream, resolve_source
from talm.data.manifest import (
    FORMAT,
    MANIFEST_RE,
    layout,
    manifest_name,
    shard_name,
    shard_problem,
    worker_tag,
)
from talm.errors import TalmError
from talm.files import RunLock, check_writable_dir, write_atomically

BATCH_BYTES = 4 << 20  # text per tokenizer call: large enough to use every core, small enough to bound memory


def _own_files_re(tag: str) -> re.Pattern[str]:
    """This worker's shard and temp files (never another worker's)."""
    return re.compile(
        rf"\.?(val|train){re.escape(tag)}_\d{{6}}\.npy(\.tmp)?|\.meta{re.escape(tag)}\.json\.tmp"
    )


# ------------------------------------------------------------------------------------------------ tokenizing


@dataclass
class TokenBatch:
    """Documents of one text batch as tokens: each document is <|endoftext|> followed by its ids."""

    tokens: np.ndarray  # every document of the batch, concatenated
    doc_tokens: np.ndarray  # int64 tokens per document (eot included; 0 for a document without text)
    doc_bytes: np.ndarray  # int64 UTF-8 bytes per document
    state_before: dict[str, Any]  # stream position just before the batch's first document


def tokenize_batch(
    tokenizer: Any, texts: list[str | None], utf8_bytes: np.ndarray, state_before: dict
) -> TokenBatch:
    """Encode a batch of texts (all cores, via `Tokenizer.encode_batch`); empty or null texts become
    zero-length documents, so the writer can count them."""
    keep = [i for i, t in enumerate(texts) if t]
    kept = texts if len(keep) == len(texts) else [texts[i] for i in keep]
    arrays = tokenizer.encode_batch(kept) if kept else []
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    doc_tokens = np.zeros(len(texts), dtype=np.int64)
    doc_tokens[keep] = lengths + 1
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=tokenizer.token_dtype)
    # one vectorised insert of an eot before every document (not a Python list of 2N pieces)
    tokens = np.insert(flat, np.cumsum(lengths) - lengths, tokenizer.eot_id)
    return TokenBatch(tokens.astype(tokenizer.token_dtype, copy=False), doc_tokens, utf8_bytes, state_before)


# ------------------------------------------------------------------------------------------------ writing


def _write_atomically(path: Path, write: Callable[[Any], object]) -> None:
    """`talm.files.write_atomically`, with a failure (a full disk, say) said as what to do about it."""
    try:
        write_atomically(path, write)
    except OSError as err:
        raise TalmError(
            f"could not write {str(path)!r} ({err.strerror or err}): free some disk space or fix the directory, "
            "then rerun the same command to resume after the last complete shard"
        ) from None


class ShardWriter:
    """Cuts a stream of `TokenBatch`es into shards and keeps the manifest in step.

    `header` is the manifest's fixed part (dataset, source, tokenizer, ...); `arguments` what made the data
    (a rerun with other arguments is refused); `val_tokens` / `max_tokens` are this worker's share.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        header: dict[str, Any],
        arguments: dict[str, Any],
        dtype: np.dtype | type,
        shard_size: int,
        val_tokens: int,
        max_tokens: int | None = None,
        worker_index: int = 0,
        num_workers: int = 1,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype)
        self.shard_size = shard_size
        self.val_tokens = val_tokens
        self.max_tokens = max_tokens
        self.num_workers = num_workers
        self.tag = worker_tag(worker_index, num_workers)
        self.manifest_path = self.out_dir / manifest_name(self.tag)
        self.header = {
            "format": FORMAT,
            **header,
            "dtype": self.dtype.name,
            "shard_size": shard_size,
            "worker": {"index": worker_index, "count": num_workers},
            "val_tokens": val_tokens,
            "max_tokens": max_tokens,
            "arguments": arguments,
        }
        self.shards: list[dict[str, Any]] = []
        self.complete = False
        self.split = "train" if val_tokens == 0 else "val"
        self.empty_documents = 0
        self._skip = 0  # stream tokens still to drop after resuming (they are in committed shards)
        # Resume point of the last commit: stream position before a batch + tokens of it already written.
        self._resume_state: dict[str, Any] | None = None
        self._resume_skip = 0
        self._buffer: np.ndarray | None = None
        self._filled = 0
        self._docs = 0
        self._bytes = 0
        self._split_tokens = 0  # tokens of the current split, committed + buffered
        self._train_tokens = 0
        self._created_dirs: list[Path] = []  # directories the first commit created (removed again by discard)
        self.repaired: str | None = None  # what open() found damaged and resumed before, if anything

    # ------------------------------------------------------------------------------------------ manifest

    def state_dict(self) -> dict[str, Any]:
        """The manifest: header, committed shards, and where to resume (None once complete)."""
        resume = None
        if not self.complete:
            resume = {
                "stream_state": self._resume_state,
                "skip_tokens": self._resume_skip,
                "split": self.split,
                "empty_documents": self.empty_documents,
            }
        return {
            **self.header,
            "shards": self.shards,
            "totals": {
                "tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards),
                "bytes": sum(s["bytes"] for s in self.shards),
                "empty_documents": self.empty_documents,
            },
            "resume": resume,
            "complete": self.complete,
        }

    def load_state_dict(self, manifest: dict[str, Any]) -> None:
        """Continue after the last shard of an earlier, interrupted run."""
        self.shards = list(manifest["shards"])
        self.complete = bool(manifest["complete"])
        val = [s for s in self.shards if s["split"] == "val"]
        train = [s for s in self.shards if s["split"] == "train"]
        self._train_tokens = sum(s["tokens"] for s in train)
        resume = manifest.get("resume")
        if resume:
            self.split = resume["split"]
            self.empty_documents = resume["empty_documents"]
            self._resume_state = resume["stream_state"]
            self._skip = self._resume_skip = resume["skip_tokens"]
        else:
            self.split = "train"
            self.empty_documents = manifest["totals"]["empty_documents"]
        self._split_tokens = sum(s["tokens"] for s in (val if self.split == "val" else train))

    @property
    def resume_state(self) -> dict[str, Any] | None:
        """Stream position to continue from (None: from the start)."""
        return self._resume_state

    def open(self, *, overwrite: bool = False) -> str:
        """Prepare the directory: "new", "resume" (an interrupted run with the same arguments) or "complete".

        Refuses (TalmError) a directory made with other arguments, or by a different worker layout, unless
        `overwrite`, which deletes those files first. Stray files of an interrupted run (temp files, shards the
        manifest does not list yet) are removed, so the directory again holds only what the manifest lists.
        """
        check_writable_dir(self.out_dir, instead="pass another --data-root")
        if not self.out_dir.is_dir():
            return "new"
        manifests = {p.name: p for p in self.out_dir.glob("meta*.json") if MANIFEST_RE.fullmatch(p.name)}
        others = [
            name for name in manifests if name != self.manifest_path.name and layout(name) != self.num_workers
        ]
        if others:
            if not overwrite:
                raise TalmError(
                    f"{str(self.out_dir)!r} was prepared with a different number of workers ({', '.join(sorted(others))}): "
                    "pass --overwrite to delete it and start afresh, or use another --dir-prefix"
                )
            for name in others:
                self._deletelayout(name)
        status = "new"
        if self.manifest_path.name in manifests:
            try:
                old = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise TalmError(
                    f"{str(self.manifest_path)!r} is unreadable ({err}): pass --overwrite to start afresh"
                ) from None
            changed = _differences(old.get("arguments", {}), self.header["arguments"])
            if changed and not overwrite:
                raise TalmError(
                    f"{str(self.out_dir)!r} was made with other arguments ({changed}): pass --overwrite to delete it "
                    "and start afresh, or use another --dir-prefix"
                )
            if overwrite:
                self.manifest_path.unlink()
            else:
                self.load_state_dict(old)
                status = "complete" if self.complete else "resume"
                if self._check_shards():
                    status = "resume"
        listed = {s["file"] for s in self.shards}
        own = _own_files_re(self.tag)
        for path in self.out_dir.iterdir():
            if own.fullmatch(path.name) and path.name not in listed:
                path.unlink()
        return status

    def _check_shards(self) -> bool:
        """Check every listed shard's header and size against the manifest (cheap: no token is read).

        A damaged shard (deleted, truncated, header overwritten) is repaired by resuming from the last good shard
        before it, when the manifest recorded the exact stream position after that shard: the manifest is cut
        back to it (later shards are made again, identically). True if it did so; TalmError naming the shard and
        --overwrite when that is not possible (a manifest written before positions were recorded per shard)."""
        for i, shard in enumerate(self.shards):
            path = self.out_dir / shard["file"]
            problem = shard_problem(path, int(shard["tokens"]), self.dtype)
            if problem is None:
                continue
            previous = self.shards[i - 1] if i else None
            if previous is not None and not previous.get("resume"):
                raise TalmError(
                    f"shard {str(path)!r} {problem}, and {str(self.manifest_path)!r} does not record where the "
                    "stream stood before it: pass --overwrite to delete the data directory and make it afresh"
                )
            self.repaired = f"shard {shard['file']!r} {problem}"
            if previous is None:
                self._reset()
            else:
                self.load_state_dict(
                    {"shards": self.shards[:i], "complete": False, "resume": previous["resume"]}
                )
            self._write_manifest()  # first the manifest stops listing the damaged shard, then strays go
            return True
        return False

    def _reset(self) -> None:
        """Back to an empty directory's state (no committed shard)."""
        self.shards = []
        self.complete = False
        self.split = "train" if self.val_tokens == 0 else "val"
        self.empty_documents = 0
        self._skip = self._resume_skip = 0
        self._resume_state = None
        self._split_tokens = self._train_tokens = 0

    def _deletelayout(self, manifest: str) -> None:
        """Remove another worker layout's manifest and every shard named like it."""
        match = MANIFEST_RE.fullmatch(manifest)
        assert match
        tag = "" if match.group(1) is None else f".w\\d{{3,}}-of-{match.group(2)}"
        pattern = re.compile(rf"\.?(val|train){tag}_\d{{6}}\.npy(\.tmp)?|\.?meta{tag}\.json(\.tmp)?")
        for path in self.out_dir.iterdir():
            if pattern.fullmatch(path.name):
                path.unlink()

    # ------------------------------------------------------------------------------------------ tokens

    def add(self, batch: TokenBatch) -> bool:
        """Append a batch; commit every shard that fills. True once max_tokens is reached (stop reading)."""
        if self.complete:
            return True
        tokens, lens = batch.tokens, batch.doc_tokens
        n = len(tokens)
        if self._skip > n:  # the whole batch is already in committed shards (resuming)
            self._skip -= n
            return False
        pos, self._skip = self._skip, 0
        ends = np.cumsum(lens)
        starts = ends - lens
        while pos < n:
            limit = n
            val_end = None
            if self.split == "val":
                # whole documents until the split holds val_tokens
                i = int(np.searchsorted(ends, pos + self.val_tokens - self._split_tokens, side="left"))
                if i < len(ends):
                    val_end = limit = int(ends[i])
            elif self.max_tokens is not None:
                limit = min(n, pos + self.max_tokens - self._train_tokens)
            take = min(limit - pos, self.shard_size - self._filled)
            self._append(batch, starts, ends, pos, pos + take)
            pos += take
            val_done = val_end is not None and pos == val_end
            if self._filled == self.shard_size or val_done:
                self._commit(batch.state_before, pos, next_split="train" if val_done else self.split)
            if (
                self.split == "train"
                and self.max_tokens is not None
                and self._train_tokens >= self.max_tokens
            ):
                self.finish()
                return True
        # documents without text at the very end of the batch (their position is n)
        self.empty_documents += int(np.count_nonzero((lens == 0) & (starts == n)))
        return False

    def _append(self, batch: TokenBatch, starts: np.ndarray, ends: np.ndarray, a: int, b: int) -> None:
        """Copy stream tokens [a, b) of the batch into the open shard and account its documents and bytes."""
        if self._buffer is None:
            self._buffer = np.empty(self.shard_size, dtype=self.dtype)
        self._buffer[self._filled : self._filled + b - a] = batch.tokens[a:b]
        self._filled += b - a
        self._split_tokens += b - a
        if self.split == "train":
            self._train_tokens += b - a
        lo_doc = int(np.searchsorted(ends, a, side="left"))
        hi_doc = int(np.searchsorted(starts, b, side="left"))
        s, e = starts[lo_doc:hi_doc], ends[lo_doc:hi_doc]
        length = e - s
        nonempty = length > 0
        # A document is counted in the shard holding its eot; its bytes are shared in proportion to tokens.
        self._docs += int(np.count_nonzero(nonempty & (s >= a)))
        self.empty_documents += int(np.count_nonzero(~nonempty & (s >= a) & (s < b)))
        safe = np.maximum(length, 1)
        nbytes = batch.doc_bytes[lo_doc:hi_doc]
        part_hi = np.clip(b - s, 0, length) * nbytes // safe
        part_lo = np.clip(a - s, 0, length) * nbytes // safe
        self._bytes += int((part_hi - part_lo).sum())

    def _commit(
        self, state_before: dict[str, Any], skip: int, next_split: str, *, last: bool = False
    ) -> None:
        """Write the open shard and then the manifest that lists it (resume = state_before + skip tokens).

        The `last` shard's manifest marks the data complete; it is written once, so no manifest ever says
        "resume from nowhere"."""
        assert self._buffer is not None and self._filled > 0
        name = shard_name(self.split, len(self.shards), self.tag)
        data = self._buffer[: self._filled]
        if not self.out_dir.is_dir():
            self._created_dirs = [p for p in [self.out_dir, *self.out_dir.parents] if not p.exists()]
            self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(
            self.out_dir / name, lambda f: np.lib.format.write_array(f, data, allow_pickle=False)
        )
        self.shards.append(
            {
                "file": name,
                "split": self.split,
                "tokens": self._filled,
                "documents": self._docs,
                "bytes": self._bytes,
            }
        )
        self._filled = self._docs = self._bytes = 0
        if next_split != self.split:
            self.split, self._split_tokens = next_split, 0
        if last:
            self.complete = True
            self._resume_state, self._resume_skip = None, 0
        else:
            self._resume_state, self._resume_skip = state_before, skip
        # where the stream stood after this shard, so a later shard found damaged can be made again exactly
        self.shards[-1]["resume"] = self.state_dict()["resume"]
        self._write_manifest()

    def _write_manifest(self) -> None:
        text = json.dumps(self.state_dict(), indent=1) + "\n"
        _write_atomically(self.manifest_path, lambda f: f.write(text.encode("utf-8")))

    def finish(self) -> None:
        """The stream ended (or max_tokens was reached): write the last shard and mark the data complete."""
        if self.complete:
            return
        if not self.shards and not self._filled:
            self.discard()
            raise TalmError(
                f"the stream held no text ({self.empty_documents:,} empty documents): check --text-column and "
                "the source"
            )
        if self.split == "val":
            got = self._split_tokens
            self.discard()
            raise TalmError(
                f"the stream ended after {got:,} tokens, before the validation split (--val-tokens "
                f"{self.val_tokens:,} for this worker) was full, so no training tokens are left: lower --val-tokens"
            )
        if self._filled:
            self._commit({}, 0, next_split=self.split, last=True)
        else:  # the stream ended exactly at a shard boundary
            self.complete = True
            self._resume_state, self._resume_skip = None, 0
            self._write_manifest()
        self._buffer = None

    def discard(self) -> None:
        """Remove everything this writer wrote (a run that failed before producing usable data)."""
        for shard in self.shards:
            (self.out_dir / shard["file"]).unlink(missing_ok=True)
        self.manifest_path.unlink(missing_ok=True)
        self.shards = []
        for d in self._created_dirs:
            try:
                d.rmdir()  # only if empty: other workers' files stay
            except OSError:
                break


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """ "shard_size 1000 -> 2000, ..." for the arguments that changed ("" when none did)."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


# ------------------------------------------------------------------------------------------------ pipeline


@dataclass
class WriteStats:
    """What one run of `write_shards` did, for the summary line."""

    tokens: int  # tokens written to shards by this run
    documents: int  # documents written by this run
    empty_documents: int  # documents without text, skipped
    text_bytes: int  # UTF-8 text read by this run
    seconds: float

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
) -> WriteStats:
    """Stream -> tokens -> shards, with reading, tokenizing and writing overlapped in three threads.

    Memory is bounded by the queues: at most `queue_batches` batches of `batch_bytes` text wait at each stage.
    Resumes from `writer.resume_state` when the writer was loaded from an interrupted run.
    """
    from tqdm import tqdm

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
                encoded = tokenize_batch(tokenizer, batch.texts, batch.utf8_bytes, before)
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
    total = None if writer.max_tokens is None else writer.max_tokens + writer.val_tokens - before["tokens"]
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress, smoothing=0.1
    )
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
            if done:
                break
    finally:
        stop.set()
        bar.close()
        for t in threads:
            t.join(timeout=5)
    after = writer.state_dict()["totals"]
    return WriteStats(
        tokens=after["tokens"] - before["tokens"],
        documents=after["documents"] - before["documents"],
        empty_documents=after["empty_documents"] - before["empty_documents"],
        text_bytes=text_bytes,
        seconds=time.perf_counter() - start,
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


def _share(total: int, workers: int, index: int) -> int:
    """Worker `index`'s part of `total` when split as evenly as possible."""
    return total // workers + (1 if index < total % workers else 0)


def limit_cores(num_proc: int | None) -> None:
    """--num-proc N: run this process (and the tokenizer's threads, created later) on N cores."""
    if num_proc is None or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if num_proc < len(cores):
        os.sched_setaffinity(0, cores[:num_proc])


@contextmanager
def locked(out_dir: Path, tag: str) -> Iterator[None]:
    """Hold the data directory's `RunLock` (one per worker tag: the workers of a layout write disjoint files
    and may run at once) for the whole run. A directory the lock had to create is removed again if the run
    leaves nothing else in it (a run refused for bad input leaves nothing behind)."""
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]
    lock = RunLock(out_dir, "download_data", name=f".talm{tag}.lock")
    lock.acquire()
    try:
        yield
    finally:
        if created and {p.name for p in out_dir.iterdir()} <= {lock.path.name}:
            lock.path.unlink(missing_ok=True)  # still held, so no other run is using it
            lock.release()
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
        else:
            lock.release()


def prepare(cfg: DownloadConfig, *, progress: bool = True) -> PrepareResult:
    """The whole data stage for one worker: resolve the source, then stream, tokenize and shard it, holding
    the directory's lock. `cfg.num_proc` limits this process to that many cores."""
    from talm.tokenizer.api import Tokenizer

    limit_cores(cfg.num_proc)
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
    header = {
        "dataset": source.dataset,
        "source": source.source,
        "config": source.config,
        "text_column": source.text_column,
        "files": source.files,
        "tokenizer": tokenizer_info,
    }
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
        val_tokens=_share(cfg.val_target, workers, index),
        max_tokens=max_tokens,
        worker_index=index,
        num_workers=workers,
    )
    check_writable_dir(cfg.out_dir, instead="pass another --data-root")
    with locked(Path(cfg.out_dir), writer.tag):
        status = writer.open(overwrite=cfg.overwrite)
        if status == "complete":
            return PrepareResult(cfg.out_dir, writer.state_dict(), status, None)
        stream = TextStream(source, num_workers=workers, worker_index=index)
        try:
            stats = write_shards(stream, tokenizer, writer, progress=progress)
        except SourceDataError:
            if status == "new" and not writer.repaired:
                writer.discard()  # nothing usable came of the bad input: leave nothing behind
            raise
        return PrepareResult(cfg.out_dir, writer.state_dict(), status, stats, writer.repaired)
