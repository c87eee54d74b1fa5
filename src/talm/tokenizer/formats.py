"""The two tokenizer file formats talm reads, the one it writes, and the fingerprint: every rule about what a
tokenizer file must hold lives here, so `Tokenizer` (api.py) and training (train.py) share one definition.

- talm's own: a Hugging Face `tokenizers` JSON file holding a byte-level BPE (what training writes, e.g.
  tokenizers/base.json). Read by `parse_hf`, written by `build_hf_bpe(...).to_str()` and `write_hf`.
- the original talm/tokencoder JSON: {"name", "regex_pattern", "vocab": {base64 bytes: rank},
  "special_tokens"}. Read by `parse_original` (talm never writes it: `save` converts it to the HF format).

Both parse into a `TokenizerFile`, the plain content a `Tokenizer` is built from. Imports no torch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from talm.errors import TalmError
from talm.files import write_atomically
from talm.tokenizer.config import SPECIAL_TOKENS

if TYPE_CHECKING:
    import tokenizers

EOT = SPECIAL_TOKENS[0]
# GPT-4's (cl100k) split: contractions, words with one leading non-letter, numbers of up to 3 digits,
# punctuation runs, newlines, other whitespace. It matches every character, so no text is ever dropped.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)


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


def hf_token_bytes(token: str) -> bytes:
    """The bytes of an HF byte-level token string (KeyError for a character outside the byte map)."""
    return bytes(UNICODE_TO_BYTE[c] for c in token)


def hf_merges(merges: list[Any]) -> list[tuple[bytes, ...]]:
    """An HF merge list ("a b" strings or [a, b] pairs) as byte tuples."""
    return [
        tuple(hf_token_bytes(part) for part in (m.split(" ") if isinstance(m, str) else m)) for m in merges
    ]


def fingerprint(document: Any) -> str:
    """sha256 of the canonical JSON of a parsed tokenizer file: independent of whitespace and key order."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class TokenizerFile:
    """The content of a tokenizer file in talm's id layout: `token_bytes[i]` is the bytes of ordinary token i;
    the special tokens follow them (in a foreign HF file, e.g. SmolLM's, they may come first: then token_bytes
    covers every id, b"" at the special ones). `merges` is the HF merge list and `hf_json` the HF file text (both None for
    the original format, where ranks alone define the BPE). `document` is the parsed file (for the fingerprint)."""

    name: str
    pattern: str
    token_bytes: list[bytes]
    special_tokens: dict[str, int]
    merges: list[tuple[bytes, bytes]] | None
    document: dict[str, Any]
    hf_json: str | None
    path: Path | None = None
    # Known to pass fast.merges_match_ranks (a tokenizer rustbpe just trained): the check can be skipped.
    merges_follow_ranks: bool = False


def read_tokenizer_file(path: str | os.PathLike[str]) -> TokenizerFile:
    """Read and check a talm (HF tokenizers JSON) or original talm/tokencoder JSON file."""
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
        return parse_original(document, path)
    if isinstance(document, dict) and isinstance(document.get("model"), dict):
        return parse_hf(document, text, path)
    raise TalmError(
        f"{str(path)!r} is not a tokenizer file (neither a Hugging Face tokenizers JSON nor an original talm "
        "tokenizer): pass a file written by train_tokenizer"
    )


def parse_original(document: dict[str, Any], path: Path | None) -> TokenizerFile:
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
    problem = pattern_problem(pattern)
    if problem:
        raise bad(f"its regex_pattern: {problem}")
    token_bytes = [b""] * len(ranks)
    for token, rank in ranks.items():
        token_bytes[rank] = token
    return TokenizerFile(
        name=str(document.get("name") or (path.stem if path else "tokenizer")),
        pattern=pattern,
        token_bytes=token_bytes,
        special_tokens=dict(sorted(specials.items(), key=lambda kv: kv[1])),
        merges=None,
        document=document,
        hf_json=None,
        path=path,
    )


