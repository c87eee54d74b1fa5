"""The `serve` app (talm.use.serve) against the real `openai` client, on a live local server: chat completions
streamed and not, completions, models, bad requests in OpenAI's error shape, concurrent clients, and a client
that disconnects stopping its generation."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import endless_chat_model_dir

pytest.importorskip("fastapi", reason="the talm[serve] extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the talm[serve] extra is not installed")
openai = pytest.importorskip("openai", reason="the dev dependency openai is not installed")

from talm.tokenizer.chat import ChatFormat  # noqa: E402
from talm.use.chat import stream_reply  # noqa: E402
from talm.use.config import SampleConfig  # noqa: E402
from talm.use.load import load  # noqa: E402
from talm.use.serve import ModelServer, create_app  # noqa: E402

NAME = "endless"
CONTEXT = 4096  # long replies are possible: a disconnect must stop one midway
HELLO = [{"role": "user", "content": "Hello"}]


@dataclass
class Live:
    url: str  # http://127.0.0.1:PORT
    port: int
    server: ModelServer
    model_dir: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(model_dir: Path, name: str, **options: int) -> Iterator[Live]:
    """The app on a free port of 127.0.0.1, run by uvicorn in a thread, for the duration of the block."""
    model, tokenizer = load(model_dir, device="cpu")
    app = create_app(model, tokenizer, name, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", port, app.state.server, model_dir)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.server.close()  # uvicorn's shutdown did; a second time changes nothing


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    model_dir = endless_chat_model_dir(tmp_path_factory.mktemp("serve") / "models" / NAME, context=CONTEXT)
    with serving(model_dir, NAME) as running:
        yield running


def greedy_reply(live: Live, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The reply computed in-process, without the server: what the server must answer at temperature 0."""
    model, tokenizer = load(live.model_dir, device="cpu")
    ids = ChatFormat(tokenizer).render_prompt(messages)
    config = SampleConfig(max_new_tokens=max_tokens, temperature=0)
    return "".join(stream_reply(model, tokenizer, ids, config, end_id=tokenizer.eot_id))


def test_models_lists_the_one_model_served(live: Live) -> None:
    client = live.client()
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "talm"


def test_a_chat_completion_is_the_reply_to_the_conversation_streamed_or_not(live: Live) -> None:
    client = live.client()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ]
    expected = greedy_reply(live, messages, 12)
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.model == NAME
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"  # this model never ends a reply by itself
    assert (whole.usage.completion_tokens, whole.usage.total_tokens) == (12, 12 + whole.usage.prompt_tokens)

    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces) == expected  # streamed piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_the_stream_is_server_sent_events_ending_with_done(live: Live) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    body = {"model": NAME, "messages": HELLO, "max_tokens": 3, "stream": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_a_completion_continues_a_prompt(live: Live) -> None:
    client = live.client()
    whole = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 8
    streamed = client.completions.create(
        model=NAME, prompt="ROMEO:", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text != ""


def test_a_stop_sequence_ends_the_reply_before_it_streamed_or_not(live: Live) -> None:
    client = live.client()
    free = (
        client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0).choices[0].text
    )
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert len(stop) == 2
    for stops in (stop, [stop, "\x00"]):  # one string or a list, as OpenAI's API takes either
        whole = client.completions.create(
            model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0, stop=stops
        )
        assert whole.choices[0].text == free[: free.find(stop)] and whole.choices[0].finish_reason == "stop"
        assert whole.usage.completion_tokens < 40
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=HELLO, max_tokens=40, temperature=0, stream=True, stop=[stop]
        )
    )
    reply = greedy_reply(live, HELLO, 40)
    expected = reply[: reply.find(stop)] if stop in reply else reply
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == ("stop" if stop in reply else "length")


