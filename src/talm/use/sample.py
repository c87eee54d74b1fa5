"""Generating text with a trained GPT: greedy, temperature, top-k and top-p sampling, with a KV cache.

`generate_ids` (in `talm.model.sample`, with the token pickers, re-exported here) is the engine: a batch of
prompts' token ids in, the next token of every row out at each step, with a KV cache.

`prepare_prompt` turns a prompt's text into the token ids to generate from: encoded (`encode_prompt`) and cut
to the model's context, with the notice to show when it was cut. `generate` (`talm.generate`) and the
`generate` command both go through it.

`generate` is the text API: a prompt in, pieces of text out as they are generated, with a multi-byte character
that spans several tokens held back until it is complete (`IncrementalDecoder`). Loading a trained model
(`talm.load`) is `talm.use.load`'s.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from talm.errors import TalmError
from talm.model.gpt import GPT
from talm.model.sample import (  # the core's names stay importable from here (talm.generate_ids, benchmarks)
    FINISHED,
    filter_logits,  # noqa: F401
    generate_ids,
    sample_next,  # noqa: F401
)
from talm.tokenizer.api import Tokenizer
from talm.use.config import SampleConfig
from talm.use.load import check_vocab

# ------------------------------------------------------------------------------------------------------------
# Text in, text out


def encode_prompt(tokenizer: Tokenizer, prompt: str, *, allow_special: bool = False) -> list[int]:
    """A prompt's token ids. The empty prompt starts a new document (<|endoftext|>).

    Special-token spellings are plain text unless `allow_special`. A prompt made only of special tokens gives
    the model nothing to continue and is refused, except <|endoftext|> alone, which means "a new document".
    """
    if prompt == "":
        return [tokenizer.eot_id]
    specials = tokenizer.special_tokens
    if not allow_special:
        rest = prompt
        for spelling in specials:
            rest = rest.replace(spelling, "")
        if rest != prompt and rest.strip() == "":
            raise TalmError(
                f"prompt {prompt!r} is only special-token spellings, which are read as plain text: pass "
                "--allow-special (allow_special=True) to use them as special tokens, or an empty prompt to start "
                "a new document"
            )
        return tokenizer.encode(prompt)
    ids = tokenizer.encode(prompt, allow_special=True)
    special_ids = set(specials.values())
    if all(i in special_ids for i in ids) and any(i != tokenizer.eot_id for i in ids):
        names = " ".join(tokenizer.decode([i]) for i in ids)
        raise TalmError(
            f"prompt {prompt!r} is only special tokens ({names}): the model has nothing to continue; add text "
            "after them"
        )
    return ids


def fit_prompt(ids: list[int], context_length: int) -> tuple[list[int], int]:
    """The prompt cut from the left to the model's context, and how many tokens were cut."""
    cut = max(0, len(ids) - context_length)
    return ids[cut:], cut


def prepare_prompt(
    tokenizer: Tokenizer, prompt: str, context_length: int, *, allow_special: bool = False
) -> tuple[list[int], str | None]:
    """The token ids to generate `prompt`'s continuation from (`encode_prompt`, cut from the left to the
    context), and, when its start had to be cut, the one-line notice saying so (else None)."""
    ids = encode_prompt(tokenizer, prompt, allow_special=allow_special)
    kept, cut = fit_prompt(ids, context_length)
    notice = None
    if cut:
        notice = (
            f"prompt is {len(ids)} tokens, longer than the model's context of {context_length}: "
            f"its first {cut} tokens are left out"
        )
    return kept, notice


