"""The job behind ``minigpt eval``: a model's loss and perplexity on a corpus.

The one idea: the validation loss is the mean surprise of the model over every next
token of text it never trained on. For a run directory that is the split ``pretrain``
held out (the end of its corpus, the same share), cut into the same touching windows, so
that the number here equals the final validation loss ``pretrain`` printed
(:func:`evaluate`). :func:`evaluate_perplexity` measures a whole text instead, with
windows that overlap, so that every token is predicted with a long left context
(:func:`minigpt.evaluation.perplexity.sliding_window_perplexity`): the number to compare a model
before and after fine-tuning on a general text (WikiText-2's test split, say).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from minigpt.data.corpora import split_text
from minigpt.data.windows import GPTDataset
from minigpt.evaluation.perplexity import PerplexityResult, sliding_window_perplexity
from minigpt.io import sources
from minigpt.io.download import fetch
from minigpt.jobs.pretrain import PretrainConfig, _token_ids, windows
from minigpt.jobs.quantize import check_quantize, quantize_field
from minigpt.models.loader import check_spec, load, load_tokenizer
from minigpt.runtime.runtime import select_device
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer
from minigpt.training.checkpoint import SETTINGS_FILE
from minigpt.training.losses import calc_loss_loader, perplexity

WIKITEXT2 = "wikitext2"  # the name of WikiText-2's test split (a pinned file) wherever a text is named

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Settings of :func:`evaluate`."""

    checkpoint: str = field(metadata={"help": "a run directory, a weights directory or a GPT-2 name"})
    corpus: str | None = field(default=None, metadata={
        "help": "corpus name or text file", "none": "the run's corpus"})
    whole: bool = field(default=False, metadata={"help": "the whole corpus, not only its validation split"})
    context_length: int | None = field(default=None, metadata={
        "help": "tokens per window", "none": "the model's"})
    batch_size: int = field(default=8, metadata={"help": "windows per batch"})
    max_batches: int | None = field(default=None, metadata={
        "help": "evaluate only the first batches (an estimate)", "none": "all"})
    device: str | None = field(default=None, metadata={
        "help": "cpu, cuda, mps", "none": "the best available"})
    perplexity: str | None = field(default=None, metadata={
        "help": f"instead: the sliding-window perplexity of a whole text: a corpus name, a text file or {WIKITEXT2} "
                "(WikiText-2's test split)", "none": "the loss on the corpus"})
    stride: int | None = field(default=None, metadata={
        "help": "with --perplexity: tokens between window starts (smaller: more context, slower)",
        "none": "half the context"})
    max_tokens: int | None = field(default=None, metadata={
        "help": "with --perplexity: only the first N tokens of the text", "none": "all"})
    quantize: str | None = quantize_field()

    def __post_init__(self) -> None:
        check_quantize(self.quantize)
        for name in ("batch_size", "max_batches", "context_length", "stride", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass
class EvalResult:
    """The loss over ``windows`` windows of ``context_length`` tokens (``tokens`` predictions);
    ``whole_split`` tells whether they are all the windows of ``part`` or the first batches."""

    corpus: str
    part: str  # "validation split (last 10%)" or "whole corpus"
    loss: float
    perplexity: float
    windows: int
    tokens: int
    context_length: int
    whole_split: bool


def evaluate(settings: EvalConfig) -> EvalResult:
    """Load ``settings.checkpoint`` and measure its loss on the corpus (see the module docstring)."""
    check_spec(settings.checkpoint)  # a run that does not exist is "not found"
    is_run = (Path(settings.checkpoint) / SETTINGS_FILE).is_file()
    if settings.corpus is None and not is_run:
        raise ValueError(f"corpus is needed: {settings.checkpoint} is not a run directory naming its corpus")
    run = PretrainConfig.load(settings.checkpoint) if is_run else PretrainConfig()
    corpus = settings.corpus or run.corpus
    device = select_device(settings.device)
    model = load(settings.checkpoint, quantize=settings.quantize).to(device).eval()
    ids = _token_ids(corpus, load_tokenizer(settings.checkpoint))
    part = "whole corpus"
    if not settings.whole:
        _, ids = split_text(ids, 1 - run.val_ratio)  # the part pretrain held out
        part = f"validation split (last {run.val_ratio:.0%})"
    n = settings.context_length or model.cfg.context_length
    if windows(len(ids), n) == 0:
        raise ValueError(f"the {part} of {corpus} has {len(ids):,} tokens, fewer than one window of {n + 1}: "
                         "use a smaller context_length, or evaluate the whole corpus")
    loader = DataLoader(GPTDataset(ids, max_length=n, stride=n), batch_size=settings.batch_size)
    batches = len(loader) if settings.max_batches is None else min(settings.max_batches, len(loader))
    loss = calc_loss_loader(loader, model, device, batches)
    covered = min(len(loader.dataset), batches * settings.batch_size)
    logger.debug("evaluated %d of %d windows", covered, len(loader.dataset))
    return EvalResult(corpus, part, loss, perplexity(loss), covered, covered * n, n, batches == len(loader))


def text_token_ids(text: str, tokenizer: Any = None, max_tokens: int | None = None) -> torch.Tensor:
    """The token ids ``(tokens,)`` (GPT-2's unless ``tokenizer`` is given) of a corpus name, a text
    file or ``wikitext2`` (WikiText-2's test split, found or downloaded and checked), the first
    ``max_tokens`` only when given."""
    path = fetch(sources.WIKITEXT2_TEST) if text == WIKITEXT2 else text
    return _token_ids(str(path), tokenizer or get_gpt2_tokenizer())[:max_tokens]


def evaluate_perplexity(settings: EvalConfig, progress: bool = True) -> PerplexityResult:
    """Load ``settings.checkpoint`` and measure the sliding-window perplexity of the text
    ``settings.perplexity`` (context ``context_length``, default the model's; ``stride``)."""
    if settings.perplexity is None:
        raise ValueError("perplexity names no text: give a corpus name, a text file or wikitext2")
    device = select_device(settings.device)
    model = load(settings.checkpoint, quantize=settings.quantize).to(device).eval()
    ids = text_token_ids(settings.perplexity, load_tokenizer(settings.checkpoint), settings.max_tokens)
    return sliding_window_perplexity(model, ids, settings.context_length, settings.stride, settings.batch_size,
                                     progress=progress)
