"""The HTTP API: OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
the tokenizer (``/tokenize``, ``/detokenize``, ``/tokenizer_info``, as vLLM serves them),
and the page at ``/``.

The one idea: a request becomes a :class:`Job` (its choices, each with its prompt ids,
its sampling settings and its own random generator) before anything runs; then the job
runs while it holds the server's turn, so requests are served one at a time and never
share the model's key-value cache. A streamed job sends server-sent events
(``data: {...}`` then ``data: [DONE]``) token by token; if the client goes away, the
stream is closed and the generation stops with it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from minigpt.serving.engine import Engine, Sampling, request_generator
from minigpt.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Limits,
    TokenizeRequest,
    check_limits,
    parse_json,
    parse_request,
)
from minigpt.serving.responses import ChatChoice, CompletionChoice, envelope, usage

STATIC = Path(__file__).parent / "static"


@dataclass
class Run:
    """One choice to generate: its builder, prompt ids, settings and generator."""

    choice: CompletionChoice | ChatChoice
    ids: list[int]
    sampling: Sampling
    generator: torch.Generator
    echo: bool = False


@dataclass
class Job:
    """A checked request: the choices to generate and how to answer."""

    chat: bool
    model: str
    runs: list[Run]
    prompt_tokens: int
    stream: bool
    include_usage: bool


def create_app(engine: Engine, *, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The server's routes around one ``engine``; with ``api_key``, every request but the
    page's needs ``Authorization: Bearer <api_key>``."""
    limits = limits or Limits()
    app = FastAPI(title="minigpt", docs_url=None, redoc_url=None, openapi_url=None)
    turn = asyncio.Lock()  # one job at a time; waiting jobs wait here, not in a thread
    _add_errors_and_key(app, api_key)
    _add_tokenizer(app, engine)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "minigpt", "context_length": engine.context_length}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _respond(completion_job(engine, limits, parse_json(await request.body())), engine, turn)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _respond(chat_job(engine, limits, parse_json(await request.body())), engine, turn)

    return app


