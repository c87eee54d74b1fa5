"""Token shards: cut a stream of tokenized documents into .npy shards plus a manifest, atomically and resumably.

Invariants, at every instant: the manifest lists only complete shards; a shard is written to a temp file, synced
and renamed into place before the manifest that lists it is (also atomically) replaced. The manifest carries
the stream position of its last shard boundary (`resume`), so a rerun continues there and ends byte-identical
to a run that was never interrupted. The format itself (file names, manifest fields, resume points) is defined
in `talm.data.manifest`; the disk side (opening, atomic writes, undoing) is `talm.data.shard_dir.ShardDir`.

Layout of the token stream: the validation split is the first `val_tokens` of the stream, rounded up to whole
documents (or, for a source with its own held-out split, that split whole, read first); training tokens follow, cut into shards of exactly `shard_size` tokens (a document may continue in
the next shard; the last shard of each split may be shorter). A document's UTF-8 bytes are shared between the
shards it spans in proportion to its tokens there, so the byte counts of a split add up exactly.

This module imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from talm.data.manifest import (
    MASK_DTYPE,
    build_manifest,
    manifest_header,
    mask_name,
    resume_point,
    shard_entry,
    shard_name,
)
from talm.data.shard_dir import ShardDir, ShardFile
from talm.errors import TalmError


@dataclass
class TokenBatch:
    """Documents of one text batch as tokens: each document is <|endoftext|> followed by its ids."""

    tokens: np.ndarray  # every document of the batch, concatenated
    doc_tokens: np.ndarray  # int64 tokens per document (eot included; 0 for a document without text)
    doc_bytes: np.ndarray  # int64 UTF-8 bytes per document
    state_before: dict[str, Any]  # stream position just before the batch's first document
    mask: np.ndarray | None = None  # conversation data: each token's loss-mask flags (manifest.LEARN, START)
    ends_val: bool = False  # its last document ends the source's own val split (streaming.TextBatch.ends_val)


def _documents_in(
    batch: TokenBatch, starts: np.ndarray, ends: np.ndarray, a: int, b: int
) -> tuple[int, int, int]:
    """Documents, documents without text, and UTF-8 bytes that stream tokens [a, b) of the batch account for.

    A document is counted in the shard holding its eot; its bytes are shared in proportion to tokens, rounded
    so that the parts of a document add up to its bytes exactly."""
    lo_doc = int(np.searchsorted(ends, a, side="left"))
    hi_doc = int(np.searchsorted(starts, b, side="left"))
    s, e = starts[lo_doc:hi_doc], ends[lo_doc:hi_doc]
    length = e - s
    nonempty = length > 0
    docs = int(np.count_nonzero(nonempty & (s >= a)))
    empty = int(np.count_nonzero(~nonempty & (s >= a) & (s < b)))
    safe = np.maximum(length, 1)
    nbytes = batch.doc_bytes[lo_doc:hi_doc]
    part_hi = np.clip(b - s, 0, length) * nbytes // safe
    part_lo = np.clip(a - s, 0, length) * nbytes // safe
    return docs, empty, int((part_hi - part_lo).sum())


def _too_short(val_got: int, val_tokens: int | None, empty_documents: int) -> TalmError:
    """Why a stream that ended before its first training token gave no usable data."""
    if val_tokens is None and val_got:  # the source's own val split, then an empty train split
        return TalmError(
            f"the source's train split held no text after its validation split ({val_got:,} tokens): check the "
            "source (its local copy may lack the train files)"
        )
    if not val_got:
        return TalmError(
            f"the stream held no text ({empty_documents:,} empty documents): check --text-column and the source"
        )
    return TalmError(
        f"the stream ended after {val_got:,} tokens, before the validation split (--val-tokens "
        f"{val_tokens:,} for this worker) was full, so no training tokens are left: lower --val-tokens (a tenth "
        f"of this stream: --val-tokens {val_got // 10})"
    )


def fresh_state(val_tokens: int | None) -> dict[str, Any]:
    """The state of an empty directory (no committed shard), as `ShardWriter.load_state_dict` takes it."""
    first = "train" if val_tokens == 0 else "val"
    return {"shards": [], "complete": False, "resume": resume_point(None, 0, first, 0)}


class OpenShard:
    """The shard being written and, with conversation data, its loss-mask shard beside it, written together."""

    def __init__(self, files: ShardDir, name: str, dtype: np.dtype, capacity: int, *, masked: bool) -> None:
        self.masks = files.open_shard(mask_name(name), MASK_DTYPE, capacity) if masked else None
        self.tokens: ShardFile = files.open_shard(name, dtype, capacity)

    def write(self, batch: TokenBatch, a: int, b: int) -> None:
        """Stream tokens [a, b) of the batch (and their flags: a masked writer is given masked batches)."""
        self.tokens.write(batch.tokens[a:b])
        if self.masks is not None:
            self.masks.write(batch.mask[a:b])  # type: ignore[index]

    def commit(self) -> str:
        """Put both in place, the mask first (so a shard on disk always has its mask); the shard's file name."""
        if self.masks is not None:
            self.masks.commit()
        self.tokens.commit()
        return self.tokens.path.name

    def abandon(self) -> None:
        if self.masks is not None:
            self.masks.abandon()
        self.tokens.abandon()


