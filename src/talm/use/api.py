"""The OpenAI-compatible API's requests, responses and errors (the `serve` command's; `talm.use.serve` runs it).

Requests are pydantic models checked as OpenAI's API checks them, so a client learns at once that a request is
wrong or that a setting would have no effect:

- types are strict: no "10" for 10, no true for 1, no "yes" for true; numbers are finite and in OpenAI's ranges
  (temperature 0 to 2, top_p above 0 up to 1, seed a signed 64-bit integer, max_tokens at least 1, ...);
- null is "not given" for every field, as in OpenAI's API;
- OpenAI's fields that talm does not act on are accepted at a value that changes nothing (`logprobs: false`,
  `response_format: {"type": "text"}`, `tools: []`, ... : `NO_OP_VALUES`) and refused, naming the field, at any
  other; an unknown field is refused; so are `n` above 1, penalties and echo;
- `max_tokens` and `max_completion_tokens` (chat's newer name for it) are not both given, as OpenAI refuses.

`stop` takes up to four strings, as OpenAI's does: the reply ends before the first one it would contain. An error
is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for what the client can
fix. Responses and stream chunks are built as plain dicts in OpenAI's shape (the `openai` package parses them).

Beyond OpenAI: `top_k` (sample among the k likeliest tokens), and the role "developer" (OpenAI's newer name for
"system") read as "system". Messages' content may be a string or a list of text parts.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from talm.config import SEED_LIMIT
from talm.use.config import SampleConfig

INT64 = 2**63  # OpenAI's seed is a signed 64-bit integer: -INT64 to INT64 - 1

# OpenAI request fields talm does not act on, with the values at which they change nothing (compared as JSON, so
# 0 is not false). Sent with another value, such a field is refused by name: its effect would be missing.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,),
    "top_logprobs": (0,),
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),  # without tools, "auto" calls none
    "function_call": ("none", "auto"),
    "parallel_tool_calls": (True, False),  # without tools, either
    "modalities": (["text"],),
    "store": (False,),
    "service_tier": ("auto", "default"),
    # in a message: what a client copies back from an earlier reply
    "tool_calls": ([],),
    "annotations": ([],),
}
# OpenAI fields that only label a request (for OpenAI's logs, caches and abuse checks): any value, ignored.
LABELS = ("user", "metadata", "prompt_cache_key", "safety_identifier")


class ApiError(Exception):
    """An error answered in OpenAI's shape with HTTP `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_UNION_TAGS = {
    "str",
    "int",
    "float",
    "bool",
    "none",
}  # pydantic names a union's member in an error's location


def error_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """An error location as OpenAI names a parameter: ("body", "messages", 0, "content") -> messages[0].content."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part != "body" and part not in _UNION_TAGS and not any(c in part for c in "[(-"):
            param += f".{part}" if param else part
    return param or None


def json_type(value: Any) -> str:
    """What a JSON value is, in JSON's words (for "got a string" in an error)."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return {dict: "an object", list: "an array", type(None): "null"}.get(type(value), type(value).__name__)


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """A 400 naming a bad field of a request pydantic (or FastAPI) refused: the most specific (a value that may be a
    string or a list of parts is reported as a list when it is one)."""
    first = (
        max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid request"}
    )
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    param = error_param(first.get("loc", ()))
    msg = str(first.get("msg")).removeprefix("Value error, ")
    kind = str(first.get("type", ""))
    if kind == "extra_forbidden" and param in NO_OP_VALUES:
        allowed = " or ".join(json.dumps(v) for v in NO_OP_VALUES[param])
        message = f"{param} is not supported by this server except as {allowed} (or null): leave it out"
        return ApiError(400, message, param=param, code="unsupported_parameter")
    if kind == "extra_forbidden":
        return ApiError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if param is None and kind in ("model_type", "model_attributes_type", "dict_type"):
        got = first.get("input")
        if isinstance(got, bytes):  # FastAPI hands over the raw body when it is not declared JSON
            return ApiError(400, "the request body must be JSON: send it with Content-Type: application/json")
        return ApiError(
            400, f"the request body must be a JSON object, got {json_type(got)}", code="invalid_type"
        )
    if kind.endswith("_type") or kind.endswith("_parsing"):  # strict types: no "10" for 10, no true for 1
        message = f"invalid type for {param}: {msg[0].lower() + msg[1:]}, got {json_type(first.get('input'))}"
        return ApiError(400, message, param=param, code="invalid_type")
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


class _Strict(BaseModel):
    """OpenAI's request objects: strict types, finite numbers, unknown fields refused, null read as not given."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            key: value
            for key, value in data.items()
            if value is not None
            and not (key in NO_OP_VALUES and _json(value) in map(_json, NO_OP_VALUES[key]))
        }


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None  # accepted (clients send it), not part of talm's format

    def as_chat(self) -> dict[str, str]:
        """{"role", "content"} as talm's chat format reads it."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with the token counts (and no choices), as OpenAI does."""
    include_obfuscation: bool = (
        True  # OpenAI pads its chunks against side channels; talm sends none either way
    )


MAX_STOPS = 4  # OpenAI's limit on `stop`


class _Sampling(_Strict):
    """Fields common to both endpoints."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send one request per reply")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, as OpenAI's API allows: got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence is empty: give non-empty strings, or leave stop out")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported (only 0)")
        return value

    def sample_config(self, max_new_tokens: int) -> SampleConfig:
        return SampleConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=torch_seed(self.seed),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def torch_seed(seed: int | None) -> int | None:
    """OpenAI's seed (a signed 64-bit integer) as talm's (0 to 2**63 - 1, which torch and numpy take): the same
    residue, so each seed still gives its own sequence and -1 is 2**63 - 1."""
    return None if seed is None else seed % SEED_LIMIT


class ChatRequest(_Sampling):
    """POST /v1/chat/completions. `max_completion_tokens` is OpenAI's newer name for `max_tokens` (which OpenAI
    deprecates); giving both is refused, as OpenAI does, rather than one silently winning."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_token_limit(cls, limit: int | None, info: ValidationInfo) -> int | None:
        if limit is not None and info.data.get("max_tokens") is not None:
            raise ValueError(
                "setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported (as in "
                "OpenAI's API): give max_completion_tokens only"
            )
        return limit

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """POST /v1/completions: a prompt (one string) continued as plain text."""

    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("give one prompt (a string); send one request per prompt")
            return prompt[0]
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# ------------------------------------------------------------------------------------------------------------
# Responses


class Reply:
    """The identity and shapes of one reply: a completion or its stream chunks, for either endpoint."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def _head(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def choice(self, text: str | None, finish_reason: str | None, *, first: bool = False) -> dict[str, Any]:
        """One choice of a chunk (text None: the last chunk, which only says why the reply ended)."""
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = choices
        if usage is not None:
            body["usage"] = usage
        return body

    def complete(self, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