@pytest.mark.parametrize(
    ("request_fields", "status", "param", "code", "says"),
    [
        ({"model": "gpt-4"}, 404, "model", "model_not_found", "does not exist"),
        (
            {"max_tokens": CONTEXT + 1},
            400,
            "max_tokens",
            "context_length_exceeded",
            "more than the model's context",
        ),
        (  # null is "not given": max_completion_tokens alone is the limit, and named
            {"max_tokens": None, "max_completion_tokens": CONTEXT + 1},
            400,
            "max_completion_tokens",
            "context_length_exceeded",
            "max_completion_tokens is 4097",
        ),
        (
            {"messages": [{"role": "user", "content": "word " * CONTEXT}], "max_tokens": 5},
            400,
            "messages",
            "context_length_exceeded",
            "shorten the messages",
        ),
        (
            {"messages": [{"role": "assistant", "content": "Hi"}]},
            400,
            "messages",
            None,
            "where 'user' was expected",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages", None, "the roles are"),
        ({"messages": []}, 400, "messages", None, "at least 1"),
        ({"temperature": 3}, 400, "temperature", None, "less than or equal to 2"),
        ({"max_tokens": 0}, 400, "max_tokens", None, "greater than or equal to 1"),
        ({"n": 2}, 400, "n", None, "only n=1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None, "at most 4 stop sequences"),
        ({"stop": ["\n", ""]}, 400, "stop", None, "a stop sequence is empty"),
        ({"extra_body": {"best_of": 3}}, 400, "best_of", "unsupported_parameter", "except as 1"),
        ({"extra_body": {"beam_width": 3}}, 400, "beam_width", "unknown_parameter", "Unrecognized"),
        # strict types, as OpenAI's API: no string for a number, no boolean for an integer, no "yes" for true
        ({"max_tokens": "10"}, 400, "max_tokens", "invalid_type", "got a string"),
        ({"max_tokens": True}, 400, "max_tokens", "invalid_type", "got a boolean"),
        ({"max_tokens": 10.0}, 400, "max_tokens", "invalid_type", "got a number"),
        ({"stream": "yes"}, 400, "stream", "invalid_type", "valid boolean"),
        ({"temperature": "0.5"}, 400, "temperature", "invalid_type", "got a string"),
        (
            {"messages": [{"role": "user", "content": 5}]},
            400,
            "messages[0].content",
            "invalid_type",
            "string",
        ),
        # OpenAI's ranges
        ({"seed": 2**63}, 400, "seed", None, "less than 9223372036854775808"),
        ({"seed": -(2**63) - 1}, 400, "seed", None, "greater than or equal to"),
        ({"top_p": 0}, 400, "top_p", None, "greater than 0"),
        ({"presence_penalty": 3}, 400, "presence_penalty", None, "less than or equal to 2"),
        ({"max_completion_tokens": 4}, 400, "max_completion_tokens", None, "at the same time"),
        # OpenAI's fields that talm does not act on, at a value that would change the reply
        ({"logprobs": True}, 400, "logprobs", "unsupported_parameter", "not supported"),
        (
            {"response_format": {"type": "json_object"}},
            400,
            "response_format",
            "unsupported_parameter",
            "text",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "tools",
            "unsupported_parameter",
            "",
        ),
        ({"extra_body": {"logit_bias": {"50": 5}}}, 400, "logit_bias", "unsupported_parameter", ""),
        ({"tool_choice": "required"}, 400, "tool_choice", "unsupported_parameter", '"none" or "auto"'),
    ],
)
def test_bad_chat_requests_get_openai_shaped_errors(
    live: Live, request_fields: dict, status: int, param: str, code: str | None, says: str
) -> None:
    fields = {"model": NAME, "messages": HELLO, "max_tokens": 4, **request_fields}
    with pytest.raises(openai.APIStatusError) as raised:  # the client sends what it is given, unchecked
        live.client().chat.completions.create(**fields)
    err = raised.value
    assert err.status_code == status
    assert err.body["type"] == "invalid_request_error" and err.body["param"] == param
    assert err.body["code"] == code and says in err.body["message"]


def test_bad_bodies_and_unknown_routes_get_openai_shaped_errors(live: Live) -> None:
    def call(method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
        connection.request(method, path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    status, body = call("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = call("GET", "/v1/nothing")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = call("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": ["a", "b"]}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    too_long = {"model": NAME, "prompt": "a " * CONTEXT, "max_tokens": 5}
    status, body = call("POST", "/v1/completions", json.dumps(too_long).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    assert body["error"]["code"] == "context_length_exceeded"


def test_concurrent_clients_are_served_together(live: Live) -> None:
    """Three streams at once: their tokens interleave (none waits for another to finish), and each gets the
    reply it would get alone."""
    prompts = [[{"role": "user", "content": f"Question {i}"}] for i in range(3)]
    expected = [greedy_reply(live, p, 60) for p in prompts]
    arrivals: list[list[float]] = [[] for _ in prompts]
    replies = [""] * len(prompts)

    def ask(i: int) -> None:
        stream = live.client().chat.completions.create(
            model=NAME, messages=prompts[i], max_tokens=60, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals[i].append(time.monotonic())
                replies[i] += chunk.choices[0].delta.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    with held_worker(live.server):  # all three asked before any step: a loaded machine starts threads late
        for t in threads:
            t.start()
        wait_for_open_replies(live.server, len(prompts))
    for t in threads:
        t.join(timeout=120)
    assert replies == expected
    first_done = min(a[-1] for a in arrivals)
    assert all(a[0] < first_done for a in arrivals)  # every stream had started before any one ended


def test_sampled_replies_at_once_are_the_in_process_engines(live: Live) -> None:
    """Each request's sampling settings and stop strings reach the worker intact: three seeded, sampled replies
    asked at once are the ones the engine gives in this process, one at a time."""
    asked = [
        {"temperature": 1.2, "seed": 7, "top_k": 5},
        {"temperature": 0.9, "seed": 11, "top_p": 0.8},
        {"temperature": 1.0, "seed": 3, "stop": ["e"]},
    ]
    model, tokenizer = load(live.model_dir, device="cpu")
    ids = ChatFormat(tokenizer).render_prompt(HELLO)
    expected = []
    for fields in asked:
        config = SampleConfig(max_new_tokens=30, **{k: v for k, v in fields.items() if k != "stop"})
        stop = fields.get("stop", [])
        expected.append(
            "".join(stream_reply(model, tokenizer, ids, config, end_id=tokenizer.eot_id, stop=stop))
        )
    replies = [""] * len(asked)

    def ask(i: int) -> None:
        extra = {"top_k": asked[i]["top_k"]} if "top_k" in asked[i] else {}  # talm's, beyond OpenAI's
        fields = {k: v for k, v in asked[i].items() if k != "top_k"}
        replies[i] = (
            live.client()
            .chat.completions.create(model=NAME, messages=HELLO, max_tokens=30, extra_body=extra, **fields)
            .choices[0]
            .message.content
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asked))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert replies == expected and len(set(replies)) == len(asked)


@contextmanager
def held_worker(server: ModelServer) -> Iterator[None]:
    """The worker process stopped (SIGSTOP) for the block: requests pile up in its pipe, unread, until it goes
    on (SIGCONT) and takes them all before its next step."""
    os.kill(server.worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.worker.pid, signal.SIGCONT)


def wait_for_open_replies(server: ModelServer, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(server.replies) < count:
        assert time.monotonic() < deadline, "the requests never reached the server"
        time.sleep(0.01)


def test_concurrent_requests_share_the_engine_steps_instead_of_taking_turns(live: Live) -> None:
    """Four requests at once are one batch: as many engine steps as the longest reply, not the sum, and each
    reply is the one it gets alone."""
    budgets = [6, 24, 12, 18]
    prompts = [[{"role": "user", "content": f"Question {i}"}] for i in range(4)]
    expected = [greedy_reply(live, p, n) for p, n in zip(prompts, budgets, strict=True)]
    replies = [""] * 4

    def ask(i: int) -> None:
        reply = live.client().chat.completions.create(
            model=NAME, messages=prompts[i], max_tokens=budgets[i], temperature=0
        )
        replies[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    with held_worker(live.server):
        before = live.server.steps
        for t in threads:
            t.start()
        wait_for_open_replies(live.server, 4)
    for t in threads:
        t.join(timeout=120)
    assert replies == expected
    assert live.server.steps - before == max(budgets)  # taking turns, it would be sum(budgets) = 60


def test_a_flood_past_the_slots_and_the_queue_is_refused_with_429(live: Live) -> None:
    """One slot and a queue of one: a third request at once is refused as OpenAI refuses past a rate limit,
    and the two taken are answered in full once the engine runs."""
    with serving(live.model_dir, NAME, slots=1, queue=1) as small:
        replies = [""] * 2

        def ask(i: int) -> None:
            reply = small.client().chat.completions.create(
                model=NAME, messages=HELLO, max_tokens=8, temperature=0
            )
            replies[i] = reply.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        with held_worker(small.server):
            for t in threads:
                t.start()
            wait_for_open_replies(small.server, 2)
            with pytest.raises(openai.RateLimitError) as refused:
                small.client().chat.completions.create(model=NAME, messages=HELLO, max_tokens=8, stream=True)
        error = refused.value.body
        assert refused.value.status_code == 429 and error["code"] == "rate_limit_exceeded"
        assert set(error) == {"message", "type", "param", "code"} and "retry" in error["message"]
        for t in threads:
            t.join(timeout=60)
        assert replies == [greedy_reply(live, HELLO, 8)] * 2


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(live: Live, stream: bool) -> None:
    server = live.server
    before = server.tokens_generated
    connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    body = {"model": NAME, "messages": HELLO, "max_tokens": CONTEXT - 10, "temperature": 0, "stream": stream}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        response = connection.getresponse()
        for _ in range(5):  # the reply is under way (the first event names the role, then 4 pieces)
            assert response.readline().startswith(b"data: ")
            assert response.readline() == b"\n"
    else:  # nothing comes back before the whole reply: wait until it is under way
        deadline = time.monotonic() + 30
        while server.tokens_generated - before < 5:
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.01)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()

    deadline = time.monotonic() + 30
    last = -1
    while (count := server.tokens_generated) != last:  # until it stops growing
        assert time.monotonic() < deadline, "generation went on after the client left"
        last = count
        time.sleep(0.5)
    assert 4 <= count - before < CONTEXT - 10 - 100  # stopped far from the end of its token budget
    time.sleep(0.5)
    assert server.tokens_generated == count

    # the server is still fine
    reply = live.client().chat.completions.create(model=NAME, messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_text_parts_and_the_developer_role_read_as_plain_content_and_system(live: Live) -> None:
    client = live.client()
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    parts = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
    ]
    replies = [
        client.chat.completions.create(model=NAME, messages=m, max_tokens=6, temperature=0)
        .choices[0]
        .message.content
        for m in (plain, parts)
    ]
    assert replies[0] == replies[1] == greedy_reply(live, plain, 6)


def test_openai_fields_at_values_that_change_nothing_are_accepted(live: Live) -> None:
    """What OpenAI's clients send by default, or to say "nothing special": the reply is the plain one."""
    client = live.client()
    harmless = {
        "logprobs": False,
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": True,
        "store": False,
        "user": "someone",
        "metadata": {"run": "test"},
        "stream_options": None,
        "extra_body": {"top_logprobs": 0, "logit_bias": {}, "modalities": ["text"], "service_tier": "auto"},
    }
    reply = client.chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=6, temperature=0, **harmless
    )
    assert reply.choices[0].message.content == greedy_reply(live, HELLO, 6)
    # null is "not given", as in OpenAI's API; max_completion_tokens alone is max_tokens
    nulls = {"temperature": None, "top_p": None, "n": None, "stop": None, "seed": None, "max_tokens": None}
    body = {"model": NAME, "messages": HELLO, "max_completion_tokens": 6, **nulls}
    status, answer = post(live, "/v1/chat/completions", body)
    assert status == 200 and answer["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_any_64_bit_seed_is_a_reproducible_reply(live: Live, seed: int) -> None:
    client = live.client()
    replies = [
        client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=8, temperature=1.5, seed=seed)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert replies[0] == replies[1] != ""


def post(live: Live, path: str, body: object, connection: http.client.HTTPConnection | None = None) -> tuple:
    """POST `body` (JSON, or bytes as they are) on `connection` (else a new one): the status and the JSON."""
    connection = connection or http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body)
    connection.request("POST", path, data, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_bad_and_failing_requests_leave_the_connection_usable(
    live: Live, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Errors are JSON in OpenAI's shape, 400 for the client's, 500 for the server's (logged in one line), and the
    client's next request goes on the same connection."""
    connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    ok = {"model": NAME, "messages": HELLO, "max_tokens": 2}
    assert post(live, "/v1/chat/completions", ok, connection)[0] == 200
    sock = connection.sock
    bad = [
        ({**ok, "seed": -1}, 200, None),
        ({**ok, "seed": 2**64}, 400, "seed"),
        ({**ok, "max_tokens": "10"}, 400, "max_tokens"),
        ({**ok, "stream": "yes"}, 400, "stream"),
        (b'{"model": "endless", "messages": [], "temperature": NaN}', 400, None),
        ([ok], 400, None),
    ]
    for body, status, param in bad:
        got, answer = post(live, "/v1/chat/completions", body, connection)
        assert got == status, answer
        assert status == 200 or (
            set(answer["error"]) == {"message", "type", "param", "code"} and got == status
        )
        assert param is None or answer["error"]["param"] == param
        assert connection.sock is sock  # the same connection, kept open

    def fail(*args: object) -> None:
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(live.server, "fit", fail)
    with caplog.at_level(logging.INFO, logger="talm.serve"):
        status, answer = post(live, "/v1/chat/completions", ok, connection)
        assert status == 500 and answer["error"]["type"] == "server_error"
        assert "something unexpected" in answer["error"]["message"]
        assert connection.sock is sock
        monkeypatch.undo()
        assert post(live, "/v1/chat/completions", ok, connection)[0] == 200
        assert connection.sock is sock
        (line,) = wait_for_log_lines(caplog, r".* POST /v1/chat/completions 500, .*")
    assert "error: RuntimeError: something unexpected at test_serve.py:" in line
    assert "\n" not in line and not any(r.exc_info for r in caplog.records)  # one line, no traceback


def wait_for_log_lines(caplog: pytest.LogCaptureFixture, *patterns: str) -> list[str]:
    """The server's log line matching each regex of `patterns`, once each has been written (a line is written
    just after its response is sent); each must match exactly one line."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "talm.serve"]
        found = [[line for line in lines if re.fullmatch(p, line)] for p in patterns]
        if all(found) or time.monotonic() > deadline:
            assert all(len(f) == 1 for f in found), (patterns, lines)
            return [f[0] for f in found]
        time.sleep(0.02)


def test_each_request_is_logged_in_one_line_and_health_answers(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="talm.serve"):
        with urllib.request.urlopen(live.url + "/health", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok", "model": NAME}
        live.client().chat.completions.create(model=NAME, messages=HELLO, max_tokens=5)
        chunks = live.client().completions.create(model=NAME, prompt="ROMEO:", max_tokens=3, stream=True)
        assert len(list(chunks)) >= 2
        wait_for_log_lines(
            caplog,
            r"127\.0\.0\.1 GET /health 200, \d+\.\d\d s",
            r"127\.0\.0\.1 POST /v1/chat/completions 200, \d+ prompt \+ 5 reply tokens \(length\), \d+\.\d\d s",
            r"127\.0\.0\.1 POST /v1/completions 200, \d+ prompt \+ 3 reply tokens \(length\), \d+\.\d\d s",
        )


@pytest.mark.parametrize(
    ("request_fields", "param", "code"),
    [
        ({"max_tokens": "10"}, "max_tokens", "invalid_type"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({"seed": -(2**63) - 1}, "seed", None),
        ({"echo": True}, "echo", None),
        ({"best_of": 2}, "best_of", "unsupported_parameter"),
        ({"logprobs": 5}, "logprobs", "unsupported_parameter"),
        ({"suffix": "end"}, "suffix", "unsupported_parameter"),
    ],
)
def test_completion_requests_are_checked_as_chat_requests_are(
    live: Live, request_fields: dict, param: str, code: str | None
) -> None:
    fields = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 4, **request_fields}
    with pytest.raises(openai.BadRequestError) as raised:
        live.client().completions.create(**fields)
    assert raised.value.body["param"] == param and raised.value.body["code"] == code
    harmless = {"best_of": 1, "suffix": "", "logprobs": None, "echo": False, "seed": -5}
    reply = live.client().completions.create(model=NAME, prompt="ROMEO:", max_tokens=4, **harmless)
    assert reply.usage.completion_tokens == 4


def test_a_worker_that_dies_ends_open_replies_with_an_error_and_later_requests_get_503(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    """The generation worker killed mid-reply: the open stream ends with an error event and the open plain
    request with a 503, both in OpenAI's shape (no hang); later requests and /health say 503 and why."""
    with serving(live.model_dir, NAME) as doomed, caplog.at_level(logging.INFO, logger="talm.serve"):
        connection = http.client.HTTPConnection("127.0.0.1", doomed.port, timeout=60)
        body = {"model": NAME, "messages": HELLO, "max_tokens": CONTEXT - 10, "temperature": 0}
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), headers)
        response = connection.getresponse()
        for _ in range(3):  # the reply is under way
            assert response.readline().startswith(b"data: ") and response.readline() == b"\n"
        plain: list[tuple] = []
        waiting = threading.Thread(target=lambda: plain.append(post(doomed, "/v1/chat/completions", body)))
        waiting.start()
        wait_for_open_replies(doomed.server, 2)
        os.kill(doomed.server.worker.pid, signal.SIGKILL)

        events = [e for e in response.read().decode().split("\n\n") if e]
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "worker_failed" and "exit code -9" in error["message"], error
        waiting.join(timeout=60)
        ((status, answer),) = plain
        assert status == 503 and answer["error"]["code"] == "worker_failed"
        assert set(answer["error"]) == {"message", "type", "param", "code"}

        with pytest.raises(openai.InternalServerError) as refused:
            doomed.client().chat.completions.create(model=NAME, messages=HELLO, max_tokens=2)
        assert refused.value.status_code == 503 and "restart serve" in refused.value.body["message"]
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(doomed.url + "/health", timeout=10)
        assert health.value.code == 503
        assert json.loads(health.value.read())["status"] == "failed"
        wait_for_log_lines(caplog, r"generation is down: the generation worker stopped \(exit code -9\)")
