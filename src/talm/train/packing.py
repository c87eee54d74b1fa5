"""Batches of whole conversations for supervised fine-tuning, from conversation data (shards with loss masks).

The split's shards, in name order, form one token stream; the START flags of their loss-mask shards
(`talm.data.manifest`) cut it into conversations, which may continue from one shard into the next. Rows of
context_length + 1 tokens are packed from whole conversations, never cutting one: a conversation longer than a
row is dropped (and counted, for the run's banner), and the rest of a row that the next conversation does not
fit into is padding. Each row gives (x, y, doc_ids): y is -1 (ignored by the loss) wherever the target token is
not flagged LEARN, so the loss counts only what the assistant writes; doc_ids number the conversations of the
row so attention can be kept inside each and positions counted from its start (`GPT.forward(doc_ids=...)`).

`ConversationLoader` has `TokenLoader`'s order and state: every epoch shuffles the conversations from
(seed, epoch), packs them greedily in that order, and the rows form one global sequence consumed
world_size * batch_size at a time, so (epoch, cursor) is an exact resume point. `ConversationEval` packs the
val split in stream order, a fixed slice as `EvalSlice` is.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from talm.data.manifest import LEARN, MASK_DTYPE, START, DataSet, Shard
from talm.errors import TalmError
from talm.train import dist
from talm.train.loader import ShardCache, ShuffledCursor, TokenLoader, check_seed

# What one batch is: inputs, targets (-1 where not learned), conversation ids (None: attention may cross
# conversations, --no-train.isolate_conversations), and how many targets are learned.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]


class SplitStream:
    """The shards of one split as one stream of tokens and loss-mask flags."""

    def __init__(self, data: DataSet, split: str, vocab_size: int | None) -> None:
        self.shards = [s for s in data.split(split) if s.tokens > 0]
        self.ends = np.cumsum([s.tokens for s in self.shards], dtype=np.int64)
        self.tokens = ShardCache(data.dtype, vocab_size)
        self.flags = ShardCache(MASK_DTYPE)

    def _mask(self, shard: Shard) -> np.ndarray:
        return self.flags[Shard(shard.mask_path, shard.split, shard.tokens, None)]

    def conversations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start offset, length, learned tokens) in the stream of every conversation, in stream order."""
        starts = [
            np.flatnonzero(self._mask(s) & START) + (end - s.tokens)
            for s, end in zip(self.shards, self.ends, strict=True)
        ]
        first = np.concatenate(starts) if starts else np.empty(0, dtype=np.int64)
        total = int(self.ends[-1]) if len(self.ends) else 0
        return first, np.diff(first, append=total), self._learned(first)

    def _learned(self, first: np.ndarray) -> np.ndarray:
        """LEARN-flagged tokens of each conversation starting at `first`, summed shard by shard (a conversation
        may span shards) without a stream-long array."""
        learned = np.zeros(len(first), dtype=np.int64)
        for shard, end in zip(self.shards, self.ends, strict=True):
            begin = end - shard.tokens
            inside = first[(first > begin) & (first < end)] - begin
            cuts = np.concatenate([[0], inside]).astype(np.int64)
            sums = np.add.reduceat((self._mask(shard) & LEARN) != 0, cuts, dtype=np.int64)
            owner = np.searchsorted(first, cuts + begin, side="right") - 1  # -1: before any conversation
            np.add.at(learned, owner[owner >= 0], sums[owner >= 0])
        return learned

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and flags of stream positions [start, stop), which may span shards."""
        ids, flags = [], []
        i = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            shard, offset = self.shards[i], int(self.ends[i]) - self.shards[i].tokens
            a, b = start - offset, min(stop, int(self.ends[i])) - offset
            ids.append(self.tokens[shard][a:b])
            flags.append(self._mask(shard)[a:b])
            start, i = offset + b, i + 1
        return np.concatenate(ids), np.concatenate(flags)


def pack(lengths: np.ndarray, row_len: int) -> np.ndarray:
    """Greedy packing of conversations of `lengths` (each <= row_len), in order, into rows of `row_len` tokens:
    the indices where each row starts, then len(lengths)."""
    if len(lengths) == 0:
        return np.zeros(1, dtype=np.int64)  # no rows (not one empty row)
    bounds, fill = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if fill + n > row_len:
            bounds.append(i)
            fill = 0
        fill += n
    bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


def fill_rows(
    stream: SplitStream,
    starts: np.ndarray,
    lengths: np.ndarray,
    rows: list[np.ndarray],
    row_len: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, flags, conversation ids) of shape (len(rows), row_len): each row its conversations (indices into
    starts/lengths) back to back, then padding (`pad_id`, no flags, an id of its own)."""
    ids = np.full((len(rows), row_len), pad_id, dtype=np.int64)
    flags = np.zeros((len(rows), row_len), dtype=MASK_DTYPE)
    docs = np.zeros((len(rows), row_len), dtype=np.int64)
    for r, members in enumerate(rows):
        pos = 0
        for k, c in enumerate(members.tolist()):
            n = int(lengths[c])
            ids[r, pos : pos + n], flags[r, pos : pos + n] = stream.read(int(starts[c]), int(starts[c]) + n)
            docs[r, pos : pos + n] = k
            pos += n
        docs[r, pos:] = len(members)
    return ids, flags, docs