def parse_hf(document: dict[str, Any], text: str, path: Path | None) -> TokenizerFile:
    """A Hugging Face tokenizers JSON file (`document` parsed from `text`) holding a byte-level BPE."""
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
        # A foreign file (SmolLM's) may put its special tokens first; HF encodes it (only talm's own pipeline
        # goes to tiktoken, whose id layout needs the special tokens last).
        if is_talm_pipeline(document):
            raise TalmError(
                f"{where!r} has special tokens among its ordinary ids: train it with train_tokenizer"
            )
        n_ordinary = len(vocab)
    try:
        token_bytes = [b""] * n_ordinary
        for token, i in model["vocab"].items():
            if token not in specials:  # HF files may list special tokens in the model's vocab too
                token_bytes[i] = hf_token_bytes(token)
        merges = hf_merges(model.get("merges") or [])
    except (KeyError, AttributeError, TypeError):
        raise TalmError(
            f"{where!r} is not a byte-level BPE (its tokens are not byte-level strings): "
            "pass a file written by train_tokenizer"
        ) from None
    known = set(token_bytes)
    for number, merge in enumerate(merges, start=1):
        if len(merge) != 2 or any(part not in known for part in merge) or merge[0] + merge[1] not in known:
            missing = [p for p in (*merge, b"".join(merge)) if p not in known] if len(merge) == 2 else []
            why = (
                f"names {missing[0]!r}, which is not in its vocab"
                if missing
                else f"has {len(merge)} parts, not 2"
            )
            raise TalmError(
                f"{where!r} is damaged: merge {number} ({model['merges'][number - 1]!r}) {why}: pass an intact "
                "tokenizer file (or train a new one with train_tokenizer)"
            )
    pattern = _hf_split_pattern(document) or SPLIT_PATTERN
    problem = pattern_problem(pattern)
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
            f"{where!r} is damaged: {problem}: pass an intact tokenizer file (or train a new one with train_tokenizer)"
        )
    return TokenizerFile(
        name=path.stem if path else "tokenizer",
        pattern=pattern,
        token_bytes=token_bytes,
        special_tokens=specials,
        merges=merges,  # type: ignore[arg-type]
        document=document,
        hf_json=text,
        path=path,
    )


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


def pattern_problem(pattern: str) -> str | None:
    """Why the pre-tokenizer regex does not compile in tiktoken's engine (which encodes with it), or None."""
    import tiktoken

    try:
        tiktoken.Encoding("talm-check", pat_str=pattern, mergeable_ranks={b"a": 0}, special_tokens={})
    except BaseException as err:  # noqa: BLE001 (the regex error comes from Rust as a ValueError or a panic)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        return f"regex {pattern!r} does not compile ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def is_talm_pipeline(document: dict[str, Any]) -> bool:
    """Exactly the pipeline training builds: no normalizer, regex Split + ByteLevel without its own regex,
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


def build_hf_bpe(
    token_bytes: list[bytes], merges: list[tuple[bytes, bytes]], special_tokens: dict[str, int], pattern: str
) -> tokenizers.Tokenizer:
    """talm's HF pipeline around a BPE given as token bytes (id order) and merges: what talm's files hold."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    def to_str(b: bytes) -> str:
        return "".join(BYTE_TO_UNICODE[x] for x in b)

    vocab = {to_str(t): i for i, t in enumerate(token_bytes)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(to_str(a), to_str(b)) for a, b in merges]))
    hf.pre_tokenizer = split_pre_tokenizer(pattern)
    hf.decoder = decoders.ByteLevel()
    for content in sorted(special_tokens, key=special_tokens.__getitem__):
        hf.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    got = {content: hf.token_to_id(content) for content in special_tokens}
    assert got == special_tokens, f"special token ids moved: {got} != {special_tokens}"
    return hf


def split_pre_tokenizer(pattern: str) -> tokenizers.pre_tokenizers.PreTokenizer:
    """talm's pre-tokenizer: the regex split, then bytes as ByteLevel characters (without ByteLevel's regex)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def write_hf(path: Path, text: str, *, overwrite: bool) -> None:
    """Write an HF tokenizers JSON text atomically; refuse an existing file unless `overwrite`. TalmError on
    any failure, naming the file."""

    def cannot(err: OSError) -> TalmError:
        why = err.strerror or type(err).__name__
        return TalmError(f"cannot write {str(path)!r} ({why}): free some space or fix its permissions")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # e.g. tokenizers/, which output_path checked
    except OSError as err:
        raise cannot(err) from None
    try:
        write_atomically(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite)
    except FileExistsError:
        raise TalmError(
            f"{str(path)!r} already exists: pick another name, or pass --force to overwrite it"
        ) from None
    except OSError as err:
        raise cannot(err) from None
