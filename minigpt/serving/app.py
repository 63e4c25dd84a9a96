"""The HTTP API: OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
the tokenizer (``/tokenize``, ``/detokenize``, ``/tokenizer_info``, as vLLM serves them),
and the page at ``/``.

The one idea: a request becomes a :class:`~minigpt.serving.job.Job` (its choices, each
with its prompt ids, its sampling settings and its own random generator) in a worker
thread, before anything runs; then the job runs while it holds the server's turn, so
requests are served one at a time and never share the model's key-value cache. The
turn is held for the generation only: a streamed job's events go into a queue that the
client reads at its own pace (``data: {...}`` then ``data: [DONE]``), so a client that
never reads cannot keep others waiting. A client that leaves, streamed or not, sets
its job's ``cancel``: the generation stops before its next token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from minigpt.serving.engine import Engine
from minigpt.serving.guard import Guard
from minigpt.serving.job import Job, Run, chat_job, completion_job
from minigpt.serving.protocol import APIError, DetokenizeRequest, Limits, TokenizeRequest, parse_json, parse_request
from minigpt.serving.responses import envelope, usage
from minigpt.serving.settings import LOOPBACK_HOSTS

STATIC = Path(__file__).parent / "static"


def create_app(engine: Engine, *, api_key: str | None = None, limits: Limits | None = None,
               allowed_hosts: Collection[str] = LOOPBACK_HOSTS, cors_origin: str | None = None) -> FastAPI:
    """The server's routes around one ``engine``. With ``api_key``, every request but the
    page's needs ``Authorization: Bearer <api_key>``; requests must name one of
    ``allowed_hosts`` in their ``Host`` header (``"*"``: any); with ``cors_origin``, pages
    of that origin may call the API from a browser (no CORS header is sent otherwise)."""
    limits = limits or Limits()
    app = FastAPI(title="minigpt", docs_url=None, redoc_url=None, openapi_url=None)
    turn = asyncio.Lock()  # one job at a time; waiting jobs wait here, not in a thread
    _add_errors(app)
    _add_tokenizer(app, engine, limits)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       public=lambda path: path == "/" or path.startswith("/static/"))  # the page asks for the key
    if cors_origin:  # outside the guard: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
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
        return await _respond(await _job(completion_job, engine, limits, request), engine, turn, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _respond(await _job(chat_job, engine, limits, request), engine, turn, request)

    return app


async def _job(build: Callable[[Engine, Limits, dict[str, Any]], Job], engine: Engine, limits: Limits,
               request: Request) -> Job:
    """The request's job, parsed and built in a worker thread: a large body, a long prompt
    or a slow chat template never holds up the event loop (and so every other request)."""
    body = await request.body()
    return await run_in_threadpool(lambda: build(engine, limits, parse_json(body)))


def _add_errors(app: FastAPI) -> None:
    """Every error as OpenAI's error object."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(str(err.detail), status=err.status_code).body(), status_code=err.status_code)


def _add_tokenizer(app: FastAPI, engine: Engine, limits: Limits) -> None:
    """The tokenizer, as vLLM serves it: lm-evaluation-harness then counts tokens with the model's own."""

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"eos_token": engine.token_text(engine.eos_id), "bos_token": None, "pad_token": None,
                "model_max_length": engine.context_length, "chat_template": None}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await request.body()
        tokens = await run_in_threadpool(lambda: engine.encode(parse_request(TokenizeRequest, parse_json(body)).prompt))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_request(DetokenizeRequest, parse_json(await request.body()))
        vocab = engine.model.cfg.vocab_size
        if any(not 0 <= i < vocab for i in req.tokens):
            raise APIError(f"A token id is outside this model's vocabulary [0, {vocab}).", param="tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}


def _pieces(run: Run, engine: Engine, job: Job) -> Iterator[dict[str, Any]]:
    """One choice's stream chunks (its choice objects), generated as they are read."""
    if run.echo:
        yield run.choice.echo(run.ids)
    elif job.chat:
        yield run.choice.first()
    events = engine.generate(run.ids, run.sampling, run.generator, job.cancel)
    try:
        for event in events:
            yield run.choice.piece(event)
    finally:
        events.close()


def _generate(job: Job, engine: Engine, emit: Callable[[dict[str, Any]], None]) -> None:
    """Every choice of the job, in this (worker) thread, each chunk handed to ``emit``."""
    for run in job.runs:
        if job.cancel.is_set():  # the client left: the choices not yet begun never start
            return
        for piece in _pieces(run, engine, job):
            emit(piece)


def _whole(job: Job) -> dict[str, Any]:
    kind, prefix = ("chat.completion", "chatcmpl") if job.chat else ("text_completion", "cmpl")
    completion_tokens = sum(run.choice.tokens for run in job.runs)
    return {**envelope(kind, job.model, prefix), "choices": [run.choice.result() for run in job.runs],
            "usage": usage(job.prompt_tokens, completion_tokens)}


async def _respond(job: Job, engine: Engine, turn: asyncio.Lock, request: Request) -> Any:
    if job.stream:
        return _ClosingStream(_events(job, engine, turn), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache"})
    watcher = asyncio.ensure_future(_cancel_when_gone(request, job))
    try:
        async with turn:
            await run_in_threadpool(_generate, job, engine, lambda piece: None)
    finally:
        watcher.cancel()
    return JSONResponse(_whole(job))


async def _cancel_when_gone(request: Request, job: Job) -> None:
    """Set the job's ``cancel`` when its client disconnects. The body is read, so the
    server's next message for this request is ``http.disconnect``, sent when the client leaves."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()


class _ClosingStream(StreamingResponse):
    """A stream whose events are closed however the response ends. When the client
    disconnects, the response is cancelled while it writes or waits, with the events
    suspended at a ``yield`` or an ``await``; closing them runs their ``finally`` now
    (cancelling the generation) instead of whenever the garbage collector gets there."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _events(job: Job, engine: Engine, turn: asyncio.Lock) -> AsyncIterator[str]:
    """Server-sent events: a chunk per token of each choice, usage if asked, ``[DONE]``.
    A failure mid-way is sent as an ``error`` event (the 200 is already sent)."""
    kind, prefix = ("chat.completion.chunk", "chatcmpl") if job.chat else ("text_completion", "cmpl")
    head = envelope(kind, job.model, prefix)
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def emit(piece: dict[str, Any]) -> None:  # called in the worker thread
        loop.call_soon_threadsafe(queue.put_nowait, _sse({**head, "choices": [piece]}))

    async def produce() -> None:
        try:
            async with turn:  # held while generating, not while the client reads
                await run_in_threadpool(_generate, job, engine, emit)
            if job.include_usage:
                completion_tokens = sum(run.choice.tokens for run in job.runs)
                queue.put_nowait(_sse({**head, "choices": [], "usage": usage(job.prompt_tokens, completion_tokens)}))
            queue.put_nowait(None)
        except Exception as err:  # noqa: BLE001 - the client learns of it in the stream
            queue.put_nowait(err)

    producer = asyncio.ensure_future(produce())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                yield _sse(APIError(f"The generation failed: {item}", status=500, kind="server_error").body())
                break
            yield item
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a client that left stops the generation at its next token
        producer.cancel()  # and a job still waiting for its turn never takes it


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