def to_batch(ids: np.ndarray, flags: np.ndarray, docs: np.ndarray | None, device: torch.device) -> Batch:
    """Rows of T+1 -> (x, y, doc_ids, learned targets) on `device`; a target is learned where its flags say LEARN
    (the mask of the token predicted, not of the input)."""
    targets = np.where(flags[:, 1:] & LEARN, ids[:, 1:], -1)
    count = int(np.count_nonzero(targets >= 0))
    x, y = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (ids[:, :-1], targets))
    d = None if docs is None else torch.from_numpy(np.ascontiguousarray(docs[:, :-1])).to(device)
    return x, y, d, count


def conversation_step(
    loader: ConversationLoader, accum: int, ctx: dist.DistContext
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]]:
    """The `accum` micro-batches of one optimizer step, each with the scale of its summed loss
    (`GPT.forward(reduction="sum")`).

    The step's loss is the sum of every learned target's loss over all micro-batches and ranks, divided by the
    number of learned targets in the whole step (not a mean of means: micro-batches learn different numbers of
    targets). Micro-batch i's summed loss times world_size * accum / N_step is that: the trainer divides by
    accum before backward, and DDP averages gradients over the world_size ranks. A micro-batch with no learned
    target adds 0 (a mean would be NaN). One all-reduce of the count per step."""
    batches = [loader.next_batch() for _ in range(accum)]
    count = sum(b[3] for b in batches)
    if ctx.distributed:
        count = int(dist.all_reduce_sum(torch.tensor([count], dtype=torch.int64, device=ctx.device)).item())
    if count == 0:  # the loaders pack only conversations with a learned token, so every row has one
        raise TalmError(
            "an optimizer step with no learned target: the data has nothing to learn in this step"
        )
    return [(x, y, d, ctx.world_size * accum / count) for x, y, d, _ in batches]


def micro_batches(
    loader: TokenLoader | ConversationLoader, accum: int, ctx: dist.DistContext
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]]:
    """The micro-batches of one optimizer step as (x, y, extra arguments of the model, scale of its loss).

    Text data's come one at a time, as `TokenLoader` gives them, with no extra arguments and a scale of 1.0
    (exact: training is bitwise what it was without this). Conversation data's come all at once, with their
    doc_ids when attention is kept inside conversations, the summed loss asked for, and the scale that makes the
    step's loss the mean over its learned targets (`conversation_step`)."""
    if isinstance(loader, ConversationLoader):
        for x, y, doc_ids, scale in conversation_step(loader, accum, ctx):
            yield x, y, {"reduction": "sum"} | ({} if doc_ids is None else {"doc_ids": doc_ids}), scale
        return
    for _ in range(accum):
        x, y = loader.next_batch()
        yield x, y, {}, 1.0


