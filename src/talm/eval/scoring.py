"""Scoring: the log-likelihood of continuations given contexts, in batches, and the metrics built on it.

A request (context, continuation) is encoded as lm-evaluation-harness encodes it for a causal model: trailing
spaces of the context move to the continuation, the pair is encoded whole and split at the context's length (so
the tokens are those the model would see in running text). talm puts <|endoftext|> in front of the context: every
training document starts with it, so it is the model's "start of a document" (the harness adapter,
`talm.use.lm_eval`, encodes the same way, so both score the same tokens).

The log-likelihood is the sum over the continuation's tokens of log p(token | everything before it), from one
forward pass without a KV cache. Requests that share a context (a multiple-choice example's choices) share one
row: the context once, then each choice, which attends to the context and to itself only, at the positions it
would have alone, so each scores as if computed alone, for about half the work on HellaSwag (a context of ~40
tokens, 4 endings of ~20). Rows are sorted by width and right-padded into batches of similar widths (padding
after a sequence cannot change a causal model's outputs before it; under 25% of the positions), and only the
positions that predict a continuation token go through the output layer and the float32 log-softmax (the
context's last one once, for every choice).

Metrics (as the harness defines them): acc is whether the likeliest choice is the right one; acc_norm divides each
choice's log-likelihood by the choice's length in characters first; LAMBADA's acc is whether every continuation
token is the greedy (argmax) one, its perplexity exp(-mean log-likelihood). The centered score
(acc - random) / (1 - random) is 0 for guessing and 1 for a perfect model, so tasks with different numbers of
choices add up (nanochat's CORE averages it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from talm.eval.tasks import Example
from talm.tokenizer.api import Tokenizer

TokenRequest = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> TokenRequest:
    """The (context, continuation) token ids of a request, as the harness splits them, with <|endoftext|> first."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    n = len(tokenizer.encode(context))
    return [tokenizer.eot_id, *whole[:n]], whole[n:]


def fit(request: TokenRequest, context_length: int) -> tuple[list[int], int]:
    """The model's input (at most `context_length` tokens, the oldest context cut first) and how many of its last
    positions predict continuation tokens."""
    context, continuation = request
    ids = (context + continuation)[-(context_length + 1) :]
    return ids, min(len(continuation), len(ids) - 1)


@dataclass
class SharedRow:
    """One row of the model's input: a `head` (the tokens before the first scored one, shared by every request
    in the row) and, per request, its index and its scored tokens (`tail`). The input is head + each tail but its
    last token; the head's last position predicts every tail's first token, each tail's own positions the rest."""

    head: list[int]
    tails: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.head) + sum(len(t) - 1 for _, t in self.tails)


def shared_rows(fitted: Sequence[tuple[list[int], int]], context_length: int) -> list[SharedRow]:
    """The fitted requests grouped by their exact head (a multiple-choice example's choices share its context,
    so the context is computed once instead of once per choice), a row at most `context_length` wide."""
    by_head: dict[tuple[int, ...], list[SharedRow]] = {}
    for i, (ids, n) in enumerate(fitted):
        if n == 0:  # an empty continuation: nothing to compute, log-likelihood 0 (the sum over no tokens)
            continue
        rows = by_head.setdefault(tuple(ids[: len(ids) - n]), [])
        if not rows or rows[-1].width + n - 1 > context_length:
            rows.append(SharedRow(ids[: len(ids) - n]))
        rows[-1].tails.append((i, ids[len(ids) - n :]))
    return [row for rows in by_head.values() for row in rows]


@dataclass
class RowBatch:
    """Rows right-padded into tensors: ids, the positions whose logits are needed (`at`), the layout (`branch`:
    0 for a head, k for the k-th tail, -1 for padding; `pos`), and per scored token: the row of the picked logits
    that predicts it (`pick`), the token (`target`) and its request's slot in the batch (`slot`)."""

    x: torch.Tensor
    at: torch.Tensor
    branch: torch.Tensor
    pos: torch.Tensor
    pick: list[int]
    target: list[int]
    slot: list[int]
    requests: list[int]


