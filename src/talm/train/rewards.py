"""Reward functions for reinforcement learning with verifiable rewards: a reply's text and its prompt's reference
answer -> a number, looked up by the name the config gives (`grpo.reward`).

- final_number: 1 when the reply's final number is the reference, else 0 (GSM8K as lm-evaluation-harness's
  "flexible-extract" reads it: talm.data.prompts.answers_match), the reward nanochat's GRPO uses on GSM8K;
- exact_text: 1 when the reply, trimmed, is the reference, else 0 (tasks whose answer is not a number).

A Python caller adds its own with `register_reward("name", fn)` before training; a config naming an unknown
reward is refused in one line listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable

from talm.data.prompts import answers_match
from talm.errors import TalmError

Reward = Callable[[str, str], float]  # (reply text, reference answer) -> reward


def final_number(reply: str, reference: str) -> float:
    return float(answers_match(reply, reference))


def exact_text(reply: str, reference: str) -> float:
    return float(reply.strip() == reference.strip())


REWARDS: dict[str, Reward] = {"final_number": final_number, "exact_text": exact_text}


def register_reward(name: str, reward: Reward) -> None:
    """Make `reward` available as grpo.reward = `name` (for Python callers with a task of their own)."""
    REWARDS[name] = reward


def get_reward(name: str) -> Reward:
    reward = REWARDS.get(name)
    if reward is None:
        raise TalmError(
            f"unknown reward {name!r}: pass --grpo.reward with one of {', '.join(REWARDS)} (or register your own "
            "with talm.train.rewards.register_reward)"
        )
    return reward