class ConversationLoader(ShuffledCursor):
    """Shuffled batches of packed conversations from the train split, rank-disjoint (`TokenLoader`'s interface,
    but `next_batch` returns a `Batch`)."""

    def __init__(
        self,
        data: DataSet,
        *,
        batch_size: int,
        context_length: int,
        seed: int,
        pad_id: int,
        isolate: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
        accum_steps: int = 1,
    ) -> None:
        self.isolate = isolate  # doc_ids in every batch, so attention stays inside each conversation
        check_seed(seed)
        self.batch_size, self.row_len, self.pad_id = batch_size, context_length + 1, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.stream = SplitStream(data, "train", vocab_size)
        starts, lengths, learned = self.stream.conversations()
        fits = lengths <= self.row_len
        self.dropped, self.dropped_tokens = int(np.count_nonzero(~fits)), int(lengths[~fits].sum())
        self.unlearned = int(np.count_nonzero(fits & (learned == 0)))
        keep = fits & (
            learned > 0
        )  # a conversation with no assistant token (cut by --max-tokens) teaches nothing
        self.starts, self.lengths = starts[keep], lengths[keep]
        self.conversations = len(self.starts)
        self.accum_steps = accum_steps
        self.step_windows = batch_size * world_size * accum_steps
        self.epoch, self.cursor, self._micro, self._order_epoch = 0, 0, 0, -1
        self._set_epoch_order()
        if self.total_windows < self.step_windows:
            raise TalmError(
                f"the train split packs into {self.total_windows} rows of context_length+1={self.row_len} tokens "
                f"({self.conversations} conversations fit, {self.dropped} longer ones and {self.unlearned} with nothing to "
                f"learn dropped), fewer than one batch "
                f"({batch_size} x {world_size} process(es) x {accum_steps} micro-step(s)): lower --batch-size, raise "
                "--model.context_length, or prepare more conversations"
            )

    def describe(self) -> str:
        """The banner's line about the conversations: how they pack, what was dropped."""
        fill = self.lengths.sum() / max(self.total_windows * self.row_len, 1)
        dropped = (
            f"; {self.dropped:,} longer than a row dropped ({self.dropped_tokens:,} tokens): raise "
            "--model.context_length to keep them (with --init-from: up to the source's)"
            if self.dropped
            else ""
        )
        if self.unlearned:
            dropped += f"; {self.unlearned:,} with no assistant token to learn dropped"
        attention = "kept inside each conversation" if self.isolate else "crossing conversations of a row"
        return (
            f"conversation data: {self.conversations:,} conversations packed into {self.total_windows:,} rows of "
            f"{self.row_len} tokens per epoch ({100 * fill:.0f}% filled), loss on the assistant's tokens only, "
            f"attention {attention}{dropped}"
        )

    def _set_epoch_order(self) -> None:
        if self._order_epoch == self.epoch:
            return
        self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.conversations)
        self._bounds = pack(self.lengths[self._order], self.row_len)
        self.total_windows = len(self._bounds) - 1
        self._order_epoch = self.epoch

    def _rows(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._set_epoch_order()
        rows = [self._order[self._bounds[r] : self._bounds[r + 1]] for r in range(start, start + count)]
        return fill_rows(self.stream, self.starts, self.lengths, rows, self.row_len, self.pad_id)

    def _advance_epoch(self) -> None:
        self._set_epoch_order()
        if self._micro == 0 and self.cursor + self.step_windows > self.total_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._set_epoch_order()

    def check_next(self) -> None:
        """Map (and so check) the shards of the next batch's first row, consuming nothing."""
        self._advance_epoch()
        self._rows(self.cursor + self.rank * self.batch_size, 1)

    def next_batch(self) -> Batch:
        self._advance_epoch()
        rows = self._rows(self.cursor + self.rank * self.batch_size, self.batch_size)
        self.cursor += self.batch_size * self.world_size
        self._micro = (self._micro + 1) % self.accum_steps
        return to_batch(rows[0], rows[1], rows[2] if self.isolate else None, self.device)


def nothing_to_score(lengths: np.ndarray, learned: np.ndarray, row_len: int) -> TalmError:
    """The refusal of a val split none of whose conversations can be scored, saying why."""
    n, long = len(lengths), int(np.count_nonzero(lengths > row_len))
    unlearned = int(np.count_nonzero((lengths <= row_len) & (learned == 0)))
    why = [f"{long:,} longer than context_length+1={row_len} tokens"] if long else []
    why += [f"{unlearned:,} with no assistant token (cut by download_data --max-tokens)"] if unlearned else []
    held = f"{n:,} conversation(s): {' and '.join(why)}" if n else "no conversation"
    return TalmError(
        f"the val split has nothing to score ({held}), so the run could not evaluate: raise "
        "--model.context_length (with --init-from: up to the source's), or remake the data with more "
        "download_data --val-tokens"
    )


class ConversationEval:
    """The fixed validation slice of conversation data: the val split's conversations packed in stream order
    until the rows hold `eval_tokens` positions, rows split over ranks (r, r + world_size, ...)."""

    def __init__(
        self,
        data: DataSet,
        *,
        eval_tokens: int,
        context_length: int,
        batch_size: int,
        pad_id: int,
        isolate: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
    ) -> None:
        self.isolate = isolate
        self.row_len, self.pad_id, self.batch_size = context_length + 1, pad_id, batch_size
        self.stream = SplitStream(data, "val", vocab_size)
        starts, lengths, learned = self.stream.conversations()
        keep = (lengths <= self.row_len) & (learned > 0)  # what can be scored: whole, with a learned target
        if not keep.any():
            raise nothing_to_score(lengths, learned, self.row_len)
        self.starts, self.lengths = starts[keep], lengths[keep]
        bounds = pack(self.lengths, self.row_len)
        wanted = max(1, -(-eval_tokens // context_length))
        rows = [np.arange(bounds[r], bounds[r + 1]) for r in range(min(wanted, len(bounds) - 1))]
        self.tokens = len(rows) * context_length
        self.mine = rows[rank::world_size]
        self.most_batches = -(-len(rows[0::world_size]) // batch_size)  # rank 0 holds the most rows
        self.first_row = rows[:1]  # every rank has it: the batch of an uncounted forward
        self.device = torch.device(device)
        self.tokens_per_byte = (
            None  # the loss covers the assistant's tokens only: bits per byte would mislead
        )

    def __iter__(self) -> Iterator[Batch]:
        for i in range(0, len(self.mine), self.batch_size):
            rows = fill_rows(
                self.stream,
                self.starts,
                self.lengths,
                self.mine[i : i + self.batch_size],
                self.row_len,
                self.pad_id,
            )
            yield to_batch(rows[0], rows[1], rows[2] if self.isolate else None, self.device)

    def any_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's inputs and targets, for a forward that is not counted (evaluate's lockstep under FSDP)."""
        rows = fill_rows(self.stream, self.starts, self.lengths, self.first_row, self.row_len, self.pad_id)
        batch = to_batch(rows[0], rows[1], None, self.device)
        return batch[0], batch[1]
