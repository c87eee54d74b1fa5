"""Generating text with a trained GPT: greedy, temperature, top-k and top-p sampling, with a KV cache.

`generate_ids` is the engine: it takes a batch of prompts (token ids, of different lengths), left-pads them to
one length and yields the next token of every row at each step. With the KV cache (the default) each step
feeds the model one position per row; without it the model recomputes the whole window, which gives the same
tokens and is only there as a reference (tests, benchmarks/bench_generate.py).

Context limit: a row's window is its last `context_length` tokens. When the window is full, its oldest quarter
is dropped and the cache is rebuilt from the rest, so generation can go on past the context length. Both modes
follow the same rule, so they stay identical however long the generation.

`prepare_prompt` turns a prompt's text into the token ids to generate from: encoded (`encode_prompt`) and cut
to the model's context, with the notice to show when it was cut. `generate` (`talm.generate`) and the
`generate` command both go through it.

`generate` is the text API: a prompt in, pieces of text out as they are generated, with a multi-byte character
that spans several tokens held back until it is complete (`IncrementalDecoder`). Loading a trained model
(`talm.load`) is `talm.use.load`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from talm.errors import TalmError
from talm.model.gpt import GPT, KVCache
from talm.tokenizer.api import Tokenizer
from talm.use.config import SampleConfig
from talm.use.load import check_vocab

FINISHED = -1  # what generate_ids yields for a row that already ended with <|endoftext|>


# ------------------------------------------------------------------------------------------------------------
# Picking the next token


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """`logits` (..., V) with every token outside the top_k likeliest, or outside the smallest set of likeliest
    tokens whose probabilities add up to top_p, set to -inf. Ties with the k-th logit are kept."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the likeliest token has 0 before it, so it always stays
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back from sorted order to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V): the likeliest if temperature is 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------------------
# The generation loop


class _Window:
    """The tokens each row currently attends over, as one left-padded (B, W) tensor."""

    def __init__(self, prompts: Sequence[Sequence[int]], device: torch.device) -> None:
        width = max(len(p) for p in prompts)
        self.tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.tokens[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        self.pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=device)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def append(self, next_ids: torch.Tensor) -> None:
        self.tokens = torch.cat((self.tokens, next_ids[:, None]), dim=1)

    def keep_last(self, n: int) -> None:
        dropped = self.width - n
        self.tokens = self.tokens[:, dropped:]
        self.pad = (self.pad - dropped).clamp(min=0)


def _forward_window(
    model: GPT, window: _Window, cache_len: int | None
) -> tuple[torch.Tensor, KVCache | None]:
    """Logits of every row's last position over the whole window; with `cache_len`, also a fresh cache holding
    the window (room for `cache_len` positions). Padded rows go through a cache, which knows the padding."""
    p = next(model.parameters())
    if cache_len is None and not bool(window.pad.any()):
        return model(window.tokens, last_only=True)[0][:, -1], None
    size = cache_len or window.width
    cache = KVCache(model.config, window.tokens.shape[0], size, p.device, p.dtype, pad=window.pad)
    return model(window.tokens, cache=cache, last_only=True)[0][:, -1], cache if cache_len else None


@torch.inference_mode()
def generate_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float = 1.0,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> Iterator[list[int]]:
    """Yield, at each step, the next token id of every prompt's row (FINISHED for a row that already yielded
    `eot_id`), until every row has ended or `max_new_tokens` steps are done.

    `vocab_size` limits the ids picked to those below it: the tokenizer's size, when the model knows more ids
    than its tokenizer (a vocabulary rounded up in training) and the extra ones would not decode.

    Prompts are non-empty lists of token ids, at most `context_length` long (see `fit_prompt`). A row in a batch
    computes what it would alone as long as the batch's longest row fits in the context.
    """
    context = model.config.context_length
    limit = model.config.vocab_size if vocab_size is None else min(vocab_size, model.config.vocab_size)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start from <|endoftext|> for none)")
    if any(len(p) > context for p in prompts):
        raise ValueError(f"a prompt is longer than the context ({context} tokens): cut it with fit_prompt")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    keep = context - context // 4  # the window's size after its oldest quarter is dropped

    was_training = model.training
    model.eval()
    try:
        window = _Window(prompts, device)

        def cache_room(remaining: int) -> int | None:
            return min(context, window.width + remaining) if use_cache else None

        logits, cache = _forward_window(model, window, cache_room(max_new_tokens - 1))
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_ids = sample_next(logits[:, :limit], temperature, top_k, top_p, generator)
            out = torch.where(finished, FINISHED, next_ids)
            yield out.tolist()
            if eot_id is not None:
                finished |= next_ids == eot_id
            remaining = max_new_tokens - step - 1
            if remaining == 0 or bool(finished.all()):
                return
            window.append(next_ids)
            if window.width > context:
                window.keep_last(keep)
                logits, cache = _forward_window(model, window, cache_room(remaining - 1))
            elif cache is not None:
                logits = model(next_ids[:, None], cache=cache)[0][:, -1]
            else:
                logits, _ = _forward_window(model, window, None)
    finally:
        model.train(was_training)


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


@dataclass
class GenerationStats:
    tokens: int = 0  # tokens generated, <|endoftext|> included


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
    `stats`, if given, counts the tokens generated.
    """
    check_vocab(model, tokenizer, "the model")
    rows = [list(p) for p in prompts for _ in range(config.num_samples)]
    decoders = [IncrementalDecoder(tokenizer) for _ in rows]
    buffered: list[list[str]] = [[] for _ in rows]
    ended = [False] * len(rows)
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
            if stats is not None:
                stats.tokens += 1
            if token == tokenizer.eot_id:
                ended[b] = True
                text = decoders[b].flush()
            else:
                text = decoders[b].push(token)
            if text:
                buffered[b].append(text)
        yield from drain()
    for b in range(len(rows)):  # the token budget ran out
        if not ended[b]:
            ended[b] = True
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
