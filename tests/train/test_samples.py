"""When --sample-every samples: at the first evaluation at or after each multiple of N, and at the last one."""

from __future__ import annotations

import pytest

from talm.train.samples import is_due


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
