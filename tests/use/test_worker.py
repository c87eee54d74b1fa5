"""`serve`'s generation worker (talm.use.worker) in this process: what a step reports, a failing step, a
cancelled reply, and a worker that cannot build its engine. (The worker as a process, behind the server:
tests/use/test_serve.py.)"""

from __future__ import annotations

import copy
import multiprocessing
import signal
import threading

import pytest
from conftest import BASE_TOKENIZER, varied_model

from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.use.chat import reply_settings, stream_reply
from talm.use.config import SampleConfig
from talm.use.worker import READY, Add, Cancel, EngineProcess, Failed, Setup, Worker, worker_main


@pytest.fixture(scope="module")
def parts() -> tuple:
    tokenizer = Tokenizer.from_file(BASE_TOKENIZER)
    return varied_model(vocab=tokenizer.vocab_size, context=64), tokenizer


def add(rid: int, prompt: list[int], tokens: int, tokenizer: Tokenizer, stop: list[str] | None = None) -> Add:
    settings = reply_settings(SampleConfig(max_new_tokens=tokens, temperature=0), tokenizer.eot_id)
    return Add(rid, prompt, settings, stop or [])


def run(worker: Worker) -> dict[int, list]:
    """Step until no reply runs: each reply's events, in order."""
    events: dict[int, list] = {}
    while worker.engine.busy:
        for event in worker.step().events:
            events.setdefault(event.rid, []).append(event)
    return events


def test_each_reply_gets_its_text_and_its_end_as_the_in_process_reply(parts: tuple) -> None:
    model, tokenizer = parts
    worker = Worker(model, tokenizer, slots=4)
    prompts = [tokenizer.encode("Hello"), tokenizer.encode("ROMEO:")]
    free = "".join(stream_reply(model, tokenizer, prompts[1], SampleConfig(max_new_tokens=20, temperature=0),
                                end_id=tokenizer.eot_id))  # fmt: skip
    stop = free[8:10]
    worker.take(add(0, prompts[0], 12, tokenizer))
    worker.take(add(1, prompts[1], 20, tokenizer, [stop]))
    events = run(worker)
    config = SampleConfig(max_new_tokens=12, temperature=0)
    alone = "".join(stream_reply(model, tokenizer, prompts[0], config, end_id=tokenizer.eot_id))
    assert "".join(e.text for e in events[0]) == alone
    assert [e.done for e in events[0]] == [False] * 11 + [True] and events[0][-1].tokens == 12
    assert events[0][-1].finish_reason == "length"
    assert "".join(e.text for e in events[1]) == free[: free.find(stop)]
    assert events[1][-1].done and events[1][-1].finish_reason == "stop"
    assert worker.replies == {} and worker.steps == 12 and worker.tokens_generated == 12 + len(events[1])


def test_a_cancelled_reply_gets_no_more_events(parts: tuple) -> None:
    model, tokenizer = parts
    worker = Worker(model, tokenizer, slots=4)
    worker.take(add(0, tokenizer.encode("Hello"), 30, tokenizer))
    worker.take(add(1, tokenizer.encode("Hello"), 5, tokenizer))
    assert {e.rid for e in worker.step().events} == {0, 1}
    worker.take(Cancel(0))
    events = run(worker)
    assert set(events) == {1} and len(events[1]) == 4


def test_a_failing_step_ends_every_reply_with_its_error_and_the_worker_goes_on(
    parts: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = parts
    worker = Worker(model, tokenizer, slots=4)
    for rid in (0, 1):
        worker.take(add(rid, tokenizer.encode("Hello"), 5, tokenizer))

    def fail() -> None:
        raise RuntimeError("out of memory\nsomewhere")

    monkeypatch.setattr(worker.engine, "step", fail)
    step = worker.step()
    assert [(e.rid, e.done, e.error) for e in step.events] == [
        (0, True, "RuntimeError: out of memory somewhere"),
        (1, True, "RuntimeError: out of memory somewhere"),
    ]
    worker.take(add(2, tokenizer.encode("Hello"), 3, tokenizer))  # a fresh engine
    assert [e.tokens for e in run(worker)[2]] == [1, 2, 3]


def test_a_worker_that_cannot_build_its_engine_says_why_in_one_line(parts: tuple) -> None:
    model, tokenizer = parts
    requests_end, requests = multiprocessing.Pipe(duplex=False)
    events, events_end = multiprocessing.Pipe(duplex=False)
    setup = Setup(model, "no-such-device", tokenizer, 2, 1)
    sending = threading.Thread(target=requests.send, args=(setup,))  # more than a pipe holds: read as it goes
    sending.start()
    handler = signal.getsignal(signal.SIGINT)
    try:
        worker_main(requests_end, events_end)  # here, not in a process: it returns once it has said why
    finally:
        signal.signal(signal.SIGINT, handler)
    sending.join(timeout=10)
    message = events.recv()
    assert isinstance(message, Failed) and message != READY
    assert "no-such-device" in message.why and "\n" not in message.why


def test_a_tokenizer_that_cannot_be_sent_is_one_line_and_leaves_no_worker(parts: tuple) -> None:
    model, tokenizer = parts
    broken = copy.copy(tokenizer)
    broken.hook = lambda: None  # cannot be pickled
    with pytest.raises(TalmError, match=r"^the generation worker could not start: .*pickle") as raised:
        EngineProcess(model, broken, slots=2)
    assert "\n" not in str(raised.value)
    assert [p for p in multiprocessing.active_children() if p.name == "talm-engine"] == []
