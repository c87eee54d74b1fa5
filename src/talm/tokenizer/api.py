"""The tokenizer every later stage uses: `Tokenizer`, a byte-level BPE with a GPT-4-style regex pre-split.

`Tokenizer.from_file(path)` loads either file format (see talm.tokenizer.formats); `talm.tokenizer.train`
trains new ones. Id layout of the files talm trains: ids 0..255 are the single bytes in byte order, then the
merged tokens in the order they were learned, then the special tokens (see `talm.tokenizer.config`).

Encoding runs on one of two engines, both giving the same ids:
- tiktoken (talm.tokenizer.fast), built from the same vocabulary (ranks = ids = merge order) and the same
  regex, 2-3x faster. For the original format it *is* the reference; for HF files it is used only when the
  file has exactly talm's pipeline and every merge is the one tiktoken's rank rule would make. A file that
  fails the check (e.g. a merge list where two merges build the same token) is encoded by HF itself.
- HF `tokenizers`: the reference for HF files, and the fallback.

Round trip: `decode(encode(s)) == s` for every str that is valid Unicode text. A Python str may also hold lone
surrogates (e.g. from JSON "\\ud800" escapes), which cannot be written as UTF-8 at all: encoding replaces each
with U+FFFD, as tiktoken does (so that text decodes to U+FFFD where the surrogate was).

This module imports no torch and no datasets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from talm.tokenizer import fast
from talm.tokenizer.formats import (
    EOT,
    TokenizerFile,
    build_hf_bpe,
    fingerprint,
    is_talm_pipeline,
    read_tokenizer_file,
    write_hf,
)

if TYPE_CHECKING:
    import tiktoken
    import tokenizers


class Tokenizer:
    """A byte-level BPE tokenizer: `Tokenizer.from_file(path)`, then `encode` / `encode_batch` / `decode`."""

    def __init__(self, content: TokenizerFile) -> None:
        """Use `from_file` or `talm.tokenizer.train.train`; this takes a parsed file of either format."""
        self.path = content.path
        self.name = content.name
        self.pattern = content.pattern
        self._token_bytes = content.token_bytes
        self._merges = content.merges
        self._hf_json = content.hf_json
        self.special_tokens = dict(content.special_tokens)
        # Ids are 0..vocab_size-1: the ordinary tokens, then the special ones (or, in a foreign HF file, special
        # tokens among them, token_bytes then covering every id).
        self.vocab_size = max(len(content.token_bytes), 1 + max(content.special_tokens.values()))
        self.eot_id = self.special_tokens[EOT]
        self.token_dtype = np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)
        self.fingerprint = fingerprint(content.document)
        self._merges_follow_ranks = content.merges_follow_ranks

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a talm (HF tokenizers JSON) or original talm/tokencoder JSON file."""
        return cls(read_tokenizer_file(path))

    # --------------------------------------------------------------------------------------------- engines

    @cached_property
    def _ranks(self) -> dict[bytes, int]:
        return {token: i for i, token in enumerate(self._token_bytes)}

    @cached_property
    def _tiktoken(self) -> tiktoken.Encoding | None:
        """The fast engine, or None where it would not give the same ids as HF (then HF encodes)."""
        if self._merges is not None:  # an HF file: only when provably the same BPE
            document = json.loads(self._hf_json or "{}")
            if not is_talm_pipeline(document):
                return None
            if not self._merges_follow_ranks and not fast.merges_match_ranks(self._merges, self._ranks):
                return None
        return fast.build_engine(self.name, self.pattern, self._ranks, self.special_tokens, self.vocab_size)

    @cached_property
    def _hf(self) -> tokenizers.Tokenizer:
        """HF tokenizer that encodes special-token spellings as ordinary text."""
        hf = self._build_hf()
        hf.encode_special_tokens = True
        return hf

    @cached_property
    def _hf_with_specials(self) -> tokenizers.Tokenizer:
        """HF tokenizer that turns special-token spellings into their ids."""
        hf = self._build_hf()
        hf.encode_special_tokens = False
        return hf

    def _build_hf(self) -> tokenizers.Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        if self._hf_json is not None:
            return HFTokenizer.from_str(self._hf_json)
        # Original format: derive each token's merge the way tiktoken's rank rule builds it.
        merges = fast.merges_from_ranks(self._token_bytes, self._ranks, self.name)
        return build_hf_bpe(self._token_bytes, merges, self.special_tokens, self.pattern)

    def to_hf(self) -> tokenizers.Tokenizer:
        """A Hugging Face `tokenizers.Tokenizer` giving the same ids (special-token spellings become their ids,
        as `transformers` expects)."""
        return self._build_hf()

    # -------------------------------------------------------------------------------------------- encoding

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token spellings in it are ordinary text unless `allow_special`."""
        enc = self._tiktoken
        if enc is not None:
            if allow_special:
                return enc.encode(text, allowed_special=set(self.special_tokens), disallowed_special=())
            return enc.encode_ordinary(text)
        hf = self._hf_with_specials if allow_special else self._hf
        try:
            return hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # HF's way of refusing a str with lone surrogates
            if not isinstance(text, str):
                raise
            return hf.encode(fast.replace_lone_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, num_threads: int | None = None) -> list[np.ndarray]:
        """Token ids of each text (special spellings as ordinary text), as arrays of `token_dtype`, encoded in
        parallel on `num_threads` threads (default: one per core; HF's fallback engine uses its own pool)."""
        if len(texts) == 0:
            return []
        enc = self._tiktoken
        if enc is not None:
            return fast.encode_batch(enc, texts, self.vocab_size, self.token_dtype, num_threads)
        texts = list(texts)
        try:
            encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:  # lone surrogates somewhere (or not a str: then this raises again)
            encodings = self._hf.encode_batch_fast(
                [fast.replace_lone_surrogates(t) for t in texts], add_special_tokens=False
            )
        return [np.array(e.ids, dtype=self.token_dtype) for e in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of the ids (special tokens as their spelling). Invalid UTF-8 (e.g. a cut multi-byte
        character) becomes U+FFFD."""
        # numpy arrays and torch tensors have .tolist() (fast, gives Python ints); anything else is iterated
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(
                f"token id {bad} is outside this tokenizer's vocabulary 0..{self.vocab_size - 1}"
            )
        enc = self._tiktoken
        if enc is not None:
            return enc.decode_bytes(ids).decode("utf-8", errors="replace")
        specials = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        table = self._token_bytes
        return b"".join(specials[i] if i in specials else table[i] for i in ids).decode("utf-8", "replace")

    # ------------------------------------------------------------------------------------------------ saving

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the tokenizer as HF tokenizers JSON, atomically; refuse an existing file unless `overwrite`."""
        path = Path(path)
        write_hf(
            path,
            self._hf_json if self._hf_json is not None else self.to_hf().to_str(pretty=True),
            overwrite=overwrite,
        )
        self.path = path
        return path

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the content (e.g. to send it to worker processes); engines are rebuilt on first use."""
        engines = ("_ranks", "_tiktoken", "_hf", "_hf_with_specials")
        return {k: v for k, v in self.__dict__.items() if k not in engines}

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, path={str(self.path)!r})"