class ShardWriter:
    """Cuts a stream of `TokenBatch`es into shards and keeps the manifest in step.

    `header` is the manifest's source part (dataset, source, config, ..., tokenizer); `arguments` what made the
    data (a rerun with other arguments is refused); `val_tokens` / `max_tokens` are this worker's share
    (`val_tokens` None: the val split is the source's own, ending at the batch that says so, `ends_val`).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        header: dict[str, Any],
        arguments: dict[str, Any],
        dtype: np.dtype | type,
        shard_size: int,
        val_tokens: int | None,
        max_tokens: int | None = None,
        worker_index: int = 0,
        num_workers: int = 1,
    ) -> None:
        self.files = ShardDir(out_dir, worker_index=worker_index, num_workers=num_workers)
        self.out_dir, self.tag = self.files.path, self.files.tag
        self.dtype = np.dtype(dtype)
        self.shard_size = shard_size
        self.val_tokens = val_tokens
        self.max_tokens = max_tokens
        self.header = manifest_header(
            header,
            dtype=self.dtype,
            shard_size=shard_size,
            worker_index=worker_index,
            num_workers=num_workers,
            val_tokens=val_tokens,
            max_tokens=max_tokens,
            arguments=arguments,
        )
        # the open shard (and its loss mask), written as tokens come: _filled tokens, _docs documents, _bytes bytes
        self._shard: OpenShard | None = None
        self.masked = bool(header.get("loss_mask"))  # conversation data: a loss-mask shard beside each shard
        self._filled = self._docs = self._bytes = 0
        self.repaired: str | None = None  # what open() found damaged and resumed before, if anything
        self.load_state_dict(fresh_state(self.val_tokens))

    # ------------------------------------------------------------------------------------------ manifest

    def state_dict(self) -> dict[str, Any]:
        """The manifest: header, committed shards, and where to resume (None once complete)."""
        resume = None
        if not self.complete:
            resume = resume_point(self._resume_state, self._resume_skip, self.split, self.empty_documents)
        return build_manifest(self.header, self.shards, resume=resume, empty_documents=self.empty_documents)

    def load_state_dict(self, manifest: dict[str, Any]) -> None:
        """Continue after the last shard of an earlier, interrupted run."""
        self.shards: list[dict[str, Any]] = list(manifest["shards"])
        self.complete = bool(manifest["complete"])
        self._train_tokens = sum(s["tokens"] for s in self.shards if s["split"] == "train")
        resume = manifest.get("resume")
        # Resume point of the last commit: stream position before a batch + tokens of it already written;
        # _skip: stream tokens still to drop after resuming (they are in committed shards).
        self._resume_state: dict[str, Any] | None = None
        self._skip = self._resume_skip = 0
        if resume:
            self.split = resume["split"]
            self.empty_documents = resume["empty_documents"]
            self._resume_state = resume["stream_state"]
            self._skip = self._resume_skip = resume["skip_tokens"]
        else:
            self.split = "train"
            self.empty_documents = manifest["totals"]["empty_documents"]
        # tokens of the current split, committed + buffered
        self._split_tokens = sum(s["tokens"] for s in self.shards if s["split"] == self.split)

    @property
    def resume_state(self) -> dict[str, Any] | None:
        """Stream position to continue from (None: from the start)."""
        return self._resume_state

    def open(self, *, overwrite: bool = False) -> str:
        """Prepare the directory: "new", "resume" (an interrupted run with the same arguments) or "complete".

        What an earlier run left is checked, refused or repaired as `ShardDir.open`, `ShardDir.cut_at_damage`
        and `ShardDir.remove_strays` say: afterwards the directory holds exactly what the manifest lists."""
        status = "new"
        old = self.files.open(self.header["arguments"], overwrite=overwrite)
        if old is not None:
            old, self.repaired = self.files.cut_at_damage(old, self.dtype, fresh=fresh_state(self.val_tokens))
            self.load_state_dict(old)
            status = "complete" if self.complete else "resume"
            if self.repaired:
                self.files.write_manifest(
                    self.state_dict()
                )  # first the manifest stops listing the damaged shard, then strays go
        self.files.remove_strays({s["file"] for s in self.shards})
        return status

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
            if self.split == "val" and self.val_tokens is not None:
                # whole documents until the split holds val_tokens
                i = int(np.searchsorted(ends, pos + self.val_tokens - self._split_tokens, side="left"))
                if i < len(ends):
                    val_end = limit = int(ends[i])
            elif self.split == "val" and batch.ends_val:  # the source's own val split ends with this batch
                val_end = n
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
        if self.split == "val" and batch.ends_val:  # it ended with no token left to write: end the split here
            if self._filled:
                self._commit(batch.state_before, n, next_split="train")
            else:
                self.split, self._split_tokens = "train", 0
        return False

    def _append(self, batch: TokenBatch, starts: np.ndarray, ends: np.ndarray, a: int, b: int) -> None:
        """Write stream tokens [a, b) of the batch (and their loss-mask flags) to the open shard and account its
        documents and bytes."""
        if self._shard is None:
            name = shard_name(self.split, len(self.shards), self.tag)
            self._shard = OpenShard(self.files, name, self.dtype, self.shard_size, masked=self.masked)
        self._shard.write(batch, a, b)
        self._filled += b - a
        self._split_tokens += b - a
        if self.split == "train":
            self._train_tokens += b - a
        docs, empty, nbytes = _documents_in(batch, starts, ends, a, b)
        self._docs += docs
        self.empty_documents += empty
        self._bytes += nbytes

    def _commit(
        self, state_before: dict[str, Any], skip: int, next_split: str, *, last: bool = False
    ) -> None:
        """Write the open shard and then the manifest that lists it (resume = state_before + skip tokens).

        The `last` shard's manifest marks the data complete; it is written once, so no manifest ever says
        "resume from nowhere"."""
        assert self._shard is not None and self._shard.tokens.length == self._filled > 0
        name, self._shard = self._shard.commit(), None
        self.shards.append(shard_entry(name, self.split, self._filled, self._docs, self._bytes))
        self._filled = self._docs = self._bytes = 0
        if next_split != self.split:
            self.split, self._split_tokens = next_split, 0
        self.complete = last
        self._resume_state, self._resume_skip = (None, 0) if last else (state_before, skip)
        # where the stream stood after this shard, so a later shard found damaged can be made again exactly
        self.shards[-1]["resume"] = self.state_dict()["resume"]
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.files.write_manifest(self.state_dict())

    def finish(self) -> None:
        """The stream ended (or max_tokens was reached): write the last shard and mark the data complete."""
        if self.complete:
            return
        if self.split == "val" or not (self.shards or self._filled):
            error = _too_short(self._split_tokens, self.val_tokens, self.empty_documents)
            self.discard()
            raise error
        if self._filled:
            self._commit({}, 0, next_split=self.split, last=True)
        else:  # the stream ended exactly at a shard boundary
            self.complete, self._resume_state, self._resume_skip = True, None, 0
            self._write_manifest()

    def close(self) -> None:
        """Drop the shard being written, if any (a run that stops early: the next run makes it again)."""
        self._shard = self._shard.abandon() if self._shard is not None else None

    def discard(self) -> None:
        """Remove everything this writer wrote (a run that failed before producing usable data)."""
        self.close()
        self.files.discard([s["file"] for s in self.shards])
        self.shards = []
