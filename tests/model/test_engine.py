"""The batched generation engine (talm.model.engine): each row computes what it would alone (greedy, fp32),
whatever else is in the batch, whenever it joins and whoever leaves; seeded rows draw their own tokens; rows
end at their end token, token budget, stop string or cancel; steps are shared, not summed."""

from __future__ import annotations

import pytest
import torch
from conftest import varied_model

from talm.model.engine import Engine, Settings
from talm.model.sample import generate_ids, reference_ids

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]
MIXED = [
    Settings(max_new_tokens=12, temperature=0.0),
    Settings(max_new_tokens=5, temperature=1.0, seed=3),
    Settings(max_new_tokens=20, temperature=0.7, top_k=10, seed=4),
    Settings(max_new_tokens=9, temperature=1.2, top_p=0.9, seed=5),
]


def alone(model, prompt: list[int], settings: Settings) -> list[int]:
    return Engine(model, slots=1).generate([prompt], [settings])[0]


def test_a_batch_of_different_lengths_and_settings_gives_each_row_what_it_gives_alone() -> None:
    model = varied_model(context=48)
    together = Engine(model, slots=4).generate(PROMPTS, MIXED)
    assert [len(t) for t in together] == [s.max_new_tokens for s in MIXED]
    assert together == [alone(model, p, s) for p, s in zip(PROMPTS, MIXED, strict=True)]


def test_the_engine_gives_the_reference_tokens_past_the_context_too() -> None:
    model = varied_model(context=16)  # 40 new tokens: each row's window is cut and its cache rebuilt
    settings = [
        Settings(max_new_tokens=40, temperature=0.0),
        Settings(max_new_tokens=40, temperature=1.0, seed=1),
    ]
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [2]]
    reference = list(reference_ids(model, prompts, settings))
    expected = [[step[b] for step in reference] for b in range(2)]
    assert Engine(model, slots=2).generate(prompts, settings) == expected


def test_a_sequence_joining_mid_flight_or_moved_by_one_leaving_gives_the_tokens_it_gives_alone() -> None:
    model = varied_model(context=64)
    engine = Engine(model, slots=2)
    short = engine.add([9, 8, 7], Settings(max_new_tokens=3, temperature=0.0))  # leaves early: row 1 moves up
    long = engine.add([1, 2], Settings(max_new_tokens=15, temperature=0.0))
    for _ in range(2):
        engine.step()
    late = engine.add([30, 31, 32, 33, 34], Settings(max_new_tokens=10, temperature=0.9, seed=11))
    queued = engine.add([4], Settings(max_new_tokens=6, temperature=0.0))  # waits: no slot free yet
    engine.step()
    assert short.done and not late.tokens and queued in engine.waiting  # both slots were taken this step
    while engine.busy:
        engine.step()
    for seq in (short, long, late, queued):
        assert seq.tokens == alone(model, seq.prompt, seq.settings)


def test_a_seeded_row_draws_the_same_tokens_whatever_else_is_in_the_batch() -> None:
    model = varied_model(context=48)
    mine = Settings(max_new_tokens=15, temperature=1.0, seed=42)
    with_others = Engine(model, slots=3).generate(
        [[3, 4], [1, 2, 3], [9]], [Settings(temperature=1.0, seed=1), mine, Settings(temperature=0.5)]
    )[1]
    assert with_others == alone(model, [1, 2, 3], mine)
    assert with_others != alone(model, [1, 2, 3], Settings(max_new_tokens=15, temperature=1.0, seed=43))
    # one seed for a batch (generate -n 4 --seed S): row 0 is that seed's sequence, with or without the others
    rows = list(generate_ids(model, [[1, 2, 3], [1, 2, 3]], max_new_tokens=10, temperature=1.0, seed=7))
    first = list(generate_ids(model, [[1, 2, 3]], max_new_tokens=10, temperature=1.0, seed=7))
    assert [r[0] for r in rows] == [r[0] for r in first] and [r[1] for r in rows] != [r[0] for r in rows]


def test_rows_end_at_their_end_token_stop_string_or_cancel() -> None:
    model = varied_model(context=64)
    free = alone(model, [1, 2], Settings(max_new_tokens=12, temperature=0.0))
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731 -- one character per token
    engine = Engine(model, slots=4, decode=decode)
    stop = decode(free[4:6])
    end = engine.add([1, 2], Settings(max_new_tokens=12, temperature=0.0, end_ids=(free[3],)))
    stopped = engine.add([1, 2], Settings(max_new_tokens=12, temperature=0.0, stop=("zzzzz", stop)))
    cancelled = engine.add([1, 2], Settings(max_new_tokens=12, temperature=0.0))
    engine.step()
    engine.cancel(cancelled)
    while engine.busy:
        engine.step()
    assert (end.tokens, end.finish) == (free[: free.index(free[3]) + 1], "end")
    assert stopped.finish == "stop" and decode(stopped.tokens).endswith(stop) and stopped.tokens == free[:6]
    assert (cancelled.tokens, cancelled.finish) == (free[:1], "cancelled")
    with pytest.raises(ValueError, match="decode"):
        Engine(model).add([1], Settings(stop=("x",)))


def test_concurrent_sequences_share_steps_instead_of_summing_them() -> None:
    model = varied_model(context=64)
    engine = Engine(model, slots=4)
    budgets = [5, 20, 9, 14]
    engine.generate(
        [[1 + i] for i in range(4)], [Settings(max_new_tokens=n, temperature=0.0) for n in budgets]
    )
    assert engine.steps == max(budgets)


def test_the_cache_grows_for_a_longer_sequence_joining_and_keeps_the_others() -> None:
    model = varied_model(context=64)
    engine = Engine(model, slots=2)
    first = engine.add([1, 2, 3], Settings(max_new_tokens=4, temperature=0.0))
    engine.step()
    size = engine.cache.max_len
    second = engine.add([5, 6], Settings(max_new_tokens=50, temperature=0.0))
    while engine.busy:
        engine.step()
    assert engine.cache.max_len > size
    assert first.tokens == alone(model, [1, 2, 3], first.settings)
    assert second.tokens == alone(model, [5, 6], second.settings)


def test_generation_under_autocast_and_in_train_mode_leaves_the_model_mode_alone() -> None:
    model = varied_model(context=32).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Engine(model, slots=2).generate(
            [[1], [2, 3]], [Settings(max_new_tokens=5, temperature=0.0)] * 2
        )
    assert [len(o) for o in out] == [5, 5] and model.training


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("temperature", -0.1),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("stop", ("",)),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})
    assert list(generate_ids(varied_model(), [[1]], max_new_tokens=0)) == []  # as before: nothing, no error