def _add_errors_and_key(app: FastAPI, api_key: str | None) -> None:
    """Every error as OpenAI's error object; without the key (when there is one), 401."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(str(err.detail), status=err.status_code).body(), status_code=err.status_code)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        public = request.url.path == "/" or request.url.path.startswith("/static/")  # the page asks for the key
        if api_key and not public and not _authorized(request, api_key):
            err = APIError("Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the "
                           "key the server was started with.", status=401, code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)


def _add_tokenizer(app: FastAPI, engine: Engine) -> None:
    """The tokenizer, as vLLM serves it: lm-evaluation-harness then counts tokens with the model's own."""

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"eos_token": engine.token_text(engine.eos_id), "bos_token": None, "pad_token": None,
                "model_max_length": engine.context_length, "chat_template": None}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse_request(TokenizeRequest, parse_json(await request.body()))
        tokens = engine.encode(req.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_request(DetokenizeRequest, parse_json(await request.body()))
        return {"prompt": engine.tokenizer.decode(_prompts(req.tokens, engine)[0]) if req.tokens else ""}


def _authorized(request: Request, api_key: str) -> bool:
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def _prompts(prompt: str | list, engine: Engine) -> list[list[int]]:
    """OpenAI's four prompt forms -> a list of token id lists (each id checked)."""
    if isinstance(prompt, str):
        prompts = [engine.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [engine.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts:
        raise APIError("The prompt list is empty: give at least one prompt.", param="prompt")
    vocab = engine.model.cfg.vocab_size
    if any(not 0 <= i < vocab for p in prompts for i in p):
        raise APIError(f"The prompt has a token id outside this model's vocabulary [0, {vocab}).", param="prompt")
    return prompts


def _sampling(req: CompletionRequest | ChatRequest, max_tokens: int, stop: list[str], top: int) -> Sampling:
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_k=req.top_k, top_p=req.top_p,
                    stop=tuple(stop), top_logprobs=top)


def _seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else seed + i  # the i-th of n choices: its own, reproducible, stream


def completion_job(engine: Engine, limits: Limits, data: dict[str, Any]) -> Job:
    """``POST /v1/completions``' body -> the job (400 for anything wrong)."""
    req = parse_request(CompletionRequest, data)
    prompts, n = _prompts(req.prompt, engine), req.n or 1
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    for ids in prompts:
        check_limits(limits, max_tokens=max_tokens, n=n, prompt_tokens=len(ids),
                     context_length=engine.context_length)
    sampling = _sampling(req, max_tokens, req.stops(), req.logprobs or 0)
    device = engine.model.device
    runs = [Run(CompletionChoice(engine, p * n + i, req.logprobs), ids, sampling,
                request_generator(_seed(req.seed, i), device), bool(req.echo))
            for p, ids in enumerate(prompts) for i in range(n)]
    return Job(False, engine.name, runs, sum(len(ids) for ids in prompts), bool(req.stream), req.include_usage())


def chat_job(engine: Engine, limits: Limits, data: dict[str, Any]) -> Job:
    """``POST /v1/chat/completions``' body -> the job: the messages rendered in the
    engine's chat format; with no token budget given, the answer may fill the context
    up to ``limits.default_chat_max_tokens``."""
    req = parse_request(ChatRequest, data)
    if req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs needs logprobs: true.", param="top_logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    ids, n = engine.encode(engine.chat_format.render(messages)), req.n or 1
    budget = req.token_budget()
    max_tokens = budget if budget is not None else max(
        1, min(limits.default_chat_max_tokens, limits.max_tokens, engine.context_length - len(ids)))
    check_limits(limits, max_tokens=max_tokens, n=n, prompt_tokens=len(ids), context_length=engine.context_length,
                 param="messages")
    sampling = _sampling(req, max_tokens, req.stops() + list(engine.chat_format.stop),
                         (req.top_logprobs or 0) if req.logprobs else 0)
    runs = [Run(ChatChoice(engine, i, bool(req.logprobs)), ids, sampling,
                request_generator(_seed(req.seed, i), engine.model.device)) for i in range(n)]
    return Job(True, engine.name, runs, len(ids), bool(req.stream), req.include_usage())


def _pieces(run: Run, engine: Engine) -> Iterator[dict[str, Any]]:
    """One choice's stream chunks (its choice objects), generated as they are read."""
    if run.echo:
        yield run.choice.echo(run.ids)
    elif isinstance(run.choice, ChatChoice):
        yield run.choice.first()
    events = engine.generate(run.ids, run.sampling, run.generator)
    try:
        for event in events:
            yield run.choice.piece(event)
    finally:
        events.close()


def _whole(job: Job, engine: Engine) -> dict[str, Any]:
    for run in job.runs:
        for _ in _pieces(run, engine):
            pass
    kind, prefix = ("chat.completion", "chatcmpl") if job.chat else ("text_completion", "cmpl")
    completion_tokens = sum(run.choice.tokens for run in job.runs)
    return {**envelope(kind, job.model, prefix), "choices": [run.choice.result() for run in job.runs],
            "usage": usage(job.prompt_tokens, completion_tokens)}


async def _respond(job: Job, engine: Engine, turn: asyncio.Lock) -> Any:
    if not job.stream:
        async with turn:
            return JSONResponse(await run_in_threadpool(_whole, job, engine))
    return _ClosingStream(_events(job, engine, turn), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache"})


class _ClosingStream(StreamingResponse):
    """A stream whose events are closed however the response ends. When the client
    disconnects, the response is cancelled while it writes, with the events suspended at
    a ``yield``; closing them runs their ``finally`` now (stopping the generation and
    giving back the server's turn) instead of whenever the garbage collector gets there."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _events(job: Job, engine: Engine, turn: asyncio.Lock) -> AsyncIterator[str]:
    """Server-sent events: a chunk per token of each choice, usage if asked, ``[DONE]``."""
    kind, prefix = ("chat.completion.chunk", "chatcmpl") if job.chat else ("text_completion", "cmpl")
    head = envelope(kind, job.model, prefix)
    done = object()
    async with turn:
        for run in job.runs:
            pieces = _pieces(run, engine)
            try:
                while (piece := await run_in_threadpool(next, pieces, done)) is not done:
                    yield _sse({**head, "choices": [piece]})
            finally:
                pieces.close()  # a client that left stops the generation here
        if job.include_usage:
            completion_tokens = sum(run.choice.tokens for run in job.runs)
            yield _sse({**head, "choices": [], "usage": usage(job.prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
