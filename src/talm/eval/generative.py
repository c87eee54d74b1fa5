"""Generative tasks: the model writes a reply to each prompt and the reply is checked (GSM8K: its final number
against the reference), and the one function that generates replies in batches, shared with reinforcement
learning (talm.train.grpo) so that a faster engine can take its place in one spot.

The GSM8K protocol is nanochat's chat_eval (zero-shot, the question as a user turn of the chat template, greedy,
pass@1) with lm-evaluation-harness's "flexible-extract" answer parsing (talm.data.prompts: the reply's last
number, commas, "$" and a trailing "." dropped, equal to what follows the reference's "#### ").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from talm.data.prompts import answers_match
from talm.model.sample import FINISHED, generate_ids


def fit_to_context(prompt: Sequence[int], context_length: int) -> list[int]:
    """A prompt cut to its last context_length - 1 tokens (room for one new token), as generation needs."""
    return list(prompt[-(context_length - 1) :]) if len(prompt) >= context_length else list(prompt)


def generate_replies(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eot_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    batch_size: int = 32,
    fixed_length: bool = False,
    vocab_size: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> list[list[int]]:
    """Each prompt's reply ids, batch_size prompts at a time with the KV cache (`generate_ids`): up to and
    including the `eot_id` that ends it, else max_new_tokens ids. With `fixed_length` every batch runs all
    max_new_tokens steps, whatever its replies do (under FSDP every rank must run the same forward passes);
    the replies are cut at their eot all the same. `seed` makes sampling (temperature > 0) repeatable: batch i
    samples with seed + i."""
    context = model.config.context_length
    replies: list[list[int]] = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        batch = [fit_to_context(p, context) for p in prompts[start : start + batch_size]]
        rows: list[list[int]] = [[] for _ in batch]
        ended = [False] * len(batch)
        with autocast():
            steps = generate_ids(
                model, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                eot_id=None if fixed_length else eot_id, seed=None if seed is None else seed + i,
                vocab_size=vocab_size,
            )  # fmt: skip
            for step in steps:
                for r, token in enumerate(step):
                    if ended[r] or token == FINISHED:
                        continue
                    rows[r].append(token)
                    ended[r] = token == eot_id
        replies += rows
    return replies


def reply_text(tokenizer: object, reply: Sequence[int], eot_id: int) -> str:
    """A reply's text, without the eot that ends it."""
    ids = list(reply[:-1]) if reply and reply[-1] == eot_id else list(reply)
    return tokenizer.decode(ids)  # type: ignore[attr-defined]


def pass_at_1(
    model: torch.nn.Module,
    tokenizer: object,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> float:
    """The share of prompts whose greedy reply's final number is the reference answer."""
    if not prompts:
        return 0.0
    eot = tokenizer.eot_id  # type: ignore[attr-defined]
    replies = generate_replies(
        model, prompts, max_new_tokens=max_new_tokens, eot_id=eot, batch_size=batch_size, autocast=autocast,
        vocab_size=tokenizer.vocab_size,  # type: ignore[attr-defined]
    )  # fmt: skip
    right = sum(
        answers_match(reply_text(tokenizer, r, eot), a) for r, a in zip(replies, answers, strict=True)
    )
    return right / len(prompts)
