"""Configuration as data: one pydantic model per concern, validated once at the edge.

Every config class derives from `Config`: typed fields whose docstrings become the `--help` text of the
command-line flags (see `talm.cli.common`), unknown keys rejected (`extra="forbid"`), cross-field rules as
validators. Configs can be read from TOML files and overridden field by field; a validation failure becomes a
one-line `TalmError` naming the field, the value and the rule.

This module is a leaf: it imports nothing else from talm but `errors`, and never torch.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from talm.errors import TalmError


class Config(BaseModel):
    """Base of every talm config: strict about unknown keys, documented field by field."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        validate_default=True,
    )


def describe_validation_error(err: ValidationError, flag_names: dict[str, str] | None = None) -> str:
    """One line for a pydantic error: which field, which value, which rule.

    `flag_names` maps a dotted field path ("model.n_layer") to how the user spelled it ("--model.n_layer"),
    so the message names what the user typed.
    """
    flag_names = flag_names or {}
    parts = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        name = flag_names.get(path, path or "config")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown setting {name!r}: check its spelling (see --help for the valid ones)")
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        value = e.get("input")
        if isinstance(value, dict) or path == "":
            parts.append(f"{name}: {msg}")
        else:
            parts.append(f"{name}={value!r}: {msg}")
    return "; ".join(parts)


def validate(cls: type[Config], data: dict[str, Any], flag_names: dict[str, str] | None = None) -> Any:
    """Build `cls` from plain data, turning a validation failure into a one-line TalmError."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise TalmError(describe_validation_error(err, flag_names)) from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into plain data (validated later, together with any overrides)."""
    p = Path(path)
    if not p.is_file():
        raise TalmError(f"config file {str(p)!r} not found: pass the path of an existing .toml file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TalmError(f"config file {str(p)!r} is not valid TOML ({err}): fix the file") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base` (nested tables merge, other values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """`set_dotted(d, "model.n_layer", 12)` sets d["model"]["n_layer"] = 12, creating tables as needed."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


# ----------------------------------------------------------------------------------------------------------------
# The model's shape. (Each stage adds its own config class below, in the order of the pipeline.)


class ModelConfig(Config):
    """The transformer's architecture: everything needed to rebuild the same network from its weights."""

    vocab_size: int | None = Field(default=None, ge=2)
    """Token ids the model knows; taken from the tokenizer when not set. Padded to a multiple of 64 inside."""
    context_length: int = Field(default=256, ge=1)
    """Longest sequence (in tokens) the model attends over."""
    n_layer: int = Field(default=6, ge=1)
    """Number of transformer blocks."""
    n_head: int = Field(default=6, ge=1)
    """Attention heads per block (query heads)."""
    n_kv_head: int | None = Field(default=None, ge=1)
    """Key/value heads for grouped-query attention; must divide n_head. Unset means n_head (plain attention)."""
    d_model: int = Field(default=384, ge=2)
    """Width of the residual stream; must be a multiple of n_head with an even head size."""
    mlp_hidden: int | None = Field(default=None, ge=1)
    """Hidden width of the SwiGLU MLP. Unset means 8/3 * d_model rounded up to a multiple of 64."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """Base of the rotary position embedding's frequencies."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of the RMSNorm layers."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output layer."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on attention and residual outputs during training (0 for pretraining on enough data)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "pick a width that is a multiple of the head count"
            )
        if (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"head size d_model/n_head={self.d_model // self.n_head} is odd: rotary embeddings need an even "
                "head size"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}: pick a divisor of n_head"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding matrix: the vocab rounded up to a multiple of 64 for fast matmuls."""
        if self.vocab_size is None:
            raise ValueError("vocab_size is not set: take it from the tokenizer before building the model")
        return 64 * -(-self.vocab_size // 64)


# ================================================================================================================
# Tokenizer stage (tokenizer.py, cli/train_tokenizer.py)
# ================================================================================================================

# Special tokens every talm tokenizer reserves, in id order after the ordinary tokens: the document separator,
# then the chat roles (reserved like the original talm did, for later fine-tuning).
SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")
# 256 byte tokens + the specials is the smallest useful vocabulary; 2**20 is far beyond any sensible one.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**20
_TOKENIZER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TokenizerConfig(Config):
    """What `train_tokenizer` trains: a byte-level BPE written to tokenizers/NAME.json."""

    vocab_size: int = Field(ge=MIN_VOCAB_SIZE, le=MAX_VOCAB_SIZE)
    """Total token ids, counting the 256 byte tokens and the 4 special tokens (so merges = vocab_size - 260)."""
    name: str
    """Name of the tokenizer: it is written to tokenizers/NAME.json."""
    text_files: list[Path] = Field(default_factory=lambda: [Path("tiny-shakespeare.txt")], min_length=1)
    """UTF-8 text file(s) to train on, read as a stream (they may be larger than memory)."""
    force: bool = False
    """Overwrite tokenizers/NAME.json if it already exists."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name:
            raise ValueError("the name is empty: pass a plain name such as 'mytok'")
        if "/" in name or "\\" in name:
            raise ValueError("the name contains a path separator: pass a plain name such as 'mytok'")
        if name.endswith(".json"):
            raise ValueError(f"drop the .json suffix: pass {name[: -len('.json')]!r}")
        if len(name) > 100 or not _TOKENIZER_NAME.fullmatch(name):
            raise ValueError(
                "use only letters, digits, '.', '_' and '-' (at most 100, starting with a letter or digit)"
            )
        return name


# ================================================================================================================
# Data stage (corpus.py, shards.py, cli/download_data.py)
# ================================================================================================================


# ================================================================================================================
# Training stage (loader.py, optim.py, trainer.py, checkpoint.py, cli/train_model.py)
# ================================================================================================================


# ================================================================================================================
# Using the model (sample.py, export.py, metrics plots, cli/generate.py, cli/export_model.py)
# ================================================================================================================
