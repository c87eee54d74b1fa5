"""The `serve` command's web app: an OpenAI-compatible API and a chat page, on FastAPI (the `talm[serve]` extra).

    GET  /                      the chat page (page/chat.html: one file, inline JavaScript, streams replies)
    GET  /health                200 {"status": "ok", "model": NAME} while the server takes requests; 503 with
                                "stopping", or "failed" and the error, when it does not
    GET  /v1/models             the one model served, named after its directory (models/NAME -> "NAME"), with
                                its `context_length` and the page's default reply length (`default_max_tokens`)
    POST /v1/chat/completions   a reply in talm's chat format; `stream: true` sends server-sent events
    POST /v1/completions        a plain continuation of a prompt (a base model's use)

Requests and responses are `talm.use.api`'s. A prompt plus `max_tokens` must fit the model's context (unset,
`max_tokens` is the rest of the context); a request that does not fit is refused (400,
`context_length_exceeded`) rather than cut, so a client never gets a reply to a conversation it did not send.

Concurrency: one copy of the model and one batched generation engine (`talm.model.engine`), stepped in a worker
process of its own (`talm.use.worker`), never in the server's process, whose event loop would otherwise share a
GIL with it: each step gives every running reply its next token in one forward pass, a new reply joins the batch
at the next step and a finished one leaves it (continuous batching). The server sends the worker each request
and cancellation down a pipe; a reader thread hands each step's events (every reply's new text at once) to the
event loop in one call. Up to `slots` replies run at once, `queue` more wait for a slot, and a request past that
is refused with 429 (OpenAI's `rate_limit_exceeded`), so a flood of clients costs neither a crash nor unbounded
memory. A reply whose client disconnects (a stream whose client left, or a plain request whose client is gone,
checked every `POLL_S`) is cancelled: it leaves the batch at the next step. `ModelServer.tokens_generated` and
`steps` are the worker's counts as of its last step, for the logs and the tests. A worker that cannot start is a
TalmError (one line); one that dies ends every open reply with a 503 (`worker_failed`, in OpenAI's shape), and
from then on requests and /health answer 503 saying why. The worker ends when the server stops (or dies).

Every request is logged in one line (`RequestLog`: client, method, path, status, tokens, seconds) on the logger
"talm.serve". An exception no route handles is a 500 in OpenAI's shape, logged in that line, and the connection
stays usable. Stopping (`run_server`): the first Ctrl-C (or SIGTERM) stops taking connections and gives open
replies `GRACE_S` to finish (the worker ignores Ctrl-C: the server ends it once uvicorn has stopped); a second
ends them at once. A reply cut short ends with an error (503, or an error event in a stream), and the process
exits 0 without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from talm.errors import TalmError
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import BadConversation, ChatFormat
from talm.use.api import ApiError, ChatRequest, CompletionRequest, Reply, usage, validation_error
from talm.use.chat import ReplyStats, prompt_budget, reply_settings
from talm.use.config import SampleConfig
from talm.use.sample import encode_prompt
from talm.use.worker import STOP_S, Add, Cancel, EngineProcess, Step, WorkerGone

POLL_S = 0.1  # how often a waiting request checks that its client is still there
GRACE_S = 3.0  # after Ctrl-C, how long open replies may go on
SLOTS = 8  # replies generated at once (the engine's batch)
QUEUE = 64  # replies waiting for a slot; past that, 429
_DONE = object()  # what a reply's queue gets after its last piece
log = logging.getLogger("talm.serve")


class WorkerError(Exception):
    """What ended one reply in the worker (its message, in one line), raised in its request."""


@dataclass
class OpenReply:
    """A reply under way, in the server: the queue its pieces come on (then _DONE, or the exception that ended
    it) and its stats, both filled in from the worker's events."""

    pieces: asyncio.Queue[Any]
    stats: ReplyStats
    done: bool = False


