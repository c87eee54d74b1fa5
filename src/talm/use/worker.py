"""`serve`'s generation worker: the batched engine (`talm.model.engine`) stepped in a process of its own, so that
stepping it never shares a GIL with the server's event loop (in one process, each of the two slowed the other:
a step of 8 rows took twice as long beside one busy Python thread, and first tokens waited behind it).

The server process starts it (`EngineProcess`, multiprocessing's "spawn" context, which CUDA needs) and
hands it the model (torch shares a CPU or CUDA model's tensors with the child instead of copying them) and the
tokenizer. Two one-way pipes join them:

    server -> worker    Setup(model, device, tokenizer, slots, threads) once, then Add(rid, prompt ids, settings,
                        stop strings), Cancel(rid), and STOP
    worker -> server    READY once the engine is built (or Failed(why)), then one Step per engine step: the step
                        count, the tokens generated so far, and a ReplyEvent for every reply the step moved on
                        (its new text, its token count, why it ended, or the error that ended it)

The worker steps the engine whenever a reply runs, takes what came down its pipe between steps without waiting,
and waits on the pipe only when it has nothing to generate. It decodes each reply's tokens to text itself
(`talm.use.chat.ReplyText`: whole characters, stop strings held back and cut). It ends when told (STOP) or when
the server's end of the pipe closes (the server exited or died: no orphan), and ignores Ctrl-C, which the
terminal sends to the whole process group: the server decides when open replies end.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import torch

from talm.errors import TalmError
from talm.model.engine import Engine, Generation, Settings
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.use.chat import ReplyStats, ReplyText

READY = "ready"
STOP = "stop"
STOP_S = 5.0  # how long a stopping worker may take to end before it is killed


@dataclass(frozen=True)
class Setup:
    """The worker's first message: what it builds its engine from. Sent down the pipe, not as the process's
    arguments: multiprocessing writes those to the child before it can notice the child died, and a big
    tokenizer (more than a pipe's buffer) would then hang the start for ever."""

    model: GPT
    device: str
    tokenizer: Tokenizer
    slots: int
    threads: int


@dataclass(frozen=True)
class Add:
    """A reply to generate: `rid` names it in the events."""

    rid: int
    prompt_ids: list[int]
    settings: Settings
    stops: list[str]


@dataclass(frozen=True)
class Cancel:
    rid: int


@dataclass(frozen=True)
class Failed:
    """The worker could not start: why, in one line."""

    why: str


class ReplyEvent(NamedTuple):
    """What one step did to one reply: the text it made ready, the reply's tokens so far, and once it ended
    (`done`) why (`finish_reason`, `ended_by`: `ReplyStats`'), or the error that ended it."""

    rid: int
    text: str
    tokens: int
    done: bool
    finish_reason: str | None = None
    ended_by: str | None = None
    error: str | None = None


class Step(NamedTuple):
    """One engine step's news, in one message: every reply it moved on."""

    steps: int  # the engine's steps so far (batched forward passes)
    tokens_generated: int  # tokens generated so far, all replies together
    events: list[ReplyEvent]


class WorkerGone(Exception):
    """The worker's pipe is closed: it exited or died."""


# ------------------------------------------------------------------------------------------------ the server's side


class EngineProcess:
    """The server's handle on its generation worker: starts it (TalmError, in one line, if it cannot start), sends
    it requests (`send`; WorkerGone once it is gone), receives its messages (`receive`; WorkerGone at its end),
    and ends it (`close`)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, slots: int) -> None:
        import torch.multiprocessing as mp  # its pickler shares tensors' memory with the child

        context = mp.get_context("spawn")
        worker_requests, self.requests = context.Pipe(duplex=False)
        self.events, worker_events = context.Pipe(duplex=False)
        device = next(model.parameters()).device
        shareable = device.type in ("cpu", "cuda")  # torch shares these tensors' memory; not mps's
        shared = model if shareable else copy.deepcopy(model).to("cpu")
        args = (worker_requests, worker_events)
        self.process = context.Process(target=worker_main, args=args, name="talm-engine", daemon=True)
        try:
            with sigint_ignored():  # inherited: a Ctrl-C while the worker starts up does not kill it either
                self.process.start()
        except Exception as err:
            raise TalmError(f"the generation worker could not start: {one_line(err)}") from None
        finally:  # the child has its own copies: with ours closed, either side's exit closes the pipes
            worker_requests.close()
            worker_events.close()
        try:
            self.send(Setup(shared, str(device), tokenizer, slots, torch.get_num_threads()))
        except WorkerGone:
            pass  # it died before reading: _wait_until_ready says so
        except Exception as err:  # the model or tokenizer cannot be sent (pickled, or its memory shared)
            self.close()
            raise TalmError(f"the generation worker could not start: {one_line(err)}") from None
        self._wait_until_ready()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _wait_until_ready(self) -> None:
        try:
            message = self.receive()
        except WorkerGone:
            message = Failed(f"it exited with code {self.exit_code()}")
        if message != READY:
            self.close()
            why = message.why if isinstance(message, Failed) else f"it sent {message!r}"
            raise TalmError(f"the generation worker could not start: {why}")

    def send(self, message: Any) -> None:
        try:
            self.requests.send(message)
        except (OSError, ValueError):  # a broken pipe, or ours closed
            raise WorkerGone from None

    def receive(self) -> Any:
        try:
            return self.events.recv()
        except (EOFError, OSError):
            raise WorkerGone from None

    def exit_code(self) -> int | None:
        self.process.join(timeout=1.0)
        return self.process.exitcode

    def close(self) -> None:
        """End the worker: told to stop, then terminated, then killed, each after STOP_S. Safe to call twice."""
        with contextlib.suppress(WorkerGone):
            self.send(STOP)
        self.requests.close()
        self.process.join(timeout=STOP_S)
        for end in (self.process.terminate, self.process.kill):
            if self.process.exitcode is not None:
                break
            end()
            self.process.join(timeout=STOP_S)
        self.events.close()


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored for the block (a process started meanwhile keeps ignoring it); only the main thread can
    change a signal's handler, so elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def one_line(err: BaseException) -> str:
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


# ------------------------------------------------------------------------------------------------ the worker's side


def worker_main(requests: Connection, events: Connection) -> None:
    """The worker process: build the engine (`Setup`), say READY (or why not), then serve until STOP or the
    pipe's end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server decides
    try:
        setup: Setup = requests.recv()
        torch.set_num_threads(setup.threads)
        worker = Worker(setup.model.to(setup.device), setup.tokenizer, setup.slots)
    except Exception as err:
        with contextlib.suppress(OSError):
            events.send(Failed(one_line(err)))
        return
    try:
        events.send(READY)
        worker.run(requests, events)
    except (OSError, EOFError):  # the server is gone: nothing is left to tell
        pass


class Worker:
    """The engine and the replies it runs (rid -> its sequence), in the worker process."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, slots: int) -> None:
        self.model, self.tokenizer, self.slots = model, tokenizer, slots
        self.engine = self._new_engine()
        self.replies: dict[int, Generation] = {}
        self.tokens_generated = 0
        self.steps = 0  # over every engine this worker built

    def _new_engine(self) -> Engine:
        return Engine(self.model, slots=self.slots, vocab_size=self.tokenizer.vocab_size)

    def run(self, requests: Connection, events: Connection) -> None:
        """Step while any reply runs; between steps take every request waiting, without blocking."""
        while True:
            wait = not self.engine.busy
            while requests.poll(None if wait else 0):
                message = requests.recv()  # EOFError once the server's end is closed
                if message == STOP:
                    return
                self.take(message)
                wait = False
            if self.engine.busy:
                events.send(self.step())

    def take(self, message: Add | Cancel) -> None:
        if isinstance(message, Cancel):
            if (seq := self.replies.pop(message.rid, None)) is not None:
                self.engine.cancel(seq)
            return
        seq = self.engine.add(message.prompt_ids, message.settings)
        end_id = message.settings.end_ids[0]
        context = self.model.config.context_length
        stats = ReplyStats()
        seq.owner = (
            message.rid,
            ReplyText(self.tokenizer, end_id, message.stops, stats, len(seq.prompt), context),
        )
        self.replies[message.rid] = seq

    def step(self) -> Step:
        before = self.engine.steps
        try:
            stepped = self.engine.step()
        except Exception as err:  # reported to every reply, never left hanging; the engine starts afresh
            self.steps += self.engine.steps - before
            failed = [ReplyEvent(rid, "", 0, True, error=one_line(err)) for rid in self.replies]
            self.replies.clear()
            self.engine = self._new_engine()
            return Step(self.steps, self.tokens_generated, failed)
        self.steps += self.engine.steps - before
        self.tokens_generated += len(stepped)
        return Step(self.steps, self.tokens_generated, [self.on_token(seq, token) for seq, token in stepped])

    def on_token(self, seq: Generation, token: int) -> ReplyEvent:
        rid, text = seq.owner
        try:
            piece = text.push(token)
            if not text.done and seq.done:  # the token budget ran out
                piece += text.finish()
        except Exception as err:  # one reply's failure (its text) ends that reply only
            self.engine.cancel(seq)
            self.replies.pop(rid, None)
            return ReplyEvent(rid, "", text.stats.tokens, True, error=one_line(err))
        if text.done:  # its end token, a stop string, or its budget
            self.engine.cancel(seq)
            self.replies.pop(rid, None)
        stats = text.stats
        return ReplyEvent(rid, piece, stats.tokens, text.done, stats.finish_reason, stats.ended_by)