def row_batch(rows: Sequence[SharedRow]) -> RowBatch:
    width = max(row.width for row in rows)
    x = torch.zeros((len(rows), width), dtype=torch.long)
    branch = torch.full((len(rows), width), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    at = torch.zeros((len(rows), width), dtype=torch.bool)
    batch = RowBatch(x, at, branch, pos, [], [], [], [])
    picked = 0  # logits rows so far: `at` picks positions in row-major order
    for r, row in enumerate(rows):
        h = len(row.head)
        x[r, :h], branch[r, :h], pos[r, :h] = torch.tensor(row.head), 0, torch.arange(h)
        at[r, h - 1 : row.width] = True
        head_last, end = picked, h
        for k, (i, tail) in enumerate(row.tails, start=1):
            n = len(tail)
            x[r, end : end + n - 1] = torch.tensor(tail[:-1], dtype=torch.long)
            branch[r, end : end + n - 1], pos[r, end : end + n - 1] = k, torch.arange(h, h + n - 1)
            # tail[0] from the head's last position; tail[j] from the tail's own position j - 1
            batch.pick += [head_last] + list(range(picked + 1 + end - h, picked + end - h + n))
            batch.target += tail
            batch.slot += [len(batch.requests)] * n
            batch.requests.append(i)
            end += n - 1
        picked += row.width - h + 1
    return batch


def attend_mask(branch: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(B, T, T): a head position sees the head up to itself; a tail position the head and its own tail up to
    itself; padding (branch -1, position 0) sees the first position and other padding, so no row of the mask is
    empty, and no real position sees padding."""
    q_branch, k_branch = branch[:, :, None], branch[:, None, :]
    return ((k_branch == 0) | (k_branch == q_branch)) & (pos[:, None, :] <= pos[:, :, None])


def batches(rows: Sequence[SharedRow], batch_size: int, fill: float = 0.8) -> list[list[SharedRow]]:
    """Rows (sorted widest first) in batches of at most `batch_size`, a row joining a batch only if at least
    `fill` as wide as its first: padding stays under 1/fill - 1 of the real positions (25%) whatever the widths'
    spread (a few dozen examples of varied lengths in one batch would pad by a third or more)."""
    out: list[list[SharedRow]] = []
    for row in rows:
        if not out or len(out[-1]) == batch_size or row.width < fill * out[-1][0].width:
            out.append([])
        out[-1].append(row)
    return out


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    requests: Sequence[TokenRequest],
    *,
    batch_size: int = 32,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress: str | None = None,
) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether it is the greedy one) for each request, in request order.
    `batch_size` rows per forward pass, a row holding the requests that share a context (`shared_rows`)."""
    device = next(model.parameters()).device
    context_length = model.config.context_length
    rows = shared_rows([fit(r, context_length) for r in requests], context_length)
    rows.sort(key=lambda row: -row.width)  # similar widths share a batch
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(requests), desc=progress, unit="req", disable=progress is None, leave=False)
    for batch in batches(rows, batch_size):
        b = row_batch(batch)
        layout = {}
        if b.branch.max() > 1:  # a row shares its head: the layout's own mask (else plain causal, faster)
            layout = {"attend": attend_mask(b.branch, b.pos).to(device), "positions": b.pos.to(device)}
        with autocast():  # the logits of the needed positions only, in row-major order
            picked, _ = model(b.x.to(device), at=b.at.to(device), **layout)
        picked = picked.float()
        pick, target = torch.tensor(b.pick, device=device), torch.tensor(b.target, device=device)
        token_ll = F.log_softmax(picked, dim=-1)[pick, target]
        greedy = picked.argmax(dim=-1)[pick] == target
        # summed on the host in float64 (MPS has no float64): a few numbers per request
        slot = torch.tensor(b.slot)
        ll = torch.zeros(len(b.requests), dtype=torch.float64).index_add_(0, slot, token_ll.cpu().double())
        misses = torch.zeros(len(b.requests)).index_add_(0, slot, (~greedy).cpu().float())
        for i, value, miss in zip(b.requests, ll.tolist(), misses.tolist(), strict=True):
            out[i] = (value, miss == 0.0)
        bar.update(len(b.requests))
    bar.close()
    model.train(was_training)
    return out


def encode_examples(tokenizer: Tokenizer, examples: Sequence[Example]) -> list[TokenRequest]:
    """Every request of every example, in order, as token ids."""
    return [encode_pair(tokenizer, c, k) for ex in examples for c, k in ex.requests]


def per_example(
    examples: Sequence[Example], scores: Sequence[tuple[float, bool]]
) -> list[list[tuple[float, bool]]]:
    """The flat request scores regrouped by example."""
    out, at = [], 0
    for ex in examples:
        out.append(list(scores[at : at + len(ex.requests)]))
        at += len(ex.requests)
    return out


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on a tie (as numpy's argmax, which the harness uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_metrics(examples: Sequence[Example], scores: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """acc, acc_norm and their random baseline (the mean of 1/choices) over multiple-choice examples."""
    hits = hits_norm = random = 0.0
    for ex, got in zip(examples, per_example(examples, scores), strict=True):
        lls = [ll for ll, _ in got]
        hits += _argmax(lls) == ex.gold
        hits_norm += _argmax([ll / max(1, len(c)) for ll, c in zip(lls, ex.choices, strict=True)]) == ex.gold
        random += 1.0 / len(lls)
    n = len(examples)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "random": random / n}


def last_word_metrics(scores: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """LAMBADA: acc (the whole last word is the greedy continuation), perplexity of the last word; guessing: 0."""
    n = len(scores)
    mean_ll = sum(ll for ll, _ in scores) / n
    return {"acc": sum(g for _, g in scores) / n, "ppl": math.exp(min(-mean_ll, 700.0)), "random": 0.0}


def centered(value: float, random: float) -> float:
    """(value - random) / (1 - random): 0 for guessing, 1 for always right."""
    return (value - random) / (1.0 - random)
