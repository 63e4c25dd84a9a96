"""A request's body -> a :class:`Job`: every choice to generate, checked and priced before any runs.

The one idea: everything a request will cost is known before the model runs: its
choices (each prompt times ``n``), the tokens each reads and may write, its stop
strings. :class:`~minigpt.serving.protocol.Limits` caps each of them, so one request
cannot hold the server's single generation slot for hours; what is over a limit is a
400 naming it. Building a job (tokenizing, rendering a chat template) runs in a worker
thread, never on the server's event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from minigpt.serving.engine import Engine, Sampling, request_generator
from minigpt.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Limits,
    check_prompts,
    check_request,
    parse_request,
)
from minigpt.serving.responses import ChatChoice, CompletionChoice


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
    """A checked request: the choices to generate and how to answer; setting ``cancel``
    (its client left) stops its generation before the next token."""

    chat: bool
    model: str
    runs: list[Run]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    cancel: threading.Event = field(default_factory=threading.Event)


def _check_model(engine: Engine, model: str | None) -> None:
    """The model asked for is the one loaded (by its id or an alias), as OpenAI and vLLM answer: 404."""
    if model is not None and model not in (engine.name, *engine.aliases):
        raise APIError(f"The model '{model}' does not exist on this server; it serves '{engine.name}' "
                       "(GET /v1/models lists it).", status=404, param="model", code="model_not_found")


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


def _count_prompts(prompt: str | list) -> int:
    """How many prompts the ``prompt`` field holds, before any is tokenized."""
    return 1 if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt) else len(prompt)


def _sampling(req: CompletionRequest | ChatRequest, max_tokens: int, stop: list[str], top: int) -> Sampling:
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_k=req.top_k, top_p=req.top_p,
                    stop=tuple(stop), top_logprobs=top)


def _seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else seed + i  # the i-th of n choices: its own, reproducible, stream


def completion_job(engine: Engine, limits: Limits, data: dict[str, Any]) -> Job:
    """``POST /v1/completions``' body -> the job (400 for anything wrong)."""
    req = parse_request(CompletionRequest, data)
    _check_model(engine, req.model)
    n = req.n or 1
    stops = req.stops()
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    check_request(limits, prompts=_count_prompts(req.prompt), n=n, max_tokens=max_tokens, stops=stops)
    prompts = _prompts(req.prompt, engine)
    check_prompts(limits, prompt_tokens=[len(ids) for ids in prompts], n=n, max_tokens=max_tokens,
                  context_length=engine.context_length)
    sampling = _sampling(req, max_tokens, stops, req.logprobs or 0)
    device = engine.model.device
    runs = [Run(CompletionChoice(engine, p * n + i, req.logprobs), ids, sampling,
                request_generator(_seed(req.seed, i), device), bool(req.echo))
            for p, ids in enumerate(prompts) for i in range(n)]
    return Job(False, engine.name, runs, sum(len(ids) for ids in prompts), bool(req.stream), req.include_usage())


def chat_job(engine: Engine, limits: Limits, data: dict[str, Any]) -> Job:
    """``POST /v1/chat/completions``' body -> the job: the messages rendered in the
    engine's chat format (a template that refuses them, or runs over its budget, is a
    400 with its reason); with no token budget given, the answer may fill the context
    up to ``limits.default_chat_max_tokens``."""
    req = parse_request(ChatRequest, data)
    _check_model(engine, req.model)
    if req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs needs logprobs: true.", param="top_logprobs")
    n = req.n or 1
    stops = req.stops()
    budget = req.token_budget()
    check_request(limits, prompts=1, n=n, max_tokens=budget or 0, stops=stops)
    try:
        ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
    except ValueError as err:  # the template's own message ("roles must alternate"), or a budget it ran over
        raise APIError(f"The chat template could not format these messages: {err}", param="messages") from err
    max_tokens = budget if budget is not None else max(
        1, min(limits.default_chat_max_tokens, limits.max_tokens, engine.context_length - len(ids)))
    check_prompts(limits, prompt_tokens=[len(ids)], n=n, max_tokens=max_tokens, context_length=engine.context_length,
                  param="messages")
    sampling = _sampling(req, max_tokens, stops + list(engine.chat_format.stop),
                         (req.top_logprobs or 0) if req.logprobs else 0)
    runs = [Run(ChatChoice(engine, i, bool(req.logprobs)), ids, sampling,
                request_generator(_seed(req.seed, i), engine.model.device)) for i in range(n)]
    return Job(True, engine.name, runs, len(ids), bool(req.stream), req.include_usage())
