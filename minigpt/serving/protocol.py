"""The requests the server accepts, checked before any work, and errors in OpenAI's shape.

The one idea: a request is parsed into a typed object or refused with a 400 whose body
is OpenAI's ``{"error": {"message", "type", "param", "code"}}``, so every OpenAI client
shows the reason. Types are strict (``"0.5"`` is not a number, ``true`` is not a count),
ranges follow OpenAI's (temperature 0 to 2, top_p above 0 up to 1, at most 5
completion logprobs and 20 chat top_logprobs), and :class:`Limits` caps what one request
may cost this server before any of it runs: its body's bytes, its stop strings, its
choices (prompts times ``n``) and the tokens they read and write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minigpt.runtime.runtime import SEED_MAX, SEED_MIN

# What a union-typed field may be, in the user's words (pydantic lists each alternative's error).
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of at most 4 strings",
    "messages": "a list of {role, content} objects: role system, developer, user or assistant; content a string",
}


class APIError(Exception):
    """An error the client caused (or an auth failure), sent as OpenAI's error object."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server; a request over any limit is refused with a 400
    that names it. A request's tokens are ``choices * (prompt tokens + max_tokens)`` summed
    over its prompts, its choices ``prompts * n``. ``max_prompt_tokens`` None means the
    model's context length."""

    max_tokens: int = 1024
    max_prompt_tokens: int | None = None
    max_n: int = 8
    max_choices: int = 64
    max_request_tokens: int = 65536
    max_stop_chars: int = 1000
    max_body_bytes: int = 4 * 2**20
    default_chat_max_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_n", "max_choices", "max_request_tokens", "max_stop_chars", "max_body_bytes",
                     "default_chat_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1 (or unset: the context), got "
                             f"{self.max_prompt_tokens}")


class _Request(BaseModel):
    """The sampling fields both endpoints share (unknown fields such as ``user`` are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # an extension: OpenAI's API has no top_k
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream_options: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        """``stop`` as a list, never containing the empty string."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(f"stop must be {_EXPECTED['stop']}, none of them empty", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as text: a string, or the ``text`` of its ``{"type": "text"}`` parts."""
        if isinstance(self.content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
                raise APIError("this model reads text only: each content part must be {type: text, text: ...}",
                               param="messages")
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def token_budget(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or else ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's shape, which lm-evaluation-harness' remote tokenizer uses)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str
    add_special_tokens: bool | None = None


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    tokens: list[int]


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        data = json.loads(body)
    except RecursionError as err:  # Python's parser recurses once per level: 100,000 "[" exhaust it
        raise APIError("The JSON body nests too deeply; send a flatter object.") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(f"We could not parse the JSON body of your request ({err}). Send valid JSON with "
                       "Content-Type: application/json.") from err
    if not isinstance(data, dict):
        raise APIError(f"The request body must be a JSON object, got {type(data).__name__}.")
    return data


def parse_request(kind: type[BaseModel], data: dict[str, Any]) -> Any:
    """``data`` checked against ``kind``; the first problem becomes a 400 naming the field."""
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"][:1]) or None
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        elif param in _EXPECTED:
            message = f"Invalid value for '{param}': expected {_EXPECTED[param]}."
        else:
            message = f"Invalid value for '{param}': {first['msg'][0].lower()}{first['msg'][1:]}."
        raise APIError(message, param=param, code="invalid_value") from err


def _limit(what: str, value: int, limit: int, param: str | None) -> None:
    if value > limit:
        raise APIError(f"{what} is {value:,}, more than this server's limit of {limit:,}. Ask for less, or start the "
                       "server with a higher limit (minigpt serve --help lists them).", param=param,
                       code="limit_exceeded")


def check_request(limits: Limits, *, prompts: int, n: int, max_tokens: int, stops: list[str]) -> None:
    """What a request asks for, checked before any prompt is read: ``max_tokens``, ``n``,
    the number of choices (``prompts * n``) and the stop strings' lengths."""
    _limit("max_tokens", max_tokens, limits.max_tokens, "max_tokens")
    _limit("n", n, limits.max_n, "n")
    _limit("The number of choices (prompts times n)", prompts * n, limits.max_choices, "prompt")
    _limit("The longest stop string's length", max((len(s) for s in stops), default=0), limits.max_stop_chars,
           "stop")


def check_prompts(limits: Limits, *, prompt_tokens: list[int], n: int, max_tokens: int, context_length: int,
                  param: str = "prompt") -> None:
    """Each prompt (``param``) fits the context, and all the request's choices together
    read and write at most ``limits.max_request_tokens`` tokens."""
    longest = min(context_length, limits.max_prompt_tokens or context_length)
    for length in prompt_tokens:
        if length > longest:
            raise APIError(f"The prompt has {length} tokens, more than the {longest} this model reads "
                           "(its context length). Shorten the prompt.", param=param,
                           code="context_length_exceeded")
        if length == 0:
            raise APIError("The prompt is empty: give at least one token.", param=param, code="invalid_value")
    _limit("The request's tokens (choices times prompt and max_tokens)",
           sum(n * (length + max_tokens) for length in prompt_tokens), limits.max_request_tokens, param)
