"""The use stage's configuration (talm.config holds the Config base: strict fields, TOML and flag layering, docstrings as --help)."""

from __future__ import annotations

from pydantic import (
    Field,
)

from talm.config import Config, Seed

# The dtypes a model's weights can be exported (and benchmarked) in, by their torch names. Plain strings, so the
# command line can offer them without importing torch.
DTYPES = ("float32", "bfloat16", "float16")

# ================================================================================================================
# Using the model (sample.py, export.py, metrics plots, cli/generate.py, cli/export_model.py)
# ================================================================================================================


class SampleConfig(Config):
    """How `generate` picks each next token, and how many."""

    max_new_tokens: int = Field(default=256, ge=1)
    """Most tokens to generate per sample; generation also stops at <|endoftext|>."""
    temperature: float = Field(default=0.8, ge=0.0)
    """Divides the logits before sampling: lower is more predictable, 0 always picks the likeliest token."""
    top_k: int | None = Field(default=None, ge=1)
    """Sample only among the k likeliest tokens (unset: no limit)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: sample only among the likeliest tokens whose probabilities add up to top_p (1: all)."""
    num_samples: int = Field(default=1, ge=1)
    """Samples to generate for each prompt."""
    seed: Seed | None = None
    """Random seed: the same seed, prompt and settings give the same text (unset: different every run)."""
