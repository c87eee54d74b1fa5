"""The tokenizer: a byte-level BPE with a GPT-4-style regex pre-split, trained with Hugging Face `tokenizers`.

One class, `Tokenizer`, is what every later stage uses. It loads two file formats:
- talm's own: a Hugging Face `tokenizers` JSON file (what `train` writes, e.g. tokenizers/base.json);
- the original talm/tokencoder JSON: {"name", "regex_pattern", "vocab": {base64 bytes: rank}, "special_tokens"}.

Id layout of the files talm trains: ids 0..255 are the single bytes in byte order, then the merged tokens in
the order they were learned, then the special tokens (see `talm.config.SPECIAL_TOKENS`).

Encoding runs on one of two engines, both giving the same ids:
- tiktoken, built from the same vocabulary (ranks = ids = merge order) and the same regex. It is 2-3x faster
  than HF's `encode_batch` and is used whenever it provably matches: for the original format it *is* the
  reference (the original was tiktoken-based); for HF files it is used only when the file has exactly talm's
  pipeline and every merge is the one tiktoken's rank rule would make (`_merges_match_ranks`). A file that
  fails the check (e.g. a merge list where two merges build the same token) is encoded by HF itself.
- HF `tokenizers`: the reference for HF files, and the fallback.

Round trip: `decode(encode(s)) == s` for every str that is valid Unicode text. A Python str may also hold lone
surrogates (e.g. from JSON "\\ud800" escapes), which cannot be written as UTF-8 at all: encoding replaces each
with U+FFFD, as tiktoken does (so that text decodes to U+FFFD where the surrogate was).

This module imports no torch and no datasets.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from talm.errors import TalmError
from talm.files import check_output_file, write_atomically
from talm.tokenizer.config import SPECIAL_TOKENS

if TYPE_CHECKING:
    import tiktoken
    import tokenizers

EOT = SPECIAL_TOKENS[0]
# GPT-4's (cl100k) split: contractions, words with one leading non-letter, numbers of up to 3 digits,
# punctuation runs, newlines, other whitespace. It matches every character, so no text is ever dropped.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
# Joins documents inside one fast-path encode call. It is registered as an extra special token, so tiktoken
# encodes the text between two separators exactly as it would encode that document alone; a batch in which
# some document contains this spelling is encoded document by document instead.
_DOC_SEPARATOR = "\x00<|talm:document-boundary|>\x00"
_READ_BLOCK_BYTES = 1 << 16  # streaming read size while training; bounded memory whatever the file size
_MAX_CARRY_CHARS = 1 << 20  # text without any safe cut point for 1M chars is cut anyway
_COMPRESSION_SAMPLE_BYTES = 8 << 20  # bytes/token is measured on (up to) the first 8 MB of training text


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which HF's ByteLevel pre-tokenizer uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _hf_token_bytes(token: str) -> bytes:
    return bytes(UNICODE_TO_BYTE[c] for c in token)


def _replace_lone_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8: make them U+FFFD (valid surrogate pairs become their character)."""
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}")
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _fingerprint(document: Any) -> str:
    """sha256 of the canonical JSON of a parsed tokenizer file: independent of whitespace and key order."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _tiktoken_bpe(piece: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge rule on one piece, using only tokens ranked below `max_rank`: repeatedly merge the
    adjacent pair whose concatenation has the lowest rank (leftmost on ties)."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _merges_match_ranks(merges: list[tuple[bytes, bytes]], ranks: dict[bytes, int]) -> bool:
    """True when HF's merge-list BPE and tiktoken's rank BPE give the same ids for this vocabulary.

    They do when every merged token is made by exactly one merge, merge order equals id order, and each merge
    is the split tiktoken's rule itself would reach when building that token from its bytes (the standard
    tiktoken <-> HF conversion). A trainer can break this, e.g. by learning the same string twice from two
    different pairs; such files are then encoded by HF.
    """
    n_multibyte = sum(1 for token in ranks if len(token) > 1)
    if len(merges) != n_multibyte:
        return False
    previous = -1
    for left, right in merges:
        token = left + right
        rank = ranks.get(token)
        if rank is None or rank <= previous or ranks[left] >= rank or ranks[right] >= rank:
            return False
        previous = rank
        if len(token) > 2 and _tiktoken_bpe(token, ranks, rank) != [left, right]:
            return False
    return True


@dataclass
class TrainStats:
    """What one training run did, for the summary line."""

    text_bytes: int
    seconds: float
    sample_bytes: int
    sample_tokens: int

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def bytes_per_token(self) -> float:
        return self.sample_bytes / max(self.sample_tokens, 1)


class Tokenizer:
    """A byte-level BPE tokenizer: `Tokenizer.from_file(path)`, then `encode` / `encode_batch` / `decode`."""

    def __init__(
        self,
        *,
        name: str,
        pattern: str,
        token_bytes: list[bytes],
        special_tokens: dict[str, int],
        merges: list[tuple[bytes, bytes]] | None,
        document: dict[str, Any],
        hf_json: str | None,
        path: Path | None = None,
    ) -> None:
        """Use `from_file` or `train`; this takes the parsed content of either file format.

        `token_bytes[i]` is the bytes of ordinary token i; special tokens follow them. `merges` is the HF merge
        list (None for the original format, where ranks alone define the BPE). `hf_json` is the HF file text
        (None for the original format). `document` is the parsed file, hashed for the fingerprint.
        """
        self.path = path
        self.name = name
        self.pattern = pattern
        self._token_bytes = token_bytes
        self._merges = merges
        self._hf_json = hf_json
        self.special_tokens = dict(special_tokens)
        self.vocab_size = len(token_bytes) + len(special_tokens)
        self.eot_id = special_tokens[EOT]
        self.token_dtype = np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)
        self.fingerprint = _fingerprint(document)

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a talm (HF tokenizers JSON) or original talm/tokencoder JSON file."""
        path = Path(path)
        if not path.exists():
            raise TalmError(
                f"tokenizer file {str(path)!r} not found: pass an existing file, e.g. tokenizers/base.json, "
                "or train one with `train_tokenizer -vs 4096 -n NAME`"
            )
        if not path.is_file():
            raise TalmError(f"tokenizer path {str(path)!r} is not a file: pass a tokenizer .json file")
        try:
            text = path.read_text(encoding="utf-8")
            document = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TalmError(
                f"{str(path)!r} is not a tokenizer file (not valid JSON: {err}): pass a tokenizer .json file"
            ) from None
        if isinstance(document, dict) and "regex_pattern" in document and "vocab" in document:
            return cls._from_original(document, path)
        if isinstance(document, dict) and isinstance(document.get("model"), dict):
            return cls._from_hf(document, text, path)
        raise TalmError(
            f"{str(path)!r} is not a tokenizer file (neither a Hugging Face tokenizers JSON nor an original talm "
            "tokenizer): pass a file written by train_tokenizer"
        )

    @classmethod
    def _from_original(cls, document: dict[str, Any], path: Path | None) -> Tokenizer:
        """The original talm/tokencoder format: base64 token bytes -> rank, plus special tokens."""
        where = str(path) if path else "the tokenizer"

        def bad(why: str) -> TalmError:
            return TalmError(f"{where!r} is not a valid original talm tokenizer ({why}): pass an intact file")

        try:
            ranks = {base64.b64decode(k, validate=True): int(v) for k, v in document["vocab"].items()}
            specials = {str(k): int(v) for k, v in document.get("special_tokens", {}).items()}
            pattern = str(document["regex_pattern"])
        except (AttributeError, TypeError, ValueError) as err:
            raise bad(f"unreadable vocab: {err}") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise bad("token ranks are not 0..n-1")
        if sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(specials))):
            raise bad("special token ids do not follow the ordinary tokens")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise bad("some single bytes have no token, so not every text can be encoded")
        if EOT not in specials:
            raise bad(f"no {EOT} special token")
        problem = _pattern_problem(pattern)
        if problem:
            raise bad(f"its regex_pattern: {problem}")
        token_bytes = [b""] * len(ranks)
        for token, rank in ranks.items():
            token_bytes[rank] = token
        ordered_specials = dict(sorted(specials.items(), key=lambda kv: kv[1]))
        name = str(document.get("name") or (path.stem if path else "tokenizer"))
        return cls(
            name=name,
            pattern=pattern,
            token_bytes=token_bytes,
            special_tokens=ordered_specials,
            merges=None,
            document=document,
            hf_json=None,
            path=path,
        )

    @classmethod
    def _from_hf(cls, document: dict[str, Any], text: str, path: Path | None) -> Tokenizer:
        """A Hugging Face tokenizers JSON file holding a byte-level BPE."""
        where = str(path) if path else "the tokenizer"
        model = document["model"]
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise TalmError(
                f"{where!r} is not a byte-level BPE tokenizer: pass a file written by train_tokenizer"
            )
        try:
            added = {str(t["content"]): int(t["id"]) for t in document.get("added_tokens") or []}
            vocab: dict[str, int] = {**model["vocab"], **added}
        except (KeyError, TypeError, ValueError) as err:
            raise TalmError(
                f"{where!r} has unreadable added tokens ({err!r}): pass an intact tokenizer file"
            ) from None
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise TalmError(f"{where!r} has gaps in its token ids: pass an intact tokenizer file")
        if EOT not in added:
            raise TalmError(f"{where!r} has no {EOT} special token: train it with train_tokenizer")
        specials = {content: i for content, i in sorted(added.items(), key=lambda kv: kv[1])}
        n_ordinary = len(vocab) - len(specials)
        if any(i < n_ordinary for i in specials.values()):
            raise TalmError(
                f"{where!r} has special tokens among its ordinary ids: train it with train_tokenizer"
            )
        try:
            token_bytes = [b""] * n_ordinary
            for token, i in model["vocab"].items():
                if token not in specials:  # HF files may list special tokens in the model's vocab too
                    token_bytes[i] = _hf_token_bytes(token)
            merges = [
                tuple(_hf_token_bytes(part) for part in (m.split(" ") if isinstance(m, str) else m))
                for m in model.get("merges") or []
            ]
        except (KeyError, AttributeError, TypeError):
            raise TalmError(
                f"{where!r} is not a byte-level BPE (its tokens are not byte-level strings): "
                "pass a file written by train_tokenizer"
            ) from None
        known = set(token_bytes)
        for number, merge in enumerate(merges, start=1):
            if (
                len(merge) != 2
                or any(part not in known for part in merge)
                or merge[0] + merge[1] not in known
            ):
                missing = [p for p in (*merge, b"".join(merge)) if p not in known] if len(merge) == 2 else []
                why = (
                    f"names {missing[0]!r}, which is not in its vocab"
                    if missing
                    else f"has {len(merge)} parts, not 2"
                )
                raise TalmError(
                    f"{where!r} is damaged: merge {number} ({model['merges'][number - 1]!r}) {why}: pass an intact tokenizer file "
                    "(or train a new one with train_tokenizer)"
                )
        pattern = _hf_split_pattern(document) or SPLIT_PATTERN
        problem = _pattern_problem(pattern)
        if problem:
            problem = f"its pre-tokenizer {problem}"
        else:
            try:  # HF's own parse catches whatever else it refuses (its regex engine differs from tiktoken's)
                from tokenizers import Tokenizer as HFTokenizer

                HFTokenizer.from_str(text)
            except Exception as err:  # noqa: BLE001 (HF raises plain Exception)
                why = str(err).splitlines()[0] if str(err) else type(err).__name__
                problem = f"Hugging Face tokenizers cannot load it ({why})"
        if problem:
            raise TalmError(
                f"{where!r} is damaged: {problem}: pass an intact "
                "tokenizer file (or train a new one with train_tokenizer)"
            )
        name = path.stem if path else "tokenizer"
        return cls(
            name=name,
            pattern=pattern,
            token_bytes=token_bytes,
            special_tokens=specials,
            merges=merges,  # type: ignore[arg-type]
            document=document,
            hf_json=text,
            path=path,
        )

    # --------------------------------------------------------------------------------------------- engines

    @cached_property
    def _ranks(self) -> dict[bytes, int]:
        return {token: i for i, token in enumerate(self._token_bytes)}

    @cached_property
    def _tiktoken(self) -> tiktoken.Encoding | None:
        """The fast engine, or None where it would not give the same ids as HF (then HF encodes)."""
        import tiktoken

        if self._merges is not None:  # an HF file: only when provably the same BPE
            document = json.loads(self._hf_json or "{}")
            if not _is_talm_pipeline(document) or not _merges_match_ranks(self._merges, self._ranks):
                return None
        enc = tiktoken.Encoding(
            f"talm-{self.name}",
            pat_str=self.pattern,
            mergeable_ranks=self._ranks,
            special_tokens={**self.special_tokens, _DOC_SEPARATOR: self.vocab_size},
        )
        # Use both regex paths once here, in the thread that builds the engine (never an encode worker): the
        # regex crate gives its fast cache slot to the first thread that matches, and if that is one of the
        # encode workers, the two workers run unevenly. Measured: encode_batch ~40% faster with this.
        enc.encode_to_numpy(
            f"warm up{_DOC_SEPARATOR}1", allowed_special={_DOC_SEPARATOR}, disallowed_special=()
        )
        enc.encode_ordinary("warm up")
        return enc

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
        ranks = self._ranks
        merges = []
        for rank, token in enumerate(self._token_bytes):
            if len(token) > 1:
                parts = _tiktoken_bpe(token, ranks, rank)
                if len(parts) != 2:
                    raise TalmError(
                        f"token {token!r} of {self.name!r} cannot be built from two smaller tokens, so it has no "
                        "Hugging Face equivalent: use the tokenizer through talm, which encodes it with tiktoken"
                    )
                merges.append((parts[0], parts[1]))
        return _build_hf_bpe(self._token_bytes, merges, self.special_tokens, self.pattern)

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
            return hf.encode(_replace_lone_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (special spellings as ordinary text), as arrays of `token_dtype`, encoded in
        parallel on all cores."""
        if len(texts) == 0:
            return []
        enc = self._tiktoken
        if enc is None:
            return self._hf_encode_batch(texts)
        groups = _split_evenly(texts, _threads() * 4)
        if len(groups) == 1:
            return self._fast_encode_group(groups[0])
        out: list[np.ndarray] = []
        for arrays in _executor().map(self._fast_encode_group, groups):
            out.extend(arrays)
        return out

    def _fast_encode_group(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One tiktoken call for many documents joined by the separator, then cut at the separators."""
        enc = self._tiktoken
        assert enc is not None
        joined = _DOC_SEPARATOR.join(texts)
        if joined.count(_DOC_SEPARATOR) != len(texts) - 1:  # some document contains the separator itself
            return [self._fast_encode_one(t) for t in texts]
        try:
            ids = enc.encode_to_numpy(joined, allowed_special={_DOC_SEPARATOR}, disallowed_special=())
        except UnicodeEncodeError:
            ids = enc.encode_to_numpy(
                _replace_lone_surrogates(joined), allowed_special={_DOC_SEPARATOR}, disallowed_special=()
            )
        cuts = np.flatnonzero(ids == self.vocab_size)
        ids = ids.astype(self.token_dtype)
        starts = np.concatenate(([0], cuts + 1)).tolist()
        ends = np.concatenate((cuts, [len(ids)])).tolist()
        return [ids[s:e] for s, e in zip(starts, ends, strict=True)]

    def _fast_encode_one(self, text: str) -> np.ndarray:
        enc = self._tiktoken
        assert enc is not None
        try:
            ids = enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            ids = enc.encode_to_numpy(_replace_lone_surrogates(text), disallowed_special=())
        return ids.astype(self.token_dtype)

    def _hf_encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        texts = list(texts)
        try:
            encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:  # lone surrogates somewhere (or not a str: then this raises again)
            encodings = self._hf.encode_batch_fast(
                [_replace_lone_surrogates(t) for t in texts], add_special_tokens=False
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
        text = self._hf_json if self._hf_json is not None else self.to_hf().to_str(pretty=True)
        path.parent.mkdir(parents=True, exist_ok=True)  # e.g. tokenizers/, which output_path checked
        try:
            write_atomically(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite)
        except FileExistsError:
            raise TalmError(
                f"{str(path)!r} already exists: pick another name, or pass --force to overwrite it"
            ) from None
        self.path = path
        return path

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the content (e.g. to send it to worker processes); engines are rebuilt on first use."""
        engines = ("_ranks", "_tiktoken", "_hf", "_hf_with_specials")
        return {k: v for k, v in self.__dict__.items() if k not in engines}

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, path={str(self.path)!r})"


# ---------------------------------------------------------------------------------------------------- helpers


def _hf_split_pattern(document: dict[str, Any]) -> str | None:
    pre = document.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if (
            step.get("type") == "Split"
            and isinstance(step.get("pattern"), dict)
            and "Regex" in step["pattern"]
        ):
            return step["pattern"]["Regex"]
    return None


def _pattern_problem(pattern: str) -> str | None:
    """Why the pre-tokenizer regex does not compile in tiktoken's engine (which encodes with it), or None."""
    import tiktoken

    try:
        tiktoken.Encoding("talm-check", pat_str=pattern, mergeable_ranks={b"a": 0}, special_tokens={})
    except BaseException as err:  # noqa: BLE001 (the regex error comes from Rust as a ValueError or a panic)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        return f"regex {pattern!r} does not compile ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def _is_talm_pipeline(document: dict[str, Any]) -> bool:
    """Exactly the pipeline `train` builds: no normalizer, regex Split + ByteLevel without its own regex,
    a plain BPE, special tokens matched verbatim. Only then can tiktoken reproduce HF's ids."""
    pre = document.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    model = document["model"]
    plain_bpe = (
        model.get("dropout") is None
        and model.get("unk_token") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and not model.get("ignore_merges")
    )
    specials_verbatim = all(
        t.get("special")
        and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized"))
        for t in document.get("added_tokens") or []
    )
    return (
        document.get("normalizer") is None
        and document.get("post_processor") is None
        and steps is not None
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex")
        and not steps[1].get("add_prefix_space")
        and plain_bpe
        and specials_verbatim
    )


def _build_hf_bpe(
    token_bytes: list[bytes], merges: list[tuple[bytes, bytes]], special_tokens: dict[str, int], pattern: str
) -> tokenizers.Tokenizer:
    """talm's HF pipeline around a BPE given as token bytes (id order) and merges."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    def to_str(b: bytes) -> str:
        return "".join(BYTE_TO_UNICODE[x] for x in b)

    vocab = {to_str(t): i for i, t in enumerate(token_bytes)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(to_str(a), to_str(b)) for a, b in merges]))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    for content in sorted(special_tokens, key=special_tokens.__getitem__):
        hf.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    got = {content: hf.token_to_id(content) for content in special_tokens}
    assert got == special_tokens, f"special token ids moved: {got} != {special_tokens}"
    return hf


_EXECUTOR: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool)


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    """One shared pool: tiktoken releases the GIL while encoding, so threads use every core. A process forked
    after the pool was made (e.g. a multiprocessing worker) gets its own: the parent's threads do not exist there."""
    global _EXECUTOR
    if _EXECUTOR is None or _EXECUTOR[0] != os.getpid():
        _EXECUTOR = (
            os.getpid(),
            ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="talm-encode"),
        )
    return _EXECUTOR[1]


def _split_evenly(texts: Sequence[str], max_groups: int) -> list[Sequence[str]]:
    """Contiguous groups of roughly equal total length (>= 64 KB each, so small batches stay one call)."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    total = int(lengths.sum())
    n_groups = max(1, min(max_groups, total // (1 << 16), len(texts)))
    if n_groups == 1:
        return [texts]
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(1, n_groups) * total / n_groups).tolist()
    edges = sorted({0, *bounds, len(texts)})
    return [texts[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


# --------------------------------------------------------------------------------------------------- training


TOKENIZER_DIR = Path("tokenizers")  # where train_tokenizer writes NAME.json (relative to the project root)


def output_path(
    name: str, *, overwrite: bool = False, directory: str | os.PathLike[str] = TOKENIZER_DIR
) -> Path:
    """Where a tokenizer called `name` is written (tokenizers/NAME.json), checked before any training: the
    folder can be created and written, the file is not a directory, and it is new unless `overwrite`."""
    out = Path(directory) / f"{name}.json"
    if out.is_dir():
        raise TalmError(f"{str(out)!r} is a directory: pick another name, or remove that directory")
    if out.exists() and not overwrite:
        raise TalmError(f"{str(out)!r} already exists: pick another name, or pass --force to overwrite it")
    return check_output_file(out, overwrite=True, instead="run train_tokenizer from another directory")


def check_text_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every training file must exist, be a readable regular file and hold some text."""
    if not paths:
        raise TalmError("no text files given: pass --text-file FILE [FILE ...]")
    checked = []
    for p in map(Path, paths):
        if not p.exists():
            raise TalmError(f"text file {str(p)!r} not found: pass an existing UTF-8 text file")
        if p.is_dir():
            raise TalmError(f"{str(p)!r} is a directory: pass the text files inside it (e.g. {p}/*.txt)")
        if not p.is_file():
            raise TalmError(f"{str(p)!r} is not a regular file: pass a UTF-8 text file")
        if not os.access(p, os.R_OK):
            raise TalmError(f"text file {str(p)!r} is not readable: fix its permissions")
        if p.stat().st_size == 0:
            raise TalmError(f"text file {str(p)!r} is empty: pass a file with training text")
        checked.append(p)
    return checked


_LETTER_SPACE_LETTER = re.compile(r"[^\W\d_] [^\W\d_]")


def _safe_cut(text: str) -> int:
    """Where to cut a block of text so the regex split is unchanged (0 if there is no such point).

    No piece of SPLIT_PATTERN spans a newline followed by a non-space, nor the space of "letter, space,
    letter" (the piece before ends at the letter; " word" starts a new piece), so cutting there is exact.
    """
    end = len(text) - 1
    while (i := text.rfind("\n", 0, end)) != -1:
        if not text[i + 1].isspace():
            return i + 1
        end = i
    # No such newline (e.g. every line indented): fall back to a space between letters near the end.
    spaces = list(_LETTER_SPACE_LETTER.finditer(text, max(0, len(text) - _READ_BLOCK_BYTES)))
    return spaces[-1].start() + 1 if spaces else 0


def _not_utf8(path: str | os.PathLike[str], byte: int, offset: int, line: int) -> TalmError:
    """The one message for a text file that is not UTF-8 (train_tokenizer and download_data say the same)."""
    return TalmError(
        f"{str(path)!r} is not UTF-8 text: invalid byte 0x{byte:02x} at byte offset {offset} (line {line}): "
        "convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8`"
    )


def _utf8_blocks(f: Any, path: str | os.PathLike[str], block_bytes: int) -> Iterator[tuple[str, int, bool]]:
    """Decode a binary file as UTF-8 block by block: (text, raw bytes read, final). Bytes that are not UTF-8
    raise a TalmError naming the file, byte offset and line."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # raw bytes read so far
    newlines = 0  # b"\n" in fully decoded blocks
    while True:
        data = f.read(block_bytes)
        final = not data
        pending = decoder.getstate()[0]
        try:
            text = decoder.decode(data, final=final)
        except UnicodeDecodeError as err:
            seen = pending + data
            line = newlines + seen[: err.start].count(b"\n") + 1
            raise _not_utf8(path, seen[err.start], offset - len(pending) + err.start, line) from None
        offset += len(data)
        newlines += data.count(b"\n")
        yield text, len(data), final
        if final:
            return


def check_utf8(f: Any, path: str | os.PathLike[str], *, block_bytes: int = 1 << 20) -> None:
    """Read binary file object `f` (named `path`) to its end; TalmError at the first byte that is not UTF-8."""
    for _ in _utf8_blocks(f, path, block_bytes):
        pass


def read_text_blocks(path: Path, *, block_bytes: int = _READ_BLOCK_BYTES) -> Iterator[tuple[str, int]]:
    """Stream a UTF-8 file as (text block, raw bytes consumed) in bounded memory; blocks end at points where
    the pre-tokenizer's split is unchanged, so training on the stream equals training on the whole file.
    Bytes that are not UTF-8 raise a TalmError naming the file, byte offset and line."""
    carry = ""
    with open(path, "rb") as f:
        for text, n_bytes, final in _utf8_blocks(f, path, block_bytes):
            text = carry + text
            if final:
                if text:
                    yield text, n_bytes
                return
            cut = _safe_cut(text)
            if cut == 0 and len(text) > _MAX_CARRY_CHARS:
                cut = len(text)  # no safe point in 1M chars: cut anyway, memory must stay bounded
            carry = text[cut:]
            yield text[:cut], n_bytes


def train(
    text_files: Sequence[str | os.PathLike[str]],
    vocab_size: int,
    *,
    name: str = "tokenizer",
    progress: bool = True,
    block_bytes: int = _READ_BLOCK_BYTES,
) -> tuple[Tokenizer, TrainStats]:
    """Train a byte-level BPE on the files (streamed) with `vocab_size` ids in total, specials included.

    The returned tokenizer lives in memory (`path` None); `save` writes it. The vocabulary can come out smaller
    than asked when the text has no more pairs to merge.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tqdm import tqdm

    from talm.tokenizer.config import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE

    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise TalmError(
            f"vocab_size={vocab_size} is out of range: pick {MIN_VOCAB_SIZE} (256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens) to {MAX_VOCAB_SIZE}"
        )
    files = check_text_files(text_files)
    total_bytes = sum(p.stat().st_size for p in files)

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample: list[str] = []
    sample_bytes = 0
    stop = threading.Event()

    def stream() -> Iterator[str]:
        nonlocal sample_bytes
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
            for path in files:
                for text, n_bytes in read_text_blocks(path, block_bytes=block_bytes):
                    if stop.is_set():
                        raise KeyboardInterrupt  # ends the abandoned training thread at its next read
                    bar.update(n_bytes)
                    if sample_bytes < _COMPRESSION_SAMPLE_BYTES:
                        sample.append(text)
                        sample_bytes += len(text.encode("utf-8"))
                    if text:
                        yield text
            bar.set_description(f"read {bar.n / 1e6:.0f} MB, now learning {vocab_size} tokens")

    start = time.perf_counter()
    _run_interruptibly(lambda: hf.train_from_iterator(stream(), trainer=trainer), stop)
    tokenizer = _relayout(hf, name)
    seconds = time.perf_counter() - start
    sample_tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    sample_bytes = sum(len(s.encode("utf-8")) for s in sample)
    return tokenizer, TrainStats(total_bytes, seconds, sample_bytes, sample_tokens)


def _run_interruptibly(work: Callable[[], object], stop: threading.Event) -> None:
    """Run `work` in a daemon thread while the main thread waits, so Ctrl-C is handled at once.

    HF's trainer pulls the text iterator from its own Rust threads, so a SIGINT would otherwise wait for the
    whole training to finish. On Ctrl-C, `stop` tells the reader to end the abandoned thread and the
    KeyboardInterrupt goes up; nothing has been written yet.
    """
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as err:  # handed to the main thread below
            failure.append(err)

    thread = threading.Thread(target=target, name="talm-train-tokenizer", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        stop.set()
        raise
    if failure:
        raise failure[0]


def _relayout(trained: tokenizers.Tokenizer, name: str) -> Tokenizer:
    """Rebuild a trained HF BPE in talm's id layout: bytes 0..255 in byte order, merged tokens in merge order,
    then the special tokens. (HF's trainer numbers its alphabet by character, not byte.)"""
    model = json.loads(trained.to_str())["model"]
    merges = [
        tuple(_hf_token_bytes(part) for part in (m.split(" ") if isinstance(m, str) else m))
        for m in model["merges"]
    ]
    token_bytes = [bytes([b]) for b in range(256)]
    known = set(token_bytes)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            token_bytes.append(left + right)
    specials = {s: len(token_bytes) + i for i, s in enumerate(SPECIAL_TOKENS)}
    hf = _build_hf_bpe(token_bytes, merges, specials, SPLIT_PATTERN)  # type: ignore[arg-type]
    text = hf.to_str(pretty=True)
    tokenizer = Tokenizer._from_hf(json.loads(text), text, None)
    tokenizer.name = name
    return tokenizer
