"""Batches of training tokens from the memory-mapped shards that download_data writes.

`manifest.read_data` merges every manifest of a data directory into one `DataSet`; `TokenLoader` cuts
the train shards into windows of context_length + 1 tokens and yields (x, y) batches offset by one token. Shards
are opened with `np.load(mmap_mode="r")` and only the rows of a batch are copied, so memory does not grow with
the dataset.

Order: every epoch shuffles the shard order and, within each shard, the window order, from (seed, epoch). The
epoch's windows form one global sequence; each call to `next_batch` consumes world_size * batch_size of them,
rank r taking its own disjoint run of batch_size. The position is two integers (epoch, cursor) in that global
sequence, which is all `state_dict` needs for an exact resume. A single process with gradient accumulation over
N micro-batches sees the same windows per optimizer step as N processes with one micro-batch each.

`EvalSlice` is the fixed validation slice: the first `eval_tokens` tokens of the val split, split over ranks.

Damaged data fails in one line naming the shard (`manifest.open_shard`): `check_shards` compares every listed
shard's header and size with the manifest when a run starts (cheap: no token is read), and each shard's ids are
checked against the vocabulary when it is first mapped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from talm.data.manifest import MASK_DTYPE, DataSet, Shard, open_shard, shard_problem
from talm.errors import TalmError

SEED_LIMIT = 2**63


def check_shards(data: DataSet) -> None:
    """TalmError naming the first listed shard whose header or size disagrees with the manifest (truncated,
    overwritten, missing). Reads headers and sizes only."""
    for shard in data.shards:
        path, problem = shard.path, shard_problem(shard.path, shard.tokens, data.dtype)
        if problem is None and data.loss_mask:  # conversation data: its loss-mask shard too
            path, problem = shard.mask_path, shard_problem(shard.mask_path, shard.tokens, MASK_DTYPE)
        if problem:
            raise TalmError(
                f"shard {str(path)!r} {problem}: rerun download_data with --overwrite to recreate the data "
                "directory"
            )


class ShardCache:
    """Memory maps of the shards, opened on first use (they cost address space, not memory); given
    `vocab_size`, each shard's ids are checked to be below it when it is first mapped."""

    def __init__(self, dtype: np.dtype, vocab_size: int | None = None) -> None:
        self.dtype = dtype
        self.vocab_size = vocab_size
        self._maps: dict[Path, np.ndarray] = {}

    def __getitem__(self, shard: Shard) -> np.ndarray:
        mm = self._maps.get(shard.path)
        if mm is None:
            mm = self._maps[shard.path] = open_shard(shard, self.dtype, self.vocab_size)
        return mm


def to_device(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) int64 rows -> inputs and targets offset by one, on `device` (pinned, non-blocking on CUDA)."""
    t = torch.from_numpy(rows)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        t = t.to(device)
    return t[:, :-1], t[:, 1:]


def check_seed(seed: int) -> None:
    """TalmError unless `seed` is one a loader's shuffle takes."""
    if not 0 <= seed < SEED_LIMIT:
        raise TalmError(f"--seed {seed} is out of range: use a whole number from 0 to {SEED_LIMIT - 1}")


class ShuffledCursor:
    """The resumable state of a loader that walks a shuffled order epoch by epoch: where it is (epoch, cursor)
    and the order's seed; loading it rebuilds the order at the next batch."""

    epoch: int
    cursor: int
    seed: int

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
        self._micro, self._order_epoch = 0, -1


