"""The job behind ``minigpt pretrain``: a fresh model learns a corpus, in a run directory.

The one idea: pretraining is the training loop fed with windows of one long text. The job
chooses the text, splits it (the end is held out for validation), builds the model and
the loaders, runs :func:`minigpt.training.loop.train_model`, and leaves behind a run directory
that ``minigpt generate``, ``minigpt eval`` and ``--resume`` read::

    config.json, model.safetensors, training_state.pt, history.json   the checkpoint
    settings.json                                                      these settings
    loss.png, lr.png, samples.txt                                      what to look at

The defaults are the main job: the ``tiny`` preset on Tiny Shakespeare, which ships with
the package, chosen so that on two CPU cores the samples turn from noise into
Shakespeare's words within about three minutes. :func:`word_pair_share` puts a number on
"words": the share of adjacent word pairs of a sample that also occur in the corpus.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from minigpt.data.corpora import load_corpus, load_token_ids, split_text
from minigpt.data.windows import GPTDataset
from minigpt.io.files import write_text
from minigpt.models.base import CausalLM, evaluating
from minigpt.models.gpt2.config import PRESETS, GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.runtime.runtime import autocast, resolve_precision, select_device
from minigpt.tokenizers.gpt2 import ENDOFTEXT, get_gpt2_tokenizer
from minigpt.training.checkpoint import STATE_FILE, load_settings, save_settings
from minigpt.training.config import TrainConfig
from minigpt.training.distributed import init_distributed, sharded_loader
from minigpt.training.loop import History, TrainingInterrupted, train_model
from minigpt.training.losses import calc_loss_loader, perplexity

logger = logging.getLogger(__name__)


def _main_job_loop() -> TrainConfig:
    """The loop of the main job. On a CPU the cost of a token is nearly the same in batches
    of 2 or of 8 windows (the 50,257-way output layer dominates), so in a fixed time many
    small steps learn more than a few large ones: measured on Tiny Shakespeare, batches of
    2 x 128 tokens at a peak learning rate of 4e-3 reach a lower validation loss after
    the same number of tokens than 4 x 128 (6e-3), 8 x 128 (3e-3 or 1e-2) or 1 x 128 (3e-3)."""
    return TrainConfig(max_steps=1100, lr=4e-3, min_lr=4e-4, warmup_steps=30, eval_every=100, eval_iter=10)


@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain`: the data, the model, and the loop's ``train`` settings."""

    corpus: str = field(default="tiny-shakespeare", metadata={
        "help": "a corpus name (the-verdict, tiny-shakespeare, python-docs) or a UTF-8 text file"})
    preset: str = field(default="tiny", metadata={"help": "model size (see 'minigpt info')",
                                                  "choices": tuple(PRESETS)})
    context_length: int | None = field(default=None, metadata={
        "help": "tokens per window", "none": "the preset's"})
    drop_rate: float | None = field(default=None, metadata={"help": "dropout", "none": "the preset's"})
    batch_size: int = field(default=2, metadata={
        "help": "windows per batch and process (a step sees batch size x processes x grad accum windows)"})
    val_ratio: float = field(default=0.1, metadata={
        "help": "share of the corpus held out for validation (its end)"})
    seed: int = field(default=123, metadata={"help": "initial weights, data order and dropout"})
    train: TrainConfig = field(default_factory=_main_job_loop)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):  # read back from settings.json
            self.train = TrainConfig(**self.train)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 < self.val_ratio < 1:
            raise ValueError(f"val_ratio must be more than 0 and less than 1, got {self.val_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        try:
            return cls(**values)
        except TypeError as err:  # an unknown or missing field
            raise ValueError(f"invalid pretraining settings: {err}") from err

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> PretrainConfig:
        """The settings a run directory was started with."""
        return cls.from_dict(load_settings(run_dir))

    def replace(self, **changes: Any) -> PretrainConfig:
        """A copy with ``changes``; names of :class:`TrainConfig` fields go to ``train``."""
        loop_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        loop = {k: v for k, v in changes.items() if k in loop_fields}
        own = {k: v for k, v in changes.items() if k not in loop_fields}
        return dataclasses.replace(self, **own, train=dataclasses.replace(self.train, **loop))

    def model_config(self) -> GPTConfig:
        overrides = {k: v for k, v in (("context_length", self.context_length),
                                       ("drop_rate", self.drop_rate)) if v is not None}
        return GPTConfig.from_preset(self.preset, **overrides)


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: the history, and the final model's validation loss over
    the whole validation split (``val_windows`` windows, ``val_tokens`` predictions)."""

    run_dir: Path
    history: History
    val_loss: float
    val_windows: int
    val_tokens: int
    pair_shares: list[float]  # word_pair_share of each sample in history.samples
    seconds: float

    @property
    def val_perplexity(self) -> float:
        return perplexity(self.val_loss)


def new_run_dir(settings: PretrainConfig, out_dir: str | os.PathLike, name: str | None = None,
                overwrite: bool = False) -> Path:
    """``out_dir/name`` (default name: ``<corpus>-<preset>``), refusing to start afresh over a run."""
    run_dir = Path(out_dir) / (name or f"{Path(settings.corpus).stem}-{settings.preset}")
    if (run_dir / STATE_FILE).exists() and not overwrite:
        raise ValueError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                         "or pick another --name, or start it afresh with --overwrite")
    return run_dir


# ------------------------------------------------------------------ measuring "words"

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # letters, with inner apostrophes (call'd)


def words(text: str) -> list[str]:
    """The words of ``text``, lower-cased; punctuation, digits and spacing are dropped."""
    return [w.lower() for w in _WORD.findall(text)]


@lru_cache(maxsize=4)
def word_pairs(text: str) -> frozenset[tuple[str, str]]:
    """Every pair of adjacent words in ``text`` (see :func:`words`)."""
    ws = words(text)
    return frozenset(zip(ws, ws[1:], strict=False))


def word_pair_share(sample: str, corpus_text: str) -> float:
    """The share of adjacent word pairs in ``sample`` that also occur in ``corpus_text``.

    With a BPE tokenizer nearly every single token a model emits is a corpus word, even
    at random; pairs tell noise from text. ``"my good lord"`` has the pairs ``(my, good)``
    and ``(good, lord)``; if the corpus holds only the second, the share is 0.5. A sample
    with fewer than two words has no pairs: 0.0.
    """
    ws = words(sample)
    pairs = list(zip(ws, ws[1:], strict=False))
    if not pairs:
        return 0.0
    known = word_pairs(corpus_text)
    return sum(pair in known for pair in pairs) / len(pairs)


# ------------------------------------------------------------------------ the job


def default_prompt(val_text: str, num_words: int = 4) -> str:
    """A prompt that reads naturally: the first ``num_words`` words of the first paragraph
    (or document) that begins in the validation split, which the model never trains on."""
    starts = [m.end() for m in re.finditer(rf"\n\s*\n|{re.escape(ENDOFTEXT)}", val_text)]
    text = val_text[starts[0]:] if starts else val_text
    match = re.match(rf"\s*((?:\S+\s+){{{num_words - 1}}}\S+)", text)
    return match.group(1) if match else text.strip()[:80]


def windows(num_tokens: int, context_length: int) -> int:
    """How many touching windows of ``context_length`` tokens (+1 target) ``num_tokens`` give."""
    return max(0, (num_tokens - context_length - 1) // context_length + 1)


def _check_splits(settings: PretrainConfig, n_train: int, n_val: int, n: int, world_size: int) -> None:
    """Refuse, before training starts, splits that give no validation window or no batch."""
    where = f"{settings.corpus} (context_length {n}, val_ratio {settings.val_ratio})"
    if windows(n_val, n) == 0:
        raise ValueError(
            f"the validation split of {where} has {n_val:,} tokens, fewer than one window of {n + 1}: "
            "use a smaller context_length, a larger val_ratio or a larger corpus")
    needed = settings.batch_size * world_size
    if windows(n_train, n) < needed:
        raise ValueError(
            f"the training split of {where} has {windows(n_train, n):,} windows, fewer than one batch of "
            f"{needed}: use a smaller batch_size or context_length, or a larger corpus")


def _token_ids(corpus: str, tokenizer: Any) -> torch.Tensor:
    try:
        return load_token_ids(corpus, tokenizer)
    except UnicodeDecodeError as err:  # a text file in another encoding
        raise ValueError(f"the corpus {corpus} is not UTF-8 text ({err.reason} at byte {err.start}): "
                         "convert it to UTF-8 first") from err


def pretrain(
    settings: PretrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a fresh model of ``settings.preset`` on ``settings.corpus`` into ``run_dir``.

    ``resume=True`` continues the checkpoint there (:mod:`minigpt.training.checkpoint`). Under
    ``torchrun`` every process trains on its own share of each batch. On Ctrl-C or
    SIGTERM the loop saves a checkpoint and raises ``TrainingInterrupted``.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    device = select_device(device)
    rank, world_size = init_distributed(device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        tokenizer = get_gpt2_tokenizer()
        ids = _token_ids(settings.corpus, tokenizer)
        train_ids, val_ids = split_text(ids, 1 - settings.val_ratio)
        n = settings.model_config().context_length
        _check_splits(settings, len(train_ids), len(val_ids), n, world_size)
        # stride = context: every token is an input once per epoch, windows never overlap.
        val_set = GPTDataset(val_ids, max_length=n, stride=n)
        train_loader = sharded_loader(GPTDataset(train_ids, max_length=n, stride=n),
                                      settings.batch_size, shuffle=True, seed=settings.seed)
        val_loader = sharded_loader(val_set, settings.batch_size, shuffle=False)  # keeps every window
        torch.manual_seed(settings.seed)
        model = GPTModel(settings.model_config())  # identical on every process
        torch.manual_seed(settings.seed + rank)  # but each process draws its own dropout masks
        loop = settings.train
        if loop.sample_prompt is None:
            loop = dataclasses.replace(loop, sample_prompt=default_prompt(tokenizer.decode(val_ids[:2048].tolist())))
        logger.info("corpus %s: %s tokens (%s train, %s validation) | model %s: %s parameters | device %s | "
                    "precision %s | %s steps of %d x %d tokens%s", settings.corpus, f"{len(ids):,}",
                    f"{len(train_ids):,}", f"{len(val_ids):,}", settings.preset, f"{model.num_parameters():,}",
                    device, resolve_precision(loop.precision, device), f"{loop.max_steps:,}",
                    settings.batch_size * world_size * loop.grad_accum, n, f" | resuming {run_dir}" if resume else "")
        if rank == 0:
            save_settings(run_dir, settings.to_dict())
        try:
            history = train_model(model, train_loader, val_loader, loop, device=device, tokenizer=tokenizer,
                                  run_dir=run_dir, resume=resume, progress=progress)
        except TrainingInterrupted as stop:
            if rank == 0 and stop.history is not None and stop.history.steps:  # a stopped run shows its curves too
                _write_figures(run_dir, stop.history, _pair_shares(stop.history, loop.sample_prompt, settings.corpus))
            raise
        shares = _pair_shares(history, loop.sample_prompt, settings.corpus) if rank == 0 else []
        if rank == 0:
            _write_figures(run_dir, history, shares)
        try:
            val_loss = _whole_split_loss(history, model, val_loader, val_set, loop, device, world_size)
        except KeyboardInterrupt:  # Ctrl-C in the final evaluation: the last step's checkpoint is saved
            raise TrainingInterrupted(len(history.step_losses), run_dir, 130, "SIGINT", history) from None
        return PretrainResult(run_dir, history, val_loss, len(val_set), len(val_set) * n, shares,
                              time.perf_counter() - start)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _whole_split_loss(history: History, model: CausalLM, val_loader: DataLoader, val_set: GPTDataset,
                      loop: TrainConfig, device: torch.device, world_size: int) -> float:
    """The final model's loss over every validation window: the last evaluation's when it
    already covered them all, else one more pass (in this process, so nothing is averaged)."""
    if world_size == 1 and (loop.eval_iter is None or loop.eval_iter >= len(val_loader)):
        return history.val_losses[-1]
    with evaluating(model), autocast(device, resolve_precision(loop.precision, device)):
        return calc_loss_loader(DataLoader(val_set, batch_size=val_loader.batch_size), model, device)


def _pair_shares(history: History, prompt: str | None, corpus: str) -> list[float]:
    """:func:`word_pair_share` of each sample's continuation (the prompt is the corpus's own text)."""
    corpus_text = load_corpus(corpus)
    return [word_pair_share(s[len(prompt):] if prompt and s.startswith(prompt) else s, corpus_text)
            for s in history.samples]


def _write_figures(run_dir: Path, history: History, shares: list[float]) -> None:
    from minigpt.training.plots import plot_losses, plot_lr  # matplotlib: only once there is something to draw

    plot_losses(history, run_dir / "loss.png")
    plot_lr(history, run_dir / "lr.png")
    write_text(run_dir / "samples.txt", "".join(
        f"--- step {step} ({tokens:,} tokens seen, validation loss {val:.3f}, "
        f"word pairs found in the corpus {share:.0%})\n{sample}\n\n"
        for step, tokens, val, sample, share in zip(history.steps, history.tokens_seen, history.val_losses,
                                                     history.samples, shares, strict=True)))
