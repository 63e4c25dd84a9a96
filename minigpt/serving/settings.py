"""``minigpt serve``'s and ``minigpt chat``'s settings, and the model they load, decided once at start.

The one idea: everything the server needs is chosen before it listens: the model (a name, a run
or Hugging Face directory, or a preset's random weights for a demo), optionally quantized and with a
LoRA adapter, its tokenizer and its prompt format, and the limits on what one request may cost.
Nothing here needs the ``serve`` extra, so ``--help`` and the terminal chat work without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigpt.finetuning.prompt_format import PROMPT_FORMATS, PromptFormat, prompt_format, recorded_format
from minigpt.models.gpt2.config import PRESETS
from minigpt.models.loader import RANDOM, chat_template_of, load, load_tokenizer
from minigpt.quantization.schemes import SCHEMES
from minigpt.runtime.runtime import select_device
from minigpt.serving.engine import Engine

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # this machine's own names: reachable from nowhere else


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
        "help": "how chat messages become the prompt: alpaca (the book's instruction format), chat (the model's "
                "own chat template), plain (User:/Assistant:); auto: the format the run was trained in, else the "
                "model's chat template, else plain",
        "choices": ("auto", *PROMPT_FORMATS)})
    name: str | None = field(default=None, metadata={
        "help": "the model id the API reports", "none": "the model's name or directory"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on (0.0.0.0 opens the server to the network, and needs --api-key)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1/ requests", "none": "no key"})
    insecure_no_api_key: bool = field(default=False, metadata={
        "help": "listen on an address other than this machine's without --api-key"})
    allowed_hosts: str | None = field(default=None, metadata={
        "help": "comma-separated names the Host header may give (*: any)",
        "none": "this machine's names, and --host"})
    cors_origin: str | None = field(default=None, metadata={
        "help": "a web origin (https://app.example) whose pages may call the API", "none": "none"})
    max_tokens: int = field(default=1024, metadata={"help": "the most tokens one answer may ask for"})
    max_n: int = field(default=8, metadata={"help": "the most choices (n) one request may ask for"})
    max_choices: int = field(default=64, metadata={"help": "the most choices (prompts times n) of one request"})
    max_request_tokens: int = field(default=65536, metadata={
        "help": "the most tokens one request may read and write: choices times (prompt + max_tokens)"})
    max_stop_chars: int = field(default=1000, metadata={"help": "the longest stop string, in characters"})
    max_body_bytes: int = field(default=4 * 2**20, metadata={"help": "the largest request body, in bytes"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, mps", "none": "the best available"})
    seed: int = field(default=123, metadata={"help": "random weights of a preset (minigpt chat: also its sampling)"})

    def __post_init__(self) -> None:
        if self.chat_format not in ("auto", *PROMPT_FORMATS):
            raise ValueError(f"chat_format must be auto or one of {', '.join(PROMPT_FORMATS)}, "
                             f"got {self.chat_format!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.quantize is not None and self.quantize not in SCHEMES:
            raise ValueError(f"quantize must be one of {', '.join(SCHEMES)}, got {self.quantize!r}")
        if self.host not in LOOPBACK_HOSTS and not self.api_key and not self.insecure_no_api_key:
            raise ValueError(f"host {self.host} opens the server to other machines: give an api_key that requests "
                             "must carry (or insecure_no_api_key to serve anyone who can reach it)")

    def limits(self) -> Any:
        """The request limits (:class:`minigpt.serving.protocol.Limits`)."""
        from minigpt.serving.protocol import Limits  # pydantic, of the serve extra

        return Limits(max_tokens=self.max_tokens, max_n=self.max_n, max_choices=self.max_choices,
                      max_request_tokens=self.max_request_tokens, max_stop_chars=self.max_stop_chars,
                      max_body_bytes=self.max_body_bytes)

    def hosts(self) -> list[str]:
        """The names a request's ``Host`` may give: as set, else this machine's and the bound
        address (any, bound to every address: the key then guards it)."""
        if self.allowed_hosts is not None:
            return [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]
        return ["*"] if self.host in ("0.0.0.0", "::") else [*LOOPBACK_HOSTS, self.host]


def _tokenizer_and_format(s: ServeConfig) -> tuple[Any, PromptFormat]:
    """The model's own tokenizer, and the prompt format ``chat_format`` names (``auto``: the one
    the run records, else the model's own chat template, else a plain transcript)."""
    spec = s.model or RANDOM + s.preset
    tokenizer = load_tokenizer(spec)
    template = chat_template_of(spec)
    name = s.chat_format
    if name == "auto":
        recorded = recorded_format(s.model) if s.model and Path(s.model).is_dir() else None
        name = recorded or ("chat" if template is not None else "plain")
    return tokenizer, prompt_format(name, template, getattr(tokenizer, "special_token_names", {}), source=spec)


def load_engine(settings: ServeConfig) -> Engine:
    """The model the settings name, on the best device, with its tokenizer and chat format."""
    s = settings
    torch.manual_seed(s.seed)  # the random weights of a preset
    model = load(s.model or RANDOM + s.preset, quantize=s.quantize, adapter=s.adapter, device=select_device(s.device))
    model.eval()
    tokenizer, chat_format = _tokenizer_and_format(s)
    name = s.name or (Path(s.model).name if s.model else f"{s.preset}-random")
    aliases = [a for a in (s.model, s.model and Path(s.model).name) if a and a != name]  # how --model named it
    engine = Engine(model, tokenizer, name=name, chat_format=chat_format, aliases=aliases)
    logger.info("model %s: %s parameters, context %d, chat format %s", name, f"{model.num_parameters():,}",
                engine.context_length, engine.chat_format.name)
    return engine
