"""talm.use.chat: a reply streamed as text (whole characters only, ended by stop strings, stopped when closed) and a
conversation fitted to the model's context."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BASE_TOKENIZER, endless_chat_model_dir, varied_model
from hypothesis import example, given
from hypothesis import strategies as st

import talm.use.chat as chat_module
from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat
from talm.use.chat import Conversation, ReplyStats, UntilStop, prompt_budget, reply_limit, stream_reply
from talm.use.config import SampleConfig
from talm.use.load import load
from talm.use.sample import generate_ids


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(BASE_TOKENIZER)


@pytest.fixture(scope="module")
def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


def test_a_reply_is_the_text_of_the_ids_generated_until_the_end_token(
    tokenizer: Tokenizer, chat_format: ChatFormat
) -> None:
    model = varied_model(vocab=tokenizer.vocab_size, context=64)
    prompt = chat_format.render_prompt([{"role": "user", "content": "Hello"}])
    config = SampleConfig(max_new_tokens=30, temperature=0)
    ids = [step[0] for step in generate_ids(model, [prompt], max_new_tokens=30, temperature=0)]
    end_id = ids[20]  # any token the model generates can play the end token
    first_end = ids.index(end_id)
    stats = ReplyStats()
    pieces = list(stream_reply(model, tokenizer, prompt, config, end_id=end_id, stats=stats))
    assert "".join(pieces) == tokenizer.decode(ids[:first_end])
    assert stats.finish_reason == "stop" and stats.tokens == first_end + 1
    assert stats.ended_by == "end" and stats.seconds > 0

    stats = ReplyStats()
    short = config.model_copy(update={"max_new_tokens": 5})
    pieces = list(stream_reply(model, tokenizer, prompt, short, end_id=-1, stats=stats))
    assert "".join(pieces) == tokenizer.decode(ids[:5])
    assert stats.finish_reason == "length" and stats.tokens == 5 and stats.ended_by == "max_new_tokens"

    stats = ReplyStats()  # a reply given all the room the prompt leaves ends with a full context
    room = config.model_copy(update={"max_new_tokens": reply_limit(64, len(prompt), None)})
    pieces = list(stream_reply(model, tokenizer, prompt, room, end_id=-1, stats=stats))
    assert stats.tokens == 64 - len(prompt) and stats.ended_by == "context"


def test_a_character_split_across_tokens_comes_out_whole(
    tokenizer: Tokenizer, chat_format: ChatFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = tokenizer.encode("a😀b")
    emoji = tokenizer.encode("😀")
    assert len(emoji) > 1 and "\ufffd" in tokenizer.decode(emoji[:1])  # the test needs a split character
    scripted = [[i] for i in [*ids, tokenizer.eot_id]]  # what the model "generates"
    monkeypatch.setattr(chat_module, "reply_tokens", lambda *args, **kwargs: (step[0] for step in scripted))
    model = varied_model(vocab=tokenizer.vocab_size, context=64)
    pieces = list(stream_reply(model, tokenizer, [1], SampleConfig(), end_id=tokenizer.eot_id))
    assert "".join(pieces) == "a😀b"
    assert all("\ufffd" not in p for p in pieces) and "😀" in pieces


def pieces_of(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@given(
    text=st.text(alphabet="ab\n", max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=4),
)
@example(
    text="aba", cuts=[], stops=["b", "aba"]
)  # "b" ends first, though "aba" starts first: the reply is "a"
def test_until_stop_gives_the_text_before_the_first_stop_string_however_it_is_split(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    # the stop that a reader meets first is the one that ends first (of two ending together, the longer)
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    until = UntilStop(stops)
    out = [until.feed(piece) for piece in pieces_of(text, cuts)] + [until.feed("", last=True)]
    assert "".join(out) == (text[: min(found)[1]] if found else text)
    assert until.found == bool(found)


def test_a_stop_string_ends_the_reply_and_its_generation(tmp_path: Path, chat_format: ChatFormat) -> None:
    model, tokenizer = load(endless_chat_model_dir(tmp_path / "endless"))
    prompt = chat_format.render_prompt([{"role": "user", "content": "Hi"}])
    config = SampleConfig(max_new_tokens=60, temperature=0)
    free = "".join(stream_reply(model, tokenizer, prompt, config, end_id=tokenizer.eot_id))
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # a stop string the greedy reply reaches midway
    assert len(stop) == 3 and free.find(stop) > 0
    stats = ReplyStats()
    reply = "".join(
        stream_reply(
            model, tokenizer, prompt, config, end_id=tokenizer.eot_id, stats=stats, stop=["zzz", stop]
        )
    )
    assert reply == free[: free.find(stop)] and stats.finish_reason == "stop" and stats.ended_by == "stop"
    assert stats.tokens < 60  # generation ended there, not at the token budget
    stats = ReplyStats()
    never = "".join(
        stream_reply(model, tokenizer, prompt, config, end_id=tokenizer.eot_id, stats=stats, stop=["\x00"])
    )
    assert never == free and stats.finish_reason == "length"


def test_closing_a_reply_stops_its_generation(tmp_path: Path, chat_format: ChatFormat) -> None:
    model, tokenizer = load(endless_chat_model_dir(tmp_path / "endless"))
    prompt = chat_format.render_prompt([{"role": "user", "content": "Hi"}])
    stats = ReplyStats()
    config = SampleConfig(max_new_tokens=10_000, temperature=0)
    reply = stream_reply(model, tokenizer, prompt, config, end_id=tokenizer.eot_id, stats=stats)
    for _, _piece in zip(range(5), reply, strict=False):
        pass
    reply.close()
    assert 5 <= stats.tokens <= 5 + 3 and stats.finish_reason is None  # a held-back character: at most 3 more


def test_a_conversation_renders_with_the_chat_format_and_drops_its_oldest_exchanges_to_fit(
    chat_format: ChatFormat,
) -> None:
    conversation = Conversation(chat_format, system="Be brief.")
    conversation.add_exchange("first question", "first answer")
    conversation.add_exchange("second question", "second answer")
    ids, dropped = conversation.prompt("third", 10_000)
    assert dropped == 0
    assert ids == chat_format.render_prompt(conversation.messages("third"))
    assert conversation.messages("third")[0] == {"role": "system", "content": "Be brief."}

    without_first = chat_format.render_prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "second answer"},
            {"role": "user", "content": "third"},
        ]
    )
    ids, dropped = conversation.prompt("third", len(without_first))
    assert (ids, dropped) == (without_first, 1)
    with pytest.raises(TalmError, match="write a shorter message") as info:
        conversation.prompt("third " * 50, 20)
    assert (
        info.value.budget == 20
        and info.value.tokens > 50
        and info.value.fixed == conversation.system_tokens()
    )

    conversation.reset()
    conversation.system = None
    assert conversation.messages("x") == [{"role": "user", "content": "x"}]


def test_the_prompt_leaves_room_for_the_reply_but_at_least_half_the_context() -> None:
    assert prompt_budget(1024, 256) == 768
    assert prompt_budget(64, 10_000) == 32
    # without --max-new-tokens: the reply reserves a quarter of the context (at most 256) and takes the room left
    assert prompt_budget(64, None) == 48 and prompt_budget(4096, None) == 3840 and prompt_budget(2, None) == 1
    assert reply_limit(64, 40, None) == 24 and reply_limit(64, 40, 7) == 7
