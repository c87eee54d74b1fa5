"""Chatting with a model: a reply streamed as text, and a conversation that fits the model's context.

The chat format (role tokens, what ends a reply) is `talm.tokenizer.chat`'s; this module only generates with it.
`stream_reply` is the engine of the `chat` REPL and of the `serve` API: prompt ids in, the reply's text out piece
by piece as tokens are generated (a multi-byte character split across tokens comes out once it is whole), until
the reply's end token, one of its stop sequences or the token budget. Stopping early is closing the iterator (or
not asking for more): no token is generated that nobody asked for.

`Conversation` is the REPL's memory: the messages so far and an optional system message; when the prompt would
leave too little room in the context for the reply, the oldest exchanges are left out of it (the system message
always stays) and the REPL says so.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass

from talm.errors import TalmError
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat
from talm.use.config import SampleConfig
from talm.use.load import check_vocab
from talm.use.sample import IncrementalDecoder, ended_by, generate_ids


@dataclass
class ReplyStats:
    """What one reply did: tokens generated (its end token included) and why it ended: `finish_reason` in
    OpenAI's terms, "stop" (the end token or a stop sequence), "length" (the token budget), or None while it is
    still going or when it was stopped early; `ended_by` in talm's (`talm.use.sample.ENDINGS`: "end", "stop",
    "max_new_tokens" or "context"). `seconds`: from the first token's request to the last token."""

    tokens: int = 0
    finish_reason: str | None = None
    ended_by: str | None = None
    seconds: float = 0.0


def stream_reply(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    config: SampleConfig,
    *,
    end_id: int,
    stats: ReplyStats | None = None,
    stop: Sequence[str] = (),
) -> Generator[str, None, None]:
    """Yield the text of the model's continuation of `prompt_ids` (at most the context long) as it is
    generated, until `end_id` (not part of the text), the first of the `stop` strings (not part of the text
    either, see `until_stop`) or `config.max_new_tokens` tokens."""
    check_vocab(model, tokenizer, "the model")
    stats = stats if stats is not None else ReplyStats()
    pieces = _reply_pieces(model, tokenizer, prompt_ids, config, end_id, stats)
    stops = [s for s in stop if s]
    return until_stop(pieces, stops, stats) if stops else pieces


def _reply_pieces(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    config: SampleConfig,
    end_id: int,
    stats: ReplyStats,
) -> Generator[str, None, None]:
    started = time.perf_counter()
    decoder = IncrementalDecoder(tokenizer)
    steps = generate_ids(
        model,
        [list(prompt_ids)],
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        eot_id=end_id,
        seed=config.seed,
        vocab_size=tokenizer.vocab_size,
    )
    try:
        for (token,) in steps:
            stats.tokens += 1
            if token == end_id:
                stats.finish_reason, stats.ended_by = "stop", "end"
                break
            if text := decoder.push(token):
                yield text
        else:
            stats.finish_reason = "length"
            stats.ended_by = ended_by(False, len(prompt_ids), stats.tokens, model.config.context_length)
        if text := decoder.flush():
            yield text
    finally:
        steps.close()  # a reply stopped early ends its generation here
        stats.seconds += time.perf_counter() - started


def until_stop(
    pieces: Generator[str, None, None], stops: Sequence[str], stats: ReplyStats
) -> Generator[str, None, None]:
    """`pieces` up to the first occurrence of one of `stops` (itself left out; `stats.finish_reason` becomes
    "stop" and `pieces` is closed, ending its generation). Text that may be the start of a stop string is held
    back until the next piece tells, so a stop string split across pieces is found all the same."""
    held = ""  # what is not given out yet: at most the longest stop string's length less one
    try:
        for piece in pieces:
            held += piece
            if (at := find_stop(held, stops)) is not None:
                stats.finish_reason = stats.ended_by = "stop"
                if held[:at]:
                    yield held[:at]
                return
            ready = len(held) - held_back(held, stops)
            if ready:
                yield held[:ready]
                held = held[ready:]
        if held:
            yield held
    finally:
        pieces.close()


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of `stops` to occur in `text` begins (None: none occurs)."""
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` may be the start of one of `stops` (the longest such end)."""
    return max(
        (n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
        default=0,
    )


class Conversation:
    """The messages of a chat so far, with the system message kept apart (set or cleared at any time)."""

    def __init__(self, chat_format: ChatFormat, system: str | None = None) -> None:
        self.format = chat_format
        self.system = system or None
        self.turns: list[dict[str, str]] = []  # user and assistant messages, alternating

    def reset(self) -> None:
        """Forget the exchanges (the system message stays)."""
        self.turns = []

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        """The conversation as chat messages, with `user_text` as a last user message if given."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user_text}] if user_text is not None else []
        return [*head, *self.turns, *tail]

    def prompt(self, user_text: str, max_prompt_tokens: int) -> tuple[list[int], int]:
        """The prompt ids for the reply to `user_text`, at most `max_prompt_tokens` long, and how many of the
        oldest exchanges (user message + reply) had to be left out for that. TalmError if the system message
        and `user_text` alone are too long."""
        kept = list(self.turns)
        dropped = 0
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.format.render_prompt([*head, *kept, {"role": "user", "content": user_text}])
            if len(ids) <= max_prompt_tokens:
                return ids, dropped
            if not kept:
                raise PromptTooLong(len(ids), max_prompt_tokens, self.system_tokens())
            kept = kept[2:]
            dropped += 1

    def system_tokens(self) -> int:
        """The prompt's tokens before any message: the system message (if any) and an empty user message's
        framing. A budget no larger than this leaves no room for any message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return len(self.format.render_prompt([*head, {"role": "user", "content": ""}]))

    def add_exchange(self, user_text: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]


class PromptTooLong(TalmError):
    """A message that does not fit the prompt's budget even alone (with the system message, if any)."""

    def __init__(self, tokens: int, budget: int, fixed: int) -> None:
        self.tokens, self.budget, self.fixed = tokens, budget, fixed  # fixed: see Conversation.system_tokens
        super().__init__(
            f"the prompt is {tokens} tokens ({fixed} of them the system message and chat format), more than the "
            f"{budget} this model's context leaves for a prompt: write a shorter message"
        )


def reply_reserve(context_length: int, max_new_tokens: int | None) -> int:
    """The room a prompt leaves in the context for the reply. Given a `max_new_tokens`, that many but never
    more than half the context (a longer reply slides the window, see `talm.use.sample`); without one (the
    reply then takes all the room the prompt leaves), a quarter of the context, at most 256 tokens."""
    if max_new_tokens is None:
        return max(1, min(context_length // 4, 256))
    return min(max_new_tokens, context_length // 2)


def prompt_budget(context_length: int, max_new_tokens: int | None) -> int:
    """The longest prompt: the context less `reply_reserve`."""
    return context_length - reply_reserve(context_length, max_new_tokens)


def reply_limit(context_length: int, prompt_tokens: int, max_new_tokens: int | None) -> int:
    """Most tokens a reply to a prompt of `prompt_tokens` may have: `max_new_tokens`, or without one all the
    room the prompt leaves in the context (so the reply ends when the context is full)."""
    return max_new_tokens if max_new_tokens is not None else max(1, context_length - prompt_tokens)
