"""The job behind ``minigpt eval``: a model's loss and perplexity on a corpus.

The one idea: the validation loss is the mean surprise of the model over every next
token of text it never trained on. For a run directory that is the split ``pretrain``
held out (the end of its corpus, the same share), cut into the same touching windows, so
that the number here equals the final validation loss ``pretrain`` printed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader

from minigpt.checkpoint import SETTINGS_FILE
from minigpt.corpora import split_text
from minigpt.data import GPTDataset
from minigpt.jobs.pretrain import PretrainConfig, _token_ids, windows
from minigpt.losses import calc_loss_loader, perplexity
from minigpt.model import GPTModel
from minigpt.runtime import select_device
from minigpt.tokenizer import get_gpt2_tokenizer

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

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_batches", "context_length"):
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
    is_run = (Path(settings.checkpoint) / SETTINGS_FILE).is_file()
    if settings.corpus is None and not is_run:
        raise ValueError(f"corpus is needed: {settings.checkpoint} is not a run directory naming its corpus")
    run = PretrainConfig.load(settings.checkpoint) if is_run else PretrainConfig()
    corpus = settings.corpus or run.corpus
    device = select_device(settings.device)
    model = GPTModel.from_pretrained(settings.checkpoint).to(device).eval()
    ids = _token_ids(corpus, get_gpt2_tokenizer())
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
