"""The eval stage's configuration (talm.config holds the Config base: strict fields, TOML and flag layering,
docstrings as --help)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from talm.config import Config
from talm.eval.tasks import TASK_NAMES


class EvalConfig(Config):
    """What `evaluate` scores and how."""

    tasks: list[Literal[TASK_NAMES]] = []  # type: ignore[valid-type]
    """Benchmark tasks to score: hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada_openai (or lambada),
    gsm8k (generative: a chat model's greedy replies, their final number against the reference); none: only
    --data-dir's bits per byte."""
    limit: int | None = Field(default=None, ge=1)
    """Score only the first this many examples of each task (unset: all of them)."""
    max_new_tokens: int = Field(default=256, ge=1)
    """Generative tasks (gsm8k): the longest reply generated, in tokens (a reply ends at <|endoftext|>)."""
    batch_size: int = Field(default=32, ge=1)
    """Rows per forward pass while scoring (a row: one context and its choices, at most the model's context
    length)."""
    tasks_dir: str | None = None
    """Directory holding local copies of the tasks' Hub repositories (DIR/OWNER/NAME, e.g. DIR/Rowan/hellaswag);
    unset: the Hugging Face Hub (or its cache)."""
    data_dir: str | None = None
    """Also measure val loss and bits per byte on the val split of this talm data directory (made with the model's
    tokenizer) as training measures them (conversation data: the loss over the assistant's tokens only)."""
    data_tokens: int | None = Field(default=None, ge=1)
    """Tokens of --data-dir's val split evaluated (a fixed slice from its start, as training's val loss); unset:
    the run's own train.eval_tokens, so the val loss is the one its metrics.jsonl recorded."""
