"""``minigpt serve``: load one model and serve it over HTTP on this machine.

The one idea: everything the server needs is decided once, at start: the model (a GPT-2
or Llama-family name, a run or Hugging Face directory, or a preset's random weights for a
demo), optionally quantized and with a LoRA adapter, its tokenizer (GPT-2's, or the
directory's ``tokenizer.json``) and its chat format. The server
binds 127.0.0.1 unless told otherwise, so nothing outside this machine can reach it by
accident, and with ``api_key`` it answers only requests that carry the key.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigpt.chat_template import render_chat
from minigpt.config import PRESETS
from minigpt.hub import check_model_name
from minigpt.lora import load_lora
from minigpt.model import GPTModel
from minigpt.pretrained import chat_template_of, load_model, load_tokenizer
from minigpt.quantization import SCHEMES
from minigpt.quantized_linear import quantize_model
from minigpt.runtime import select_device
from minigpt.serving.engine import Engine
from minigpt.serving.formats import FORMATS, AlpacaFormat, ChatFormat, PlainFormat, TemplateFormat, chat_format_of
from minigpt.tokenizer import get_gpt2_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Settings of :func:`serve` and :func:`load_engine`."""

    model: str | None = field(default=None, metadata={
        "help": "a model name (gpt2-small, ..., or a Llama-family name), a run or a Hugging Face directory",
        "none": "random weights of preset"})
    preset: str = field(default="tiny", metadata={"help": "random weights of this preset (a demo)",
                                                  "choices": tuple(PRESETS)})
    adapter: str | None = field(default=None, metadata={
        "help": "a LoRA adapter file (safetensors) to load onto the model", "none": "none"})
    quantize: str | None = field(default=None, metadata={
        "help": "quantize the linear layers while loading", "none": "full precision", "choices": SCHEMES})
    chat_format: str = field(default="auto", metadata={
        "help": "how chat messages become the prompt: alpaca (instruction-tuned runs), plain (User:/Assistant:); "
                "auto: what the model states (its own chat template, or the run's settings)",
        "choices": ("auto", *FORMATS[:2])})
    name: str | None = field(default=None, metadata={
        "help": "the model id the API reports", "none": "the model's name or directory"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on (0.0.0.0 opens the server to the network)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1/ requests", "none": "no key"})
    max_tokens: int = field(default=1024, metadata={"help": "the most tokens one answer may ask for"})
    max_n: int = field(default=8, metadata={"help": "the most choices (n) one request may ask for"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, mps", "none": "the best available"})
    seed: int = field(default=123, metadata={"help": "random weights of a preset (minigpt chat: also its sampling)"})

    def __post_init__(self) -> None:
        if self.chat_format not in ("auto", *FORMATS[:2]):
            raise ValueError(f"chat_format must be auto, alpaca or plain, got {self.chat_format!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.quantize is not None and self.quantize not in SCHEMES:
            raise ValueError(f"quantize must be one of {', '.join(SCHEMES)}, got {self.quantize!r}")

    def limits(self) -> Any:
        """The request limits (:class:`minigpt.serving.protocol.Limits`)."""
        from minigpt.serving.protocol import Limits  # pydantic, of the serve extra

        return Limits(max_tokens=self.max_tokens, max_n=self.max_n)


def _load_model(s: ServeConfig) -> torch.nn.Module:
    if s.model is None:
        torch.manual_seed(s.seed)
        model = GPTModel(s.preset)
        return quantize_model(model, s.quantize) if s.quantize else model
    check_model_name(s.model)  # a typo gets the closest name, a missing directory "not found"
    return load_model(s.model, quantize=s.quantize)


def _tokenizer_and_format(s: ServeConfig) -> tuple[Any, ChatFormat]:
    """The model's own tokenizer, and its own chat template (the Llama family) or the format the
    run states (Alpaca for instruction-tuned runs, else plain)."""
    if s.model is None:
        return get_gpt2_tokenizer(), AlpacaFormat() if s.chat_format == "alpaca" else PlainFormat()
    tokenizer = load_tokenizer(s.model)
    template = chat_template_of(s.model)
    if template is not None and s.chat_format == "auto":
        return tokenizer, TemplateFormat(template, render_chat, tokenizer.special_token_names)
    name = s.chat_format
    if name == "auto":
        name = chat_format_of(s.model if Path(s.model).is_dir() else None)
    return tokenizer, AlpacaFormat() if name == "alpaca" else PlainFormat()


def load_engine(settings: ServeConfig) -> Engine:
    """The model the settings name, on the best device, with its tokenizer and chat format."""
    s = settings
    model = _load_model(s)
    tokenizer, chat_format = _tokenizer_and_format(s)
    if s.adapter:
        report = load_lora(model, s.adapter)
        logger.info("adapter %s: %s", s.adapter, report)
    model.to(select_device(s.device)).eval()
    name = s.name or (Path(s.model).name if s.model else f"{s.preset}-random")
    engine = Engine(model, tokenizer, name=name, chat_format=chat_format)
    logger.info("model %s: %s parameters, context %d, chat format %s", name, f"{model.num_parameters():,}",
                engine.context_length, engine.chat_format.name)
    return engine


def bind(settings: ServeConfig) -> socket.socket:
    """A socket bound to ``host:port``, so that a busy port fails here, before anything says
    "serving", with what to do; :func:`serve` then listens on it."""
    host = settings.host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free; one in use is not
    try:
        sock.bind((host, settings.port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host} port {settings.port}: {err.strerror}; choose another port, "
                         "or stop the program that uses it") from err
    return sock


def serve(settings: ServeConfig, engine: Engine | None = None, sock: socket.socket | None = None) -> None:
    """Serve ``engine`` (default: the one the settings name) on ``sock`` (default: :func:`bind`)
    until interrupted."""
    import uvicorn  # the serve extra

    from minigpt.serving.app import create_app

    engine = engine or load_engine(settings)
    sock = sock or bind(settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logger.warning("listening on %s without an API key: anyone who can reach this machine can use the model",
                       settings.host)
    app = create_app(engine, api_key=settings.api_key, limits=settings.limits())
    with sock:
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info")
        uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """``app`` served by uvicorn in a thread on a free port of 127.0.0.1, for tests,
    benchmarks and notebooks: ``with BackgroundServer(app) as server: server.base_url``."""

    def __init__(self, app: Any, *, timeout: float = 30.0) -> None:
        import uvicorn  # the serve extra

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves this very socket
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not start within {timeout:g} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
