"""The `serve` command's web app: an OpenAI-compatible API and a chat page, on FastAPI (the `talm[serve]` extra).

    GET  /                      the chat page (page/chat.html: one file, inline JavaScript, streams replies)
    GET  /v1/models             the one model served, named after its directory (models/NAME -> "NAME")
    POST /v1/chat/completions   a reply in talm's chat format; `stream: true` sends server-sent events
    POST /v1/completions        a plain continuation of a prompt (a base model's use)

Requests and responses are `talm.use.api`'s. A prompt plus `max_tokens` must fit the model's context (unset,
`max_tokens` is the rest of the context); a request that does not fit is refused (400,
`context_length_exceeded`) rather than cut, so a client never gets a reply to a conversation it did not send.

Concurrency: one copy of the model. Each reply is generated in a worker thread (a pool of `workers` threads;
more requests wait in its queue), never on the event loop, and the threads take turns on the model one token at
a time (a lock held per token), so concurrent replies all progress. Between two tokens a worker checks its
reply's cancel flag, which is set when its client disconnects (a stream whose client left, or a plain request
whose client is gone, checked every `POLL_S`): generation stops there. `ModelServer.tokens_generated` counts
every token generated, for the logs and the tests.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
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
from talm.use.chat import ReplyStats, stream_reply
from talm.use.config import SampleConfig
from talm.use.sample import encode_prompt

POLL_S = 0.1  # how often a waiting request checks that its client is still there
_DONE = object()  # what a worker puts on its queue after the last piece


class ModelServer:
    """One model shared by every request: replies generated in worker threads, one token at a time each."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, name: str, *, workers: int = 8) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.chat_format = ChatFormat(tokenizer)  # refuses a tokenizer without role tokens
        self.context = model.config.context_length
        self.lock = threading.Lock()  # the model: one token of one reply at a time
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="talm-generate")
        self.tokens_generated = 0

    def _generate(
        self,
        pieces: Generator[str, None, None],
        stats: ReplyStats,
        cancel: threading.Event,
        put: Any,
    ) -> None:
        """Worker: pull the reply's pieces (the lock held per piece), hand each to the event loop with `put`,
        until the reply ends or `cancel` is set."""
        try:
            while not cancel.is_set():
                with self.lock:
                    before = stats.tokens
                    piece = next(pieces, _DONE)
                    self.tokens_generated += stats.tokens - before
                put(piece)
                if piece is _DONE:
                    return
        except Exception as err:  # reported to the client, never left hanging
            put(err)
        finally:
            with self.lock:
                pieces.close()

    async def stream(
        self,
        prompt_ids: list[int],
        config: SampleConfig,
        stats: ReplyStats,
        request: Request,
        stop: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """The reply's pieces as they are generated; generation stops when the client disconnects or this
        iterator is closed early (a cancelled stream)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        pieces = stream_reply(
            self.model,
            self.tokenizer,
            prompt_ids,
            config,
            end_id=self.tokenizer.eot_id,
            stats=stats,
            stop=stop or (),
        )

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self.pool.submit(self._generate, pieces, stats, cancel, put)
        checked = loop.time()
        try:
            while True:
                if loop.time() - checked >= POLL_S:  # not at every token: it costs
                    if await request.is_disconnected():
                        return
                    checked = loop.time()
                try:
                    item = (
                        queue.get_nowait()
                        if not queue.empty()
                        else await asyncio.wait_for(queue.get(), POLL_S)
                    )
                except TimeoutError:
                    continue
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()

    def fit(self, prompt_ids: list[int], requested: int | None, prompt_param: str) -> int:
        """The reply's token budget: `requested` (or the rest of the context) if the prompt and it fit the
        context, else ApiError 400."""
        if requested is not None and requested > self.context:
            raise ApiError(
                400,
                f"max_tokens is {requested}, more than the model's context of {self.context} tokens: ask for fewer",
                param="max_tokens",
                code="context_length_exceeded",
            )
        budget = requested if requested is not None else self.context - len(prompt_ids)
        if len(prompt_ids) + max(budget, 1) > self.context:
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens and the reply may be {max(budget, 1)}: more than the "
                f"model's context of {self.context} tokens; shorten the {prompt_param} or lower max_tokens",
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


def create_app(model: GPT, tokenizer: Tokenizer, name: str, *, workers: int = 8) -> FastAPI:
    """The web app serving `model` under the model id `name`."""
    server = ModelServer(model, tokenizer, name, workers=workers)
    app = FastAPI(title="talm", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(
            ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code)
        )

    @app.exception_handler(Exception)
    async def _failed(request: Request, err: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"the server failed: {err}", type="server_error"))

    def check_model(requested: str) -> None:
        if requested != name:
            raise ApiError(
                404,
                f"the model {requested!r} does not exist: this server serves {name!r}",
                param="model",
                code="model_not_found",
            )

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "talm"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return chat_page()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_model(body.model)
        try:
            prompt_ids = server.chat_format.render_prompt([m.as_chat() for m in body.messages])
        except BadConversation as err:
            raise ApiError(400, str(err), param="messages") from None
        return await respond(body, request, prompt_ids, Reply(name, chat=True))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        assert isinstance(body.prompt, str)  # the validator made one string of it
        try:
            prompt_ids = encode_prompt(tokenizer, body.prompt)
        except TalmError as err:
            raise ApiError(400, str(err), param="prompt") from None
        return await respond(body, request, prompt_ids, Reply(name, chat=False))

    async def respond(
        body: ChatRequest | CompletionRequest, request: Request, prompt_ids: list[int], reply: Reply
    ) -> Any:
        prompt_param = "messages" if reply.chat else "prompt"
        config = body.sample_config(server.fit(prompt_ids, body.token_limit, prompt_param))
        stats = ReplyStats()
        pieces = server.stream(prompt_ids, config, stats, request, stop=body.stop)
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
                yield sse(ApiError(500, f"generation failed: {err}", type="server_error").body())
            finally:
                await pieces.aclose()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app
