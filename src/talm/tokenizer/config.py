"""The tokenizer stage's configuration (talm.config holds the Config base: strict fields, TOML and flag layering, docstrings as --help)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    field_validator,
)

from talm.config import Config, PathField
from talm.files import PLAIN_NAME_RULE, is_plain_name

# ================================================================================================================
# Tokenizer stage (talm.tokenizer, cli/train_tokenizer.py)
# ================================================================================================================

# Special tokens every talm tokenizer reserves, in id order after the ordinary tokens: the document separator,
# then the chat roles (reserved like the original talm did, for later fine-tuning).
SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")
# 256 byte tokens + the specials is the smallest useful vocabulary; 2**20 is far beyond any sensible one.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**20
# Who learns the merges (talm.tokenizer.trainers); "auto" is rustbpe where it is installed.
Trainer = Literal["auto", "rustbpe", "huggingface"]


def vocab_size_problem(vocab_size: int) -> str | None:
    """Why `vocab_size` cannot be trained, or None: the one check, used by the flag/TOML validation below
    and by `talm.tokenizer.train.train` (for Python callers, who skip the config)."""
    if vocab_size < MIN_VOCAB_SIZE:
        return (
            f"must be at least {MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens): "
            "pick e.g. 1024 for tiny-shakespeare, 32768 or more for web text"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        return f"must be at most {MAX_VOCAB_SIZE}: pick e.g. 32768 to 131072 for web text"
    return None


class TokenizerConfig(Config):
    """What `train_tokenizer` trains: a byte-level BPE written to tokenizers/NAME.json."""

    vocab_size: int
    """Total token ids, counting the 256 byte tokens and the 4 special tokens (so merges = vocab_size - 260)."""
    name: str
    """Name of the tokenizer: it is written to tokenizers/NAME.json."""
    text_files: list[PathField] = Field(default_factory=lambda: [Path("tiny-shakespeare.txt")], min_length=1)
    """UTF-8 text file(s) to train on, read as a stream (they may be larger than memory)."""
    force: bool = False
    """Overwrite tokenizers/NAME.json if it already exists."""
    trainer: Trainer = "auto"
    """The BPE trainer: rustbpe (about twice as fast; installed with talm on Linux x86-64/aarch64, macOS and
    Windows x86-64), huggingface (tokenizers' BpeTrainer), or auto (rustbpe when it is installed). Both write
    the same file format; their vocabularies can differ where pairs tie in count."""

    @field_validator("vocab_size")
    @classmethod
    def _check_vocab_size(cls, vocab_size: int) -> int:
        problem = vocab_size_problem(vocab_size)
        if problem:
            raise ValueError(problem)
        return vocab_size

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name:
            raise ValueError("the name is empty: pass a plain name such as 'mytok'")
        if "/" in name or "\\" in name:
            raise ValueError("the name contains a path separator: pass a plain name such as 'mytok'")
        if name.endswith(".json"):
            raise ValueError(f"drop the .json suffix: pass {name[: -len('.json')]!r}")
        if not is_plain_name(name):
            raise ValueError(PLAIN_NAME_RULE)
        return name