class ModelServer:
    """One model shared by every request through one batched engine, stepped by a worker process of its own
    (`talm.use.worker`): each step gives every reply in the batch its next token; new replies join at the next
    step, up to `slots` at once, `queue` more wait, and past that a request is refused (429). A reader thread
    hands each step's events to the event loop in one call. If the worker dies, open replies end with an error
    and later requests are refused (503), `failure` saying why."""

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, name: str, *, slots: int = SLOTS, queue: int = QUEUE
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.chat_format = ChatFormat(tokenizer)  # refuses a tokenizer without role tokens
        self.context = model.config.context_length
        self.slots, self.queue = slots, queue
        self.replies: dict[int, OpenReply] = {}  # the event loop's only
        self.ids = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tokens_generated = 0  # as the worker last said: every token generated
        self.steps = 0  # as the worker last said: its engine steps (batched forward passes)
        self.stop_at: float | None = None  # time.monotonic() at which open replies end (None: not stopping)
        self.failure: str | None = None  # why generation is down (the worker died), None while it is fine
        self.closing = False
        self.worker = EngineProcess(model, tokenizer, slots=slots)  # TalmError if it cannot start
        self.reader = threading.Thread(target=self._read, name="talm-worker-reader", daemon=True)
        self.reader.start()

    def stop(self, grace_s: float) -> None:
        """End every open reply in `grace_s` (or sooner, if an earlier stop said so)."""
        at = time.monotonic() + grace_s
        self.stop_at = at if self.stop_at is None else min(self.stop_at, at)

    def stopped(self) -> bool:
        return self.stop_at is not None and time.monotonic() >= self.stop_at

    def close(self) -> None:
        """End the worker (the server is stopping). Safe to call twice."""
        self.closing = True
        self.worker.close()
        self.reader.join(timeout=STOP_S)

    def unavailable(self) -> ApiError:
        return ApiError(
            503,
            f"generation is down: {self.failure}; restart serve",
            type="server_error",
            code="worker_failed",
        )

    def submit(self, prompt_ids: list[int], config: SampleConfig, stats: ReplyStats, stop: list[str]) -> Any:
        """Send a reply to the worker: (its id, the asyncio queue its pieces come on). ApiError 429 when `slots`
        replies run and `queue` more wait, 503 when the worker is gone."""
        if self.failure is not None:
            raise self.unavailable()
        if len(self.replies) >= self.slots + self.queue:
            raise ApiError(
                429,
                f"the server is busy: {self.slots} replies are being generated and {self.queue} more are "
                "waiting; retry later",
                type="requests",
                code="rate_limit_exceeded",
            )
        self.loop = asyncio.get_running_loop()
        rid = next(self.ids)
        settings = reply_settings(config, self.tokenizer.eot_id)
        self.replies[rid] = OpenReply(asyncio.Queue(), stats)
        try:
            self.worker.send(Add(rid, list(prompt_ids), settings, list(stop)))
        except WorkerGone:
            del self.replies[rid]
            self._fail(f"the generation worker stopped (exit code {self.worker.exit_code()})")
            raise self.unavailable() from None
        return rid, self.replies[rid].pieces

    def _read(self) -> None:
        """The reader thread: each message of the worker goes to the event loop in one call, nothing more (the
        loop must not wait on the pipe, and this thread must not hold the GIL long)."""
        while True:
            try:
                message = self.worker.receive()
            except WorkerGone:
                why = "the server stopped" if self.closing else (
                    f"the generation worker stopped (exit code {self.worker.exit_code()})"
                )  # fmt: skip
                if self.loop is None:  # no request yet, so no reply to end: recorded from this thread
                    self._fail(why)
                elif not self._in_loop(self._fail, why):  # the loop is closed: the server has stopped
                    self.failure = self.failure or why
                return
            self._in_loop(self._dispatch, message)

    def _in_loop(self, function: Any, *args: Any) -> bool:
        """Have the event loop call `function(*args)`; False if there is no loop to do it (none yet, or closed)."""
        if self.loop is None:
            return False
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:
            return False
        return True

    def _dispatch(self, step: Step) -> None:
        """One engine step's events, to the replies they are for (in the event loop)."""
        self.steps, self.tokens_generated = step.steps, step.tokens_generated
        for event in step.events:
            reply = self.replies.get(event.rid)
            if reply is None:  # its request has ended meanwhile
                continue
            reply.stats.set_tokens(event.tokens)
            if event.finish_reason is not None:
                reply.stats.end(event.finish_reason, event.ended_by or "")
            if event.text:
                reply.pieces.put_nowait(event.text)
            if event.done:
                reply.done = True
                reply.pieces.put_nowait(_DONE if event.error is None else WorkerError(event.error))

    def _fail(self, why: str) -> None:
        """The worker is gone: every open reply ends with 503, and so does every later request."""
        self.failure = self.failure or why
        if not self.closing:
            log.error(f"generation is down: {why}")
        for reply in self.replies.values():
            if not reply.done:
                reply.done = True
                reply.pieces.put_nowait(self.unavailable())

    def cancel(self, rid: int) -> None:
        """Forget reply `rid`; if it still runs, the worker ends it at its next step."""
        reply = self.replies.pop(rid, None)
        if reply is not None and not reply.done:
            with contextlib.suppress(WorkerGone):
                self.worker.send(Cancel(rid))

    async def stream(self, rid: int, pieces: asyncio.Queue[Any], request: Request) -> AsyncIterator[str]:
        """The reply's pieces as they are generated; generation stops when the client disconnects or this
        iterator is closed early (a cancelled stream)."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                if self.stopped():
                    raise ApiError(
                        503,
                        "the server is shutting down: the reply was cut short",
                        type="server_error",
                        code="server_shutting_down",
                    )
                if loop.time() - checked >= POLL_S:  # not at every token: it costs
                    if await request.is_disconnected():
                        return
                    checked = loop.time()
                try:
                    item = (
                        pieces.get_nowait()
                        if not pieces.empty()
                        else await asyncio.wait_for(pieces.get(), POLL_S)
                    )
                except TimeoutError:
                    continue
                # What else is ready goes in the same piece: under load, one event for several tokens instead
                # of one each (the per-event work, here and in the client, is what load adds). _DONE or an
                # exception is always the last item.
                items = [item]
                while not pieces.empty():
                    items.append(pieces.get_nowait())
                if text := "".join(i for i in items if isinstance(i, str)):
                    yield text
                if items[-1] is _DONE:
                    return
                if isinstance(items[-1], Exception):
                    raise items[-1]
        finally:
            self.cancel(rid)

    def fit(
        self, prompt_ids: list[int], requested: int | None, prompt_param: str, limit_param: str = "max_tokens"
    ) -> int:
        """The reply's token budget: `requested` (the request's `limit_param`, else the rest of the context) if
        the prompt and it fit the context, else ApiError 400."""
        if requested is not None and requested > self.context:
            raise ApiError(
                400,
                f"{limit_param} is {requested}, more than the model's context of {self.context} tokens: ask for "
                "fewer",
                param=limit_param,
                code="context_length_exceeded",
            )
        budget = requested if requested is not None else self.context - len(prompt_ids)
        if len(prompt_ids) + max(budget, 1) > self.context:
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens and the reply may be {max(budget, 1)}: more than the "
                f"model's context of {self.context} tokens; shorten the {prompt_param} or lower {limit_param}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        return budget


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as JSON (or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_page() -> str:
    return resources.files("talm.use").joinpath("page", "chat.html").read_text(encoding="utf-8")


class RequestRecord:
    """What one request's log line says beyond HTTP: its tokens and its error. Routes fill it in
    (`request_record`); `RequestLog` writes the line."""

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.stats: ReplyStats | None = None
        self.error: str | None = None

    def describe(self) -> str:
        parts = []
        if self.prompt_tokens is not None and self.stats is not None:
            why = f" ({self.stats.finish_reason})" if self.stats.finish_reason else ""
            parts.append(f"{self.prompt_tokens} prompt + {self.stats.tokens} reply tokens{why}")
        if self.error:
            parts.append(f"error: {self.error}")
        return ", ".join(parts)


_RECORD = "talm_record"  # its key in the request's ASGI state


def request_record(request: Request) -> RequestRecord:
    return request.scope.setdefault("state", {}).setdefault(_RECORD, RequestRecord())


def describe_exception(err: BaseException) -> str:
    """An exception in one line: its type, message and the line that raised it."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}{where}" if message else f"{type(err).__name__}{where}"


