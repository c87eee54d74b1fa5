"""When --sample-every samples (at the first evaluation at or after each multiple of N, and at the last one),
and what: every prompt's greedy and sampled continuation in one batch of the engine, each the text it has alone;
under FSDP the same forward passes on every rank whatever the rows pick."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from conftest import BASE_TOKENIZER, varied_model

from talm.model.engine import Engine
from talm.model.sample import FINISHED, generate_ids
from talm.tokenizer.api import Tokenizer
from talm.train.samples import TEMPERATURE, TOP_K, continuations, is_due, samples_at_eval


@pytest.mark.parametrize(
    ("every", "eval_every", "max_steps", "expected"),
    [
        (None, 10, 50, []),
        (10, 10, 50, [10, 20, 30, 40, 50]),
        (25, 10, 50, [30, 50]),  # no evaluation at 25: the first one after it
        (20, 10, 55, [20, 40, 55]),  # and the last evaluation (at max_steps)
        (1, 5, 12, [5, 10, 12]),
    ],
)
def test_samples_come_at_the_first_evaluation_after_each_multiple(
    every, eval_every, max_steps, expected
) -> None:
    evals = [s for s in range(1, max_steps + 1) if s % eval_every == 0 or s == max_steps]
    assert [s for s in evals if is_due(s, every, eval_every, s == max_steps)] == expected


# ------------------------------------------------------------------------------------------------------------
# The continuations: one batch, the texts of one prompt at a time


PROMPTS = ["ROMEO:", "To be, or not to be, that is the question: whether 'tis nobler", "", "KING"]


class Recorded:
    """A precision whose autocast() records that it is entered (training's bfloat16 autocast stands in)."""

    def __init__(self) -> None:
        self.inside = False

    @contextmanager
    def autocast(self) -> Iterator[None]:
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


def one_at_a_time(model, tokenizer: Tokenizer, ids: list[int], temperature: float, seed: int, n: int) -> str:
    """A prompt's continuation alone, as samples were generated one by one before: generate_ids on one row,
    seeded with `seed`, cut at <|endoftext|>."""
    picked = [
        step[0]
        for step in generate_ids(
            model, [ids], max_new_tokens=n, temperature=temperature, top_k=TOP_K, eot_id=tokenizer.eot_id,
            seed=seed, vocab_size=tokenizer.vocab_size,
        )
    ]  # fmt: skip
    ends = [i for i, t in enumerate(picked) if t in (FINISHED, tokenizer.eot_id)]
    return tokenizer.decode(picked[: ends[0]] if ends else picked)


def test_samples_come_from_one_batch_with_the_texts_of_one_prompt_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = varied_model(vocab=tokenizer.vocab_size, context=24)
    batches = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, p, s: batches.append(len(p)) or real(self, p, s))
    cfg = SimpleNamespace(
        model=SimpleNamespace(context_length=24),
        train=SimpleNamespace(
            sample_every=5, eval_every=5, max_steps=100, sample_prompts=PROMPTS, sample_tokens=30
        ),
    )
    samples = samples_at_eval(model, tokenizer, Recorded(), cfg, 10, sharded=False, is_main=False)["samples"]
    assert batches == [2 * len(PROMPTS)]  # every prompt x {greedy, sampled}, in one call of the engine
    assert [s["prompt"] for s in samples] == PROMPTS
    for prompt, sample in zip(PROMPTS, samples, strict=True):
        ids = (tokenizer.encode(prompt) if prompt else [tokenizer.eot_id])[-23:]  # the context's last 23
        assert sample["greedy"] == one_at_a_time(model, tokenizer, ids, 0.0, 10, 30), prompt
        assert sample["sampled"] == one_at_a_time(model, tokenizer, ids, TEMPERATURE, 10, 30), prompt
    assert any(s["greedy"] != s["sampled"] for s in samples)
    assert len({s["sampled"] for s in samples}) == len(PROMPTS)


@pytest.mark.parametrize("sharded", [True, False])
def test_a_sharded_model_runs_every_forward_pass_whatever_its_rows_pick(
    monkeypatch: pytest.MonkeyPatch, sharded: bool
) -> None:
    """Under FSDP every rank must run the same forward passes: with every row picking <|endoftext|> at once, a
    sharded model still generates all max_new_tokens (the text cut after), a whole one stops. All of it under
    the run's autocast."""
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    model = varied_model(vocab=tokenizer.vocab_size, context=64)
    precision = Recorded()
    passes = []
    model.register_forward_hook(lambda *_: passes.append(precision.inside))
    ids = [tokenizer.encode(p) if p else [tokenizer.eot_id] for p in PROMPTS]
    texts = continuations(model, tokenizer, precision, ids, max_new_tokens=9, seed=1, sharded=sharded)
    picking = len(passes)
    assert len({t for pair in texts for t in pair}) > 1  # the rows pick different tokens
    real = Engine._pick
    monkeypatch.setattr(
        Engine, "_pick", lambda self, seq, logits: [real(self, seq, logits), tokenizer.eot_id][1]
    )
    passes.clear()
    texts = continuations(model, tokenizer, precision, ids, max_new_tokens=9, seed=1, sharded=sharded)
    assert texts == [("", "")] * len(PROMPTS)
    assert len(passes) == (picking if sharded else 2)  # all of them / the prompts' prefill and one step
    assert picking == 1 + 9 and all(passes)