class TokenLoader(ShuffledCursor):
    """Shuffled (x, y) batches of shape (batch_size, context_length) from the train split, rank-disjoint."""

    def __init__(
        self,
        data: DataSet,
        *,
        batch_size: int,
        context_length: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
        accum_steps: int = 1,
    ) -> None:
        check_seed(seed)
        self.batch_size, self.context_length = batch_size, context_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.shards = [s for s in data.split("train") if s.tokens > context_length]
        self.windows = np.array([(s.tokens - 1) // context_length for s in self.shards], dtype=np.int64)
        self.total_windows = int(self.windows.sum())
        # An epoch ends at an optimizer step's boundary, whatever the mix of processes and micro-steps.
        self.accum_steps = accum_steps
        self.step_windows = batch_size * world_size * accum_steps
        if self.total_windows < self.step_windows:
            raise TalmError(
                f"the train split holds {self.total_windows} windows of context_length+1={context_length + 1} "
                f"tokens, fewer than one batch ({batch_size} x {world_size} process(es) x {accum_steps} "
                "micro-step(s)): lower "
                "--batch-size or --model.context_length, or prepare more data"
            )
        self._maps = ShardCache(data.dtype, vocab_size)
        self.epoch, self.cursor = 0, 0
        self._micro = 0  # micro-batch within the optimizer step (0 at every saved state)
        self._order_epoch = -1
        self._perms: dict[int, np.ndarray] = {}

    # The epoch's order: shard order, then each shard's window order, both derived from (seed, epoch).
    def _set_epoch_order(self) -> None:
        if self._order_epoch == self.epoch:
            return
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        self._shard_order = order
        self._ends = np.cumsum(self.windows[order])  # global window index where each shard (in order) ends
        self._perms = {}
        self._order_epoch = self.epoch

    def _window_perm(self, shard_index: int) -> np.ndarray:
        perm = self._perms.get(shard_index)
        if perm is None:
            rng = np.random.default_rng([self.seed, self.epoch, shard_index])
            perm = rng.permutation(int(self.windows[shard_index]))
            if len(self._perms) >= 2:  # the cursor walks through shards in order: keep the current and next
                self._perms.pop(next(iter(self._perms)))
            self._perms[shard_index] = perm
        return perm

    def _rows(self, start: int, count: int) -> np.ndarray:
        """The windows at global positions [start, start + count) of this epoch, as (count, T+1) int64."""
        self._set_epoch_order()
        T = self.context_length
        rows = np.empty((count, T + 1), dtype=np.int64)
        positions = np.arange(start, start + count)
        slots = np.searchsorted(self._ends, positions, side="right")
        for i, (pos, slot) in enumerate(zip(positions, slots, strict=True)):
            shard_index = int(self._shard_order[slot])
            first = int(self._ends[slot] - self.windows[shard_index])
            window = int(self._window_perm(shard_index)[pos - first])
            rows[i] = self._maps[self.shards[shard_index]][window * T : window * T + T + 1]
        return rows

    def _advance_epoch(self) -> None:
        if self._micro == 0 and self.cursor + self.step_windows > self.total_windows:  # too short for a step
            self.epoch, self.cursor = self.epoch + 1, 0

    def check_next(self) -> None:
        """Map (and so check) the shard the next batch starts in, without consuming anything: a damaged shard
        fails before the run writes anything."""
        self._advance_epoch()
        self._rows(self.cursor + self.rank * self.batch_size, 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank; all ranks advance together by world_size * batch_size windows."""
        per_step = self.batch_size * self.world_size
        self._advance_epoch()
        rows = self._rows(self.cursor + self.rank * self.batch_size, self.batch_size)
        self.cursor += per_step
        self._micro = (self._micro + 1) % self.accum_steps
        return to_device(rows, self.device)


class EvalSlice:
    """The fixed validation slice: the first `eval_tokens` tokens of the val split, in windows, split over ranks.

    Every evaluation sees the same windows, so val losses compare across steps (and across runs with the same
    context length). Rank r takes windows r, r + world_size, ...
    """

    def __init__(
        self,
        data: DataSet,
        *,
        eval_tokens: int,
        context_length: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
    ) -> None:
        T = context_length
        wanted = max(1, math.ceil(eval_tokens / T))
        windows: list[tuple[Shard, int]] = []
        for shard in data.split("val"):
            n = min((shard.tokens - 1) // T, wanted - len(windows))
            windows += [(shard, i * T) for i in range(max(0, n))]
        if not windows:
            total = sum(s.tokens for s in data.split("val"))
            raise TalmError(
                f"the val split holds {total} tokens, too few for one window of context_length+1={T + 1}: "
                "lower --model.context_length or prepare the data with more --val-tokens"
            )
        self.windows = windows
        self.tokens = len(windows) * T
        self.mine = windows[rank::world_size]
        self.batch_size, self.context_length = batch_size, T
        self.device = torch.device(device)
        self.tokens_per_byte = data.tokens_per_byte("val")
        self._maps = ShardCache(data.dtype, vocab_size)
        for shard in {s.path: s for s, _ in self.mine}.values():  # map (and check) them now, not mid-run
            self._maps[shard]
        # rank 0 holds the most windows (ranks take them in turn), so the most batches
        self.most_batches = math.ceil(len(windows[0::world_size]) / batch_size)

    def _batch(self, chunk: list[tuple[Shard, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.context_length
        rows = np.empty((len(chunk), T + 1), dtype=np.int64)
        for j, (shard, start) in enumerate(chunk):
            rows[j] = self._maps[shard][start : start + T + 1]
        return to_device(rows, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.mine), self.batch_size):
            yield self._batch(self.mine[i : i + self.batch_size])

    def any_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (the slice's first window), for a forward that is not counted (evaluate's lockstep)."""
        return self._batch(self.windows[:1])