class IncrementalDecoder:
    """Turns generated token ids, one at a time, into text as soon as it is printable.

    Byte-level tokens can end in the middle of a multi-byte UTF-8 character; such a token decodes to a trailing
    U+FFFD. Its text is held back until the next tokens complete the character (at most 3 more: a UTF-8
    character has at most 4 bytes), so only whole characters come out.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


# Why a generation (a row, a reply) ended, as `GenerationStats.ended_by` counts it, and how it is said.
ENDINGS = {
    "end": "its end token",
    "stop": "a stop string",
    "max_new_tokens": "--max-new-tokens",
    "context": "a full context",
}


def ended_by(end_token: bool, prompt_tokens: int, generated: int, context_length: int) -> str:
    """Why a generation stopped that was not stopped by a stop string: its end token, else the token budget,
    which filled the context ("context") or was a limit of its own ("max_new_tokens")."""
    if end_token:
        return "end"
    return "context" if prompt_tokens + generated == context_length else "max_new_tokens"


@dataclass
class GenerationStats:
    """What `stream_samples` (or a chat's replies) did: tokens generated (<|endoftext|> included), seconds spent
    generating (from the first token's request to the last token, summed over calls: never the time a
    user took to type), and how many rows ended in each way (`ENDINGS`)."""

    tokens: int = 0
    seconds: float = 0.0
    ended_by: Counter[str] = field(default_factory=Counter)

    def add(self, tokens: int = 0, seconds: float = 0.0, ending: str | None = None) -> None:
        """Count `tokens` more tokens, `seconds` more seconds, and one more row that ended by `ending`."""
        self.tokens += tokens
        self.seconds += seconds
        if ending:
            self.ended_by[ending] += 1

    def summary(self, device: object) -> str:
        """The one line said at the end: tokens, time, tokens/s, device (and CPU threads) and why generation
        stopped."""
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        endings = ", ".join(f"{ENDINGS[k]} ({n})" for k, n in sorted(self.ended_by.items()))
        why = f"; stopped at: {endings}" if endings else ""
        on = f"{device} with {torch.get_num_threads()} thread(s)" if str(device) == "cpu" else str(device)
        took = (
            f"{self.seconds:.1f}" if self.seconds >= 1 else f"{self.seconds:.2f}"
        )  # a short reply: not "0.0 s"
        return f"generated {self.tokens:,} tokens in {took} s ({rate:,.0f} tokens/s) on {on}{why}"


def stream_samples(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    config: SampleConfig,
    *,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
) -> Iterator[tuple[int, str | None]]:
    """Generate `config.num_samples` continuations of each prompt (token ids: see `prepare_prompt`) in one
    batch, and yield (row, text) pieces row after row: row 0's text as it is generated, then row 1's (what was
    generated meanwhile at once, the rest as it comes), ... Each row ends with (row, None).

    Rows are prompt 0's samples, then prompt 1's, and so on. Generation stops at <|endoftext|> (not printed).
    `stats`, if given, counts the tokens generated, the time taken and why each row ended.
    """
    check_vocab(model, tokenizer, "the model")
    started = time.perf_counter()
    stats = stats if stats is not None else GenerationStats()
    try:
        yield from _stream_rows(model, tokenizer, prompts, config, use_cache, stats)
    finally:
        stats.add(seconds=time.perf_counter() - started)


def _stream_rows(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    config: SampleConfig,
    use_cache: bool,
    stats: GenerationStats,
) -> Iterator[tuple[int, str | None]]:
    rows = [list(p) for p in prompts for _ in range(config.num_samples)]
    decoders = [IncrementalDecoder(tokenizer) for _ in rows]
    buffered: list[list[str]] = [[] for _ in rows]
    ended = [False] * len(rows)
    made = [0] * len(rows)  # tokens generated per row
    current = 0  # the row being shown

    def drain() -> Iterator[tuple[int, str | None]]:
        nonlocal current
        while current < len(rows):
            for piece in buffered[current]:
                yield current, piece
            buffered[current].clear()
            if not ended[current]:
                return
            yield current, None
            current += 1

    steps = generate_ids(
        model,
        rows,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        eot_id=tokenizer.eot_id,
        seed=config.seed,
        use_cache=use_cache,
        vocab_size=tokenizer.vocab_size,
    )
    for next_ids in steps:
        for b, token in enumerate(next_ids):
            if ended[b] or token == FINISHED:
                continue
            stats.add(tokens=1)
            made[b] += 1
            if token == tokenizer.eot_id:
                ended[b] = True
                stats.add(ending="end")
                text = decoders[b].flush()
            else:
                text = decoders[b].push(token)
            if text:
                buffered[b].append(text)
        yield from drain()
    for b in range(len(rows)):  # the token budget ran out
        if not ended[b]:
            ended[b] = True
            stats.add(ending=ended_by(False, len(rows[b]), made[b], model.config.context_length))
            text = decoders[b].flush()
            if text:
                buffered[b].append(text)
    yield from drain()


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str = "",
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    allow_special: bool = False,
) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece (one piece per token, whole characters only) until
    <|endoftext|> or `max_new_tokens`. An empty prompt starts a new document.

        model, tokenizer = talm.load("models/shakespeare")
        for piece in talm.generate(model, tokenizer, "ROMEO:", max_new_tokens=100, seed=0):
            print(piece, end="", flush=True)
    """
    config = SampleConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    ids, notice = prepare_prompt(tokenizer, prompt, model.config.context_length, allow_special=allow_special)
    if notice:
        warnings.warn(notice, stacklevel=2)
    for _, piece in stream_samples(model, tokenizer, [ids], config):
        if piece is not None:
            yield piece
