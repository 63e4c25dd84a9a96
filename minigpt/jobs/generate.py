"""The job behind ``minigpt generate``: continue a prompt, piece by piece.

The one idea: generation is one next-token choice after another
(:mod:`minigpt.generation.generate`); this job only chooses the model, checks the sampling
settings before spending time on loading it, shortens a prompt longer than the model's
context, and turns the token stream into text that never shows a character cut in half.
It needs no training code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from minigpt.data.windows import tokenize
from minigpt.generation.decoding import compile_for_decoding
from minigpt.generation.generate import stream_generate
from minigpt.generation.sampling import check_sampling
from minigpt.generation.text import IncrementalDecoder, truncate_prompt
from minigpt.jobs.quantize import check_quantize, quantize_field
from minigpt.models.base import CausalLM
from minigpt.models.gpt2.config import PRESETS
from minigpt.models.loader import RANDOM, load, load_tokenizer
from minigpt.runtime.runtime import select_device

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """Settings of :func:`generate_text`. The model is ``model`` or ``checkpoint`` if given,
    else random weights of ``preset`` (a demo of what an untrained model writes)."""

    model: str | None = field(default=None, metadata={
        "help": "a model name (gpt2-small, ..., smollm2-135m, ...) or a weights/run directory",
        "none": "random weights of preset"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "a run directory written by 'minigpt pretrain'", "none": "random weights of preset"})
    preset: str = field(default="tiny", metadata={"help": "random weights of this preset (a demo)",
                                                  "choices": tuple(PRESETS)})
    prompt: str = field(default="Every effort moves you", metadata={"help": "the text to continue"})
    max_new_tokens: int = field(default=50, metadata={"help": "tokens to add"})
    # Sampling by default, as other LLM command lines do: greedy decoding of a small model
    # mostly repeats its likeliest token ("\n" after a short pretraining) and shows no text.
    temperature: float = field(default=0.8, metadata={
        "help": "0: greedy (always the likeliest token, which a small model often repeats); above 0: sample, "
                "more varied the higher"})
    top_k: int | None = field(default=40, metadata={
        "help": "sample only among the k likeliest tokens", "none": "no limit"})
    top_p: float | None = field(default=None, metadata={
        "help": "sample only among the likeliest tokens that together reach this probability", "none": "no limit"})
    seed: int = field(default=123, metadata={"help": "random weights and sampling"})
    cache: bool = field(default=True, metadata={
        "help": "keep keys and values between steps (--no-cache recomputes the whole context each step)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, mps", "none": "the best available"})
    quantize: str | None = quantize_field()
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model (falls back to eager with a one-line warning where compiling fails)"})

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        check_quantize(self.quantize)
        if not self.prompt:
            raise ValueError("the prompt is empty: give some text to continue")
        if self.model and self.checkpoint:
            raise ValueError("give the model or the checkpoint, not both")


@dataclass
class Generation:
    """What :func:`generate_text` starts: the prompt as the model reads it (its first
    ``dropped`` tokens cut when it is longer than the context) and the continuation."""

    prompt: str
    dropped: int
    pieces: Iterator[str]  # text as soon as it is whole, token by token


def generate_text(settings: GenerateConfig) -> Generation:
    """Load the model, shorten the prompt to its context, and start generating."""
    device = select_device(settings.device)
    torch.manual_seed(settings.seed)  # random weights of a preset, and the sampling
    spec = settings.model or settings.checkpoint or RANDOM + settings.preset
    model = load(spec, quantize=settings.quantize)
    model.to(device).eval()
    if settings.compile:
        model = compile_for_decoding(model)  # the prompt and the one-token step: two graphs, not one per token
    tokenizer = load_tokenizer(spec)  # the model's own
    context = model.cfg.context_length
    ids, dropped = truncate_prompt(tokenize(settings.prompt, tokenizer), context)
    if dropped:
        logger.warning("the prompt has %d tokens, more than the model's context of %d: its first %d tokens "
                       "were dropped", len(ids) + dropped, context, dropped)
    idx = torch.tensor([ids], device=device)
    return Generation(tokenizer.decode(ids), dropped, _pieces(model, idx, settings, tokenizer))


def _pieces(model: CausalLM, idx: torch.Tensor, s: GenerateConfig, tokenizer) -> Iterator[str]:
    decoder = IncrementalDecoder(tokenizer)  # holds back the bytes of a split character
    for token in stream_generate(model, idx, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                 top_p=s.top_p, use_cache=s.cache, eos_id=tokenizer.eot_token):
        piece = decoder.add(token[0])
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest
