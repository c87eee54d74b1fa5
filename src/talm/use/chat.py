"""Chatting with a model: a reply streamed as text, and a conversation that fits the model's context.

The chat format (role tokens, what ends a reply) is `talm.tokenizer.chat`'s; this module only generates with it.
`ReplyText` turns a reply's tokens into its text, piece by piece as they come (a multi-byte character split
across tokens comes out once it is whole), until the reply's end token, one of its stop sequences or the token
budget: `serve`'s generation worker (`talm.use.worker`) pushes into it the tokens the batched engine
(`talm.model.engine`) generates.
`stream_reply` is the `chat` REPL's: prompt ids in, the reply's text out, pulled from an engine of its own.
Stopping early is closing the iterator (or not asking for more): no token is generated that nobody asked for.

`Conversation` is the REPL's memory: the messages so far and an optional system message; when the prompt would
leave too little room in the context for the reply, the oldest exchanges are left out of it (the system message
always stays) and the REPL says so.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass

from talm.errors import TalmError
from talm.model.engine import Engine, Settings
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat
from talm.use.config import SampleConfig
from talm.use.load import check_vocab
from talm.use.sample import IncrementalDecoder, ended_by


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

    def count_token(self) -> None:
        self.tokens += 1

    def set_tokens(self, tokens: int) -> None:
        """The count another process kept (serve's worker)."""
        self.tokens = tokens

    def add_seconds(self, seconds: float) -> None:
        self.seconds += seconds

    def end(self, finish_reason: str, ended_by: str) -> None:
        self.finish_reason, self.ended_by = finish_reason, ended_by


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
    either, see `ReplyText`) or `config.max_new_tokens` tokens. Closing it early ends the generation."""
    check_vocab(model, tokenizer, "the model")
    stats = stats if stats is not None else ReplyStats()
    text = ReplyText(tokenizer, end_id, stop, stats, len(prompt_ids), model.config.context_length)
    return _reply_pieces(reply_tokens(model, prompt_ids, reply_settings(config, end_id), tokenizer), text)


def reply_settings(config: SampleConfig, end_id: int) -> Settings:
    """The engine's settings for a reply: `config`'s sampling, ending at `end_id`. (Stop strings are
    `ReplyText`'s: it holds back text that may start one.)"""
    return Settings(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
        top_p=config.top_p, seed=config.seed, end_ids=(end_id,),
    )  # fmt: skip


def reply_tokens(
    model: GPT, prompt_ids: Sequence[int], settings: Settings, tokenizer: Tokenizer
) -> Generator[int, None, None]:
    """The reply's token ids as an engine of its own generates them (the REPL's one reply at a time)."""
    engine = Engine(model, slots=1, vocab_size=tokenizer.vocab_size)
    seq = engine.add(list(prompt_ids), settings)
    while not seq.done:
        for _, token in engine.step():
            yield token


def _reply_pieces(tokens: Generator[int, None, None], text: ReplyText) -> Generator[str, None, None]:
    started = time.perf_counter()
    try:
        for token in tokens:
            if piece := text.push(token):
                yield piece
            if text.done:
                return
        if piece := text.finish():
            yield piece
    finally:
        tokens.close()  # a reply stopped early ends its generation here
        text.stats.add_seconds(time.perf_counter() - started)


class ReplyText:
    """A reply's text as its tokens come (`push`, one by one; `finish` when the token budget ran out): whole
    characters only (`IncrementalDecoder`), up to `end_id` or the first of `stops` (neither part of the text;
    `done` then says to generate no more), with `stats` kept. Text that may be the start of a stop string is held
    back until the next token tells, so a stop string split across tokens is found all the same. The REPL pulls
    it (`stream_reply`); `serve`'s worker pushes each token its engine step gives."""

    def __init__(
        self, tokenizer: Tokenizer, end_id: int, stops: Sequence[str], stats: ReplyStats, prompt_tokens: int,
        context: int,
    ) -> None:  # fmt: skip
        self.decoder = IncrementalDecoder(tokenizer)
        self.end_id, self.until_stop, self.stats = end_id, UntilStop(stops), stats
        self.prompt_tokens, self.context = prompt_tokens, context
        self.done = False

    def push(self, token: int) -> str:
        """The text `token` makes ready ("" if none)."""
        self.stats.count_token()
        if token == self.end_id:
            self.stats.end("stop", "end")
            return self._release(self.decoder.flush(), last=True)
        return self._release(self.decoder.push(token), last=False)

    def finish(self) -> str:
        """The token budget ran out: the text still held."""
        self.stats.end("length", ended_by(False, self.prompt_tokens, self.stats.tokens, self.context))
        return self._release(self.decoder.flush(), last=True)

    def _release(self, piece: str, last: bool) -> str:
        out = self.until_stop.feed(piece, last=last)
        if self.until_stop.found:
            self.stats.end("stop", "stop")
        self.done = self.done or last or self.until_stop.found
        return out


class UntilStop:
    """Text fed piece by piece, given out up to the first occurrence of one of `stops` (itself left out; `found`
    then becomes True). Text that may be the start of a stop string is held back until the next piece tells."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""  # not given out yet: at most the longest stop string's length less one
        self.found = False

    def feed(self, piece: str, *, last: bool = False) -> str:
        """What can be given out now that `piece` came (all that is held, if `last`); "" once a stop was found."""
        if self.found:
            return ""
        self.held += piece
        if (at := find_stop(self.held, self.stops)) is not None:
            self.found, out, self.held = True, self.held[:at], ""
            return out
        ready = len(self.held) if last else len(self.held) - held_back(self.held, self.stops)
        out, self.held = self.held[:ready], self.held[ready:]
        return out


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the stop string that `text` completes first begins (None: none occurs): as a stream read character
    by character meets them, whatever pieces the text came in (of two that end together, the longer)."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


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

    def set_system(self, system: str | None) -> None:
        """Set (or with None or "", clear) the system message."""
        self.system = system or None

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
