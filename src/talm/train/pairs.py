"""Batches of preference pairs from preference data (`talm.data.preferences`: one document per pair, the chosen
side flagged START, the rejected side REJECTED, LEARN on each side's last reply).

`PairSet` finds every pair of a split from the flags alone (vectorised, shard by shard) and fits each side into
a row of context_length + 1 tokens: a side too long loses the start of its prompt (the reply is kept whole, with
the token before it); a pair whose reply alone does not fit is skipped. Both are counted for the run's banner.

A batch of B pairs is 2B rows, the chosen sides then the rejected ones, each padded on the right to the batch's
longest side (padding is never a target, and causal attention never looks at it): (x, y, pair indices), y -1 wherever the target is not
the reply. The pair index (its place in the split) is what stored reference log-probabilities are looked up by.

`PairLoader` keeps `TokenLoader`'s order and state: every epoch shuffles the pairs from (seed, epoch), each
optimizer step consumes world_size * batch_size * accum of them, rank r its own run, so (epoch, cursor) is an
exact resume point. `PairEval` is the fixed validation slice: the val split's first pairs, split over ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from talm.data.manifest import LEARN, REJECTED, START, DataSet
from talm.errors import TalmError
from talm.train.loader import ShuffledCursor, check_seed
from talm.train.packing import SplitStream

# (inputs (2B, T), targets (2B, T) with -1 off the replies, pair indices (B,)): the chosen sides come first.
PairBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rises(stream: SplitStream) -> np.ndarray:
    """Stream positions where a run of LEARN flags begins (the first token of each side's reply)."""
    out, before = [], False
    for shard, end in zip(stream.shards, stream.ends, strict=True):
        learn = (stream._mask(shard) & LEARN) != 0
        previous = np.concatenate([[before], learn[:-1]])
        out.append(np.flatnonzero(learn & ~previous) + (end - shard.tokens))
        before = bool(learn[-1]) if len(learn) else before
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _flagged(stream: SplitStream, flag: int) -> np.ndarray:
    parts = [
        np.flatnonzero(stream._mask(s) & flag) + (end - s.tokens)
        for s, end in zip(stream.shards, stream.ends, strict=True)
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def fit_starts(begin: np.ndarray, reply: np.ndarray, end: np.ndarray, row_len: int) -> np.ndarray:
    """Where each side starts once fitted into `row_len` tokens: its own start if it fits, else as late as
    keeps the reply and the token before it; -1 where even that does not fit."""
    start = np.maximum(begin, end - row_len)
    return np.where(end - (reply - 1) <= row_len, start, -1)


class PairSet:
    """The pairs of one split: each side's fitted (start, end) in the split's stream, and what was cut."""

    def __init__(self, data: DataSet, split: str, row_len: int, vocab_size: int | None) -> None:
        self.stream, self.row_len = SplitStream(data, split, vocab_size), row_len
        firsts, rejected, rises = (
            _flagged(self.stream, START),
            _flagged(self.stream, REJECTED),
            _rises(self.stream),
        )
        total = int(self.stream.ends[-1]) if len(self.stream.ends) else 0
        if len(rejected) != len(firsts) or len(rises) != 2 * len(firsts):
            raise TalmError(
                f"the {split} split of {str(data.dir)!r} is not preference pairs as download_data writes them "
                f"({len(firsts)} chosen, {len(rejected)} rejected sides, {len(rises)} replies): remake it with "
                "download_data --overwrite"
            )
        ends = np.append(firsts[1:], total)[: len(firsts)]  # each pair ends where the next begins
        chosen = fit_starts(firsts, rises[0::2], rejected, row_len)
        other = fit_starts(rejected, rises[1::2], ends, row_len)
        keep = (chosen >= 0) & (other >= 0)
        self.skipped = int(np.count_nonzero(~keep))
        self.truncated = int(np.count_nonzero(keep & ((chosen > firsts) | (other > rejected))))
        self.sides = np.stack([chosen, rejected, other, ends], axis=1)[keep]  # (pairs, 4): two (start, end)s
        self.index = np.flatnonzero(keep)  # each kept pair's place among the split's pairs
        self.count, self.size = len(self.sides), len(firsts)  # pairs kept, pairs in the split

    def describe(self) -> str:
        cut = f", {self.truncated:,} with the start of their prompt cut to fit" if self.truncated else ""
        skipped = (
            f"; {self.skipped:,} whose reply alone is longer than context_length+1={self.row_len} tokens skipped "
            "(raise --model.context_length to keep them)"
            if self.skipped
            else ""
        )
        return f"{self.count:,} pairs{cut}{skipped}"

    def batch(self, members: np.ndarray, pad_id: int, device: torch.device) -> PairBatch:
        """Rows of the pairs at `members` (indices into the kept pairs) as a `PairBatch` on `device`, as long as
        the batch's longest side (short replies are not padded to the context: the padding would be computed)."""
        n, sides = len(members), self.sides[members]
        width = max(
            2,
            int(max((sides[:, 1] - sides[:, 0]).max(initial=0), (sides[:, 3] - sides[:, 2]).max(initial=0))),
        )
        ids = np.full((2 * n, width), pad_id, dtype=np.int64)
        learn = np.zeros((2 * n, width), dtype=bool)
        for k in range(n):
            for row, (a, b) in ((k, sides[k, :2]), (n + k, sides[k, 2:])):
                tokens, flags = self.stream.read(int(a), int(b))
                ids[row, : b - a], learn[row, : b - a] = tokens, (flags & LEARN) != 0
        targets = np.where(learn[:, 1:], ids[:, 1:], -1)
        x, y = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (ids[:, :-1], targets))
        return x, y, torch.from_numpy(self.index[members]).to(device)


class PairLoader(ShuffledCursor):
    """Shuffled batches of preference pairs from the train split, rank-disjoint (`TokenLoader`'s state)."""

    def __init__(
        self,
        data: DataSet,
        *,
        batch_size: int,
        context_length: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
        accum_steps: int = 1,
    ) -> None:
        check_seed(seed)
        self.pairs = PairSet(data, "train", context_length + 1, vocab_size)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.accum_steps = accum_steps
        self.step_windows = batch_size * world_size * accum_steps
        self.total_windows = self.pairs.count
        if self.total_windows < self.step_windows:
            raise TalmError(
                f"the train split holds {self.pairs.describe()}, fewer than one step's "
                f"{batch_size} x {world_size} process(es) x {accum_steps} micro-step(s): lower --batch-size, "
                "or prepare more pairs"
            )
        self.epoch, self.cursor, self._micro, self._order_epoch = 0, 0, 0, -1

    def describe(self) -> str:
        return f"preference data: {self.pairs.describe()} to train on, loss on each side's reply"

    def _order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.pairs.count)
            self._order_epoch = self.epoch
        return self._perm

    def _advance_epoch(self) -> None:
        if self._micro == 0 and self.cursor + self.step_windows > self.total_windows:
            self.epoch, self.cursor = self.epoch + 1, 0

    def _members(self, count: int) -> np.ndarray:
        start = self.cursor + self.rank * self.batch_size
        return self._order()[start : start + count]

    def check_next(self) -> None:
        """Map (and so check) the shards of the next batch's first pair, consuming nothing."""
        self._advance_epoch()
        self.pairs.batch(self._members(1), self.pad_id, self.device)

    def next_batch(self) -> PairBatch:
        self._advance_epoch()
        batch = self.pairs.batch(self._members(self.batch_size), self.pad_id, self.device)
        self.cursor += self.batch_size * self.world_size
        self._micro = (self._micro + 1) % self.accum_steps
        return batch