class RequestLog:
    """ASGI middleware: one log line per HTTP request (client, method, path, status, tokens, seconds). An
    exception that no route handled is answered here, never left to uvicorn (which logs a traceback and drops the
    connection): a 500 in OpenAI's shape if the response has not started, else the response is ended. A request
    cancelled while the server stops (asyncio cancels what is left) ends its response the same way, quietly."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope.setdefault("state", {}).setdefault(_RECORD, RequestRecord())
        response: dict[str, Any] = {"status": None, "complete": False}
        start = time.perf_counter()

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except (
            asyncio.CancelledError
        ):  # the server is stopping: end the response rather than raise into uvicorn
            record.error = "cut short: the server stopped"
            await self._finish(sending, response, ApiError(503, "the server stopped", type="server_error"))
        except Exception as err:
            record.error = describe_exception(err)
            await self._finish(
                sending, response, ApiError(500, f"the server failed: {err}", type="server_error")
            )
        finally:
            client = scope.get("client")
            who = f"{client[0]} " if client else ""
            status = response["status"] or "-"
            details = record.describe()
            log.info(
                f"{who}{scope['method']} {scope['path']} {status}{', ' + details if details else ''}, "
                f"{time.perf_counter() - start:.2f} s"
            )

    @staticmethod
    async def _finish(send: Any, response: dict[str, Any], err: ApiError) -> None:
        with contextlib.suppress(Exception):  # the client may be gone
            if response["status"] is None:
                body = json.dumps(err.body()).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": err.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            elif not response["complete"]:
                await send({"type": "http.response.body", "body": b""})


def create_app(
    model: GPT, tokenizer: Tokenizer, name: str, *, slots: int = SLOTS, queue: int = QUEUE
) -> FastAPI:
    """The web app serving `model` under the model id `name`, `slots` replies at once and `queue` waiting. It
    starts the generation worker now (TalmError if it cannot start) and ends it when the app shuts down (or
    `app.state.server.close()`). The worker is a "spawn" process, which imports the caller's main module again:
    a script that calls this must do so under `if __name__ == "__main__":`."""
    server = ModelServer(model, tokenizer, name, slots=slots, queue=queue)  # starts the worker

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(server.close)  # the server stops: so does its worker

    app = FastAPI(title="talm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(RequestLog)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        request_record(request).error = err.message
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(
            ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code)
        )

    add_info_routes(app, server)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_model(server, body.model)
        try:
            prompt_ids = server.chat_format.render_prompt([m.as_chat() for m in body.messages])
        except BadConversation as err:
            raise ApiError(400, str(err), param="messages") from None
        return await respond(server, body, request, prompt_ids, Reply(name, chat=True))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(server, body.model)
        assert isinstance(body.prompt, str)  # the validator made one string of it
        try:
            prompt_ids = encode_prompt(tokenizer, body.prompt)
        except TalmError as err:
            raise ApiError(400, str(err), param="prompt") from None
        return await respond(server, body, request, prompt_ids, Reply(name, chat=False))

    return app


def check_model(server: ModelServer, requested: str) -> None:
    if requested != server.name:
        raise ApiError(
            404,
            f"the model {requested!r} does not exist: this server serves {server.name!r}",
            param="model",
            code="model_not_found",
        )


def add_info_routes(app: FastAPI, server: ModelServer) -> None:
    """GET /, /health, /v1/models and /v1/models/ID."""

    def model_card() -> dict[str, Any]:
        # beyond OpenAI's card: the context, and the reply length `chat` reserves by default (the page's default)
        default_max_tokens = server.context - prompt_budget(server.context, SampleConfig().max_new_tokens)
        return {
            "id": server.name,
            "object": "model",
            "created": 0,
            "owned_by": "talm",
            "context_length": server.context,
            "default_max_tokens": default_max_tokens,
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return chat_page()

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.failure is not None:
            body = {"status": "failed", "model": server.name, "error": server.unavailable().body()["error"]}
            return JSONResponse(body, status_code=503)
        if server.stop_at is not None:
            return JSONResponse({"status": "stopping", "model": server.name}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.name})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> dict[str, Any]:
        check_model(server, model_id)
        return model_card()


async def respond(
    server: ModelServer,
    body: ChatRequest | CompletionRequest,
    request: Request,
    prompt_ids: list[int],
    reply: Reply,
) -> Any:
    """The reply to a request whose prompt is `prompt_ids`: whole, or as server-sent events."""
    prompt_param = "messages" if reply.chat else "prompt"
    limit_param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    config = body.sample_config(server.fit(prompt_ids, body.token_limit, prompt_param, limit_param))
    stats = ReplyStats()
    record = request_record(request)
    record.prompt_tokens, record.stats = len(prompt_ids), stats
    rid, queue = server.submit(prompt_ids, config, stats, body.stop or [])  # 429 when too many wait
    pieces = server.stream(rid, queue, request)
    if not body.stream:
        text = "".join([piece async for piece in pieces])
        return reply.complete(text, stats.finish_reason, usage(len(prompt_ids), stats.tokens))

    async def events() -> AsyncIterator[str]:
        try:
            if reply.chat:  # OpenAI's first chat chunk names the role
                yield sse(reply.chunk([reply.choice("", None, first=True)]))
            async for piece in pieces:
                yield sse(reply.chunk([reply.choice(piece, None)]))
            if stats.finish_reason is None:  # the client left: nobody to tell
                return
            yield sse(reply.chunk([reply.choice(None, stats.finish_reason)]))
            if body.include_usage:
                yield sse(reply.chunk([], usage(len(prompt_ids), stats.tokens)))
            yield sse("[DONE]")
        except Exception as err:  # the headers are sent: an error event is all a client can still get
            if not isinstance(err, ApiError):
                record.error = describe_exception(err)
                err = ApiError(500, f"generation failed: {err}", type="server_error")
            else:
                record.error = err.message
            yield sse(err.body())
        finally:
            await pieces.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def run_server(app: FastAPI, host: str, port: int) -> None:
    """Serve `app` with uvicorn until Ctrl-C (or SIGTERM), logging each request on stderr. The first signal stops
    taking connections and gives open replies GRACE_S to end; a second ends them now; a third exits at once."""
    import uvicorn

    server: ModelServer = app.state.server

    class Server(uvicorn.Server):
        # uvicorn's own handler re-raised the signals once stopped, and a second Ctrl-C cancelled open replies
        # inside asyncio.run: tracebacks. Here replies end by themselves (ModelServer.stop) and nothing re-raises.
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                print(
                    f"serve: stopping: open replies may go on {GRACE_S:g} s (Ctrl-C again ends them now)",
                    file=sys.stderr,
                    flush=True,
                )
                server.stop(GRACE_S)
                self.should_exit = True
            elif not server.stopped():
                server.stop(0)
            else:
                self.force_exit = True

    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(GRACE_S) + 2
    )
    try:
        Server(config).run()
    finally:  # uvicorn skips the app's shutdown when forced to exit: the worker ends here all the same
        server.close()
