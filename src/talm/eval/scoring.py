"""Scoring: the log-likelihood of continuations given contexts, in batches, and the metrics built on it.

A request (context, continuation) is encoded as lm-evaluation-harness encodes it for a causal model: trailing
spaces of the context move to the continuation, the pair is encoded whole and split at the context's length (so
the tokens are those the model would see in running text). talm puts <|endoftext|> in front of the context: every
training document starts with it, so it is the model's "start of a document" (the harness adapter,
`talm.use.lm_eval`, encodes the same way, so both score the same tokens).

The log-likelihood is the sum over the continuation's tokens of log p(token | everything before it), from one
forward pass without a KV cache. Requests are sorted by length and right-padded into batches (padding after a
sequence cannot change a causal model's outputs before it), and only the continuation's positions go through the
float32 log-softmax.

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


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    requests: Sequence[TokenRequest],
    *,
    batch_size: int = 32,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress: str | None = None,
) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether it is the greedy one) for each request, in request order."""
    device = next(model.parameters()).device
    context_length = model.config.context_length
    fitted = [fit(r, context_length) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(fitted[i][0]))  # similar lengths share a batch
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(requests), desc=progress, unit="req", disable=progress is None, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(fitted[chunk[0]][0]) - 1
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        rows, targets = [], []
        for row, i in enumerate(chunk):
            ids, n = fitted[i]
            x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            # position p predicts ids[p + 1]: the continuation's tokens are predicted by the n positions before them
            scored[row, len(ids) - 1 - n : len(ids) - 1] = True
            rows += [row] * n
            targets += ids[len(ids) - n :]
        with autocast():  # the logits of the scored positions only, row by row: the order of `targets`
            picked, _ = model(x.to(device), at=scored.to(device))
        picked = picked.float()
        index = torch.tensor(rows)  # the request (row) each scored position belongs to
        target = torch.tensor(targets, device=device)
        token_ll = F.log_softmax(picked, dim=-1).gather(1, target[:, None]).squeeze(1)
        greedy = picked.argmax(dim=-1) == target
        # summed on the host in float64 (MPS has no float64): a few numbers per request
        ll = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, index, token_ll.cpu().double())
        misses = torch.zeros(len(chunk)).index_add_(0, index, (~greedy).cpu().float())
        for i, value, miss in zip(chunk, ll.tolist(), misses.tolist(), strict=True):
            out[i] = (value, miss == 0.0)
        bar.update(len(chunk))
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