class PairEval:
    """The fixed validation slice of preference data: the val split's first `max_pairs` pairs (those that fit),
    rank r taking pairs r, r + world_size, ..."""

    def __init__(
        self,
        data: DataSet,
        *,
        max_pairs: int,
        context_length: int,
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
    ) -> None:
        self.pairs = PairSet(data, "val", context_length + 1, vocab_size)
        if self.pairs.count == 0:
            raise TalmError(
                f"the val split holds no pair that fits ({self.pairs.describe()}), so the run could not "
                "evaluate: raise --model.context_length"
            )
        chosen = np.arange(min(max_pairs, self.pairs.count))
        self.mine, self.batch_size, self.pad_id = chosen[rank::world_size], batch_size, pad_id
        self.count, self.device = len(chosen), torch.device(device)
        self.most_batches = -(-len(chosen[0::world_size]) // batch_size)  # rank 0 holds the most pairs

    def __iter__(self) -> Iterator[PairBatch]:
        for i in range(0, len(self.mine), self.batch_size):
            yield self.pairs.batch(self.mine[i : i + self.batch_size], self.pad_id, self.device)

    def any_batch(self) -> PairBatch:
        """The slice's first pair, for a forward that is not counted (lockstep under FSDP)."""
        return self.pairs.batch(np.arange(1), self.pad_id, self.device)
