"""What the fine-tuning jobs share: their common settings, one setup and one finish.

The one idea: classification (book ch. 6), instruction tuning (ch. 7) and preference
tuning (DPO) are the same job around a different dataset, loss and use of the model::

    setup     seed, device, tokenizer, the model (a GPT-2 name, a directory or a preset),
              quantized if asked (then LoRA trains on it: QLoRA)
    (the job) its data and loaders, its surgery (a classifier head), LoRA if asked
    train     the training loop at a constant learning rate with the job's loss (NEFTune's
              noisy embeddings if asked), checkpointing into the output
    finish    test loss, LoRA merged into the weights, the model saved, loss.png, metrics.json

The output directory is also the run directory of the loop: on Ctrl-C or SIGTERM the loop
saves a checkpoint there and raises ``TrainingInterrupted``, and ``resume=True`` (with the
settings kept in ``settings.json``) continues it exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from minigpt.finetuning.instruction import split_instruction_data
from minigpt.finetuning.neftune import disable_neftune, enable_neftune
from minigpt.finetuning.preference import PreferenceDataset
from minigpt.finetuning.prompt_format import ALPACA, PROMPT_FORMATS, PromptFormat, prompt_format
from minigpt.io.files import write_bytes, write_json
from minigpt.jobs.quantize import check_quantize, quantize_field
from minigpt.lora.adapters import apply_lora, merge_lora
from minigpt.lora.files import save_lora
from minigpt.models.base import CausalLM, evaluating
from minigpt.models.loader import chat_template_of, load, load_tokenizer, resolve
from minigpt.quantization.model import is_quantized, quantize_model
from minigpt.runtime.runtime import PRECISIONS, resolve_precision, select_device
from minigpt.training.checkpoint import SETTINGS_FILE, STATE_FILE, load_settings, save_settings
from minigpt.training.config import TrainConfig
from minigpt.training.distributed import ShardSampler, rank_and_world_size
from minigpt.training.loop import History, train_model
from minigpt.training.losses import LossFn, has_perplexity, next_token_loss, perplexity, summed_loss_and_metrics
from minigpt.training.plots import plot_losses

logger = logging.getLogger(__name__)

Settings = TypeVar("Settings", bound="FinetuneConfig")


@dataclass(kw_only=True)
class FinetuneConfig:
    """Settings every fine-tuning job has; ``model``, ``output`` and ``epochs`` get their
    defaults in each job's own dataclass."""

    model: str = field(metadata={
        "help": "a model name (gpt2-small, ..., smollm2-135m, ...) or a weights/run directory, or a GPT-2 "
                "preset (e.g. tiny) for random weights"})
    output: str = field(metadata={"help": "directory for the results (and the checkpoint of an interrupted run)"})
    epochs: int = field(metadata={"help": "passes over the training examples"})
    batch_size: int = field(default=8, metadata={"help": "examples per batch"})
    lr: float = field(default=5e-5, metadata={
        "help": "constant learning rate (suits pretrained weights; random weights want about 1e-3)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    lora_rank: int | None = field(default=None, metadata={
        "help": "train LoRA adapters of this rank instead of the weights", "none": "no LoRA"})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "LoRA scaling numerator", "none": "the rank"})
    quantize: str | None = quantize_field()
    eval_every: int = field(default=50, metadata={"help": "optimizer steps between evaluations"})
    eval_iter: int | None = field(default=5, metadata={"help": "batches per evaluation", "none": "all"})
    seed: int = field(default=123, metadata={"help": "data order, new weights and dropout"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, mps", "none": "the best available"})
    precision: str = field(default="float32", metadata={
        "help": "float32, or mixed precision: auto (bfloat16 where the hardware has it), bfloat16, float16",
        "choices": PRECISIONS})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "eval_iter", "lora_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be more than 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_quantize(self.quantize)
        if self.quantize and not self.lora_rank:
            raise ValueError(f"a model quantized to {self.quantize} needs lora_rank: quantized weights are frozen, "
                             "so fine-tuning trains LoRA adapters on them (QLoRA); give a rank, e.g. 16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls: type[Settings], output: str | os.PathLike) -> Settings:
        """The settings an (interrupted) run in ``output`` was started with."""
        if not (Path(output) / SETTINGS_FILE).is_file():
            raise FileNotFoundError(f"{output} has no {SETTINGS_FILE}: it is not the output of a fine-tuning run")
        values = load_settings(output)
        try:
            return cls(**values)
        except TypeError as err:
            raise ValueError(f"{output}'s settings do not fit {cls.__name__}: {err}") from err


def job_default(name: str, value: Any) -> Any:
    """A field of :class:`FinetuneConfig` with a job's own default (and the shared help)."""
    return field(default=value, metadata=FinetuneConfig.__dataclass_fields__[name].metadata)


def neftune_field() -> Any:
    """The ``neftune_alpha`` setting of the jobs that train on prompts and answers
    (instruction and preference tuning), checked by :func:`check_neftune_alpha`."""
    return field(default=None, metadata={
        "help": "NEFTune: while training, uniform noise of size alpha/sqrt(length*width) on the token "
                "embeddings (the paper tries 5, 10, 15)", "none": "off"})


def check_neftune_alpha(alpha: float | None) -> None:
    """``neftune_alpha`` is None (off) or more than 0."""
    if alpha is not None and not alpha > 0:
        raise ValueError(f"neftune_alpha must be more than 0 (the paper uses 5 to 15), got {alpha}")








def prompt_format_field() -> Any:
    """The ``prompt_format`` setting of the jobs that train on prompts and answers."""
    return field(default="auto", metadata={
        "help": "how entries become texts: alpaca (the book's template), chat (the model's chat template, from "
                "tokenizer_config.json), plain (User:/Assistant:) or auto (chat when the model has a template, "
                "else alpaca); the run records the format it used",
        "choices": ("auto", *PROMPT_FORMATS)})


def check_prompt_format(name: str) -> None:
    """``name`` is ``auto`` or one of :data:`~minigpt.finetuning.prompt_format.PROMPT_FORMATS`."""
    if name not in ("auto", *PROMPT_FORMATS):
        raise ValueError(f"prompt_format must be auto or one of {', '.join(PROMPT_FORMATS)}, got {name!r}")


def choose_prompt_format(name: str, spec: str, tokenizer: Any) -> PromptFormat:
    """The format ``name`` (see :func:`prompt_format_field`) for the model ``spec``: ``auto`` is
    its chat template where it has one, else the book's Alpaca template."""
    check_prompt_format(name)
    template = None if name in ("alpaca", "plain") else chat_template_of(spec)
    if name == "auto":
        name = "chat" if template is not None else "alpaca"
    return prompt_format(name, template, getattr(tokenizer, "special_token_names", {}), source=spec)


@dataclass
class Run:
    """What :func:`setup` prepares and the rest of a fine-tuning job works with."""

    settings: FinetuneConfig
    output: Path
    device: torch.device
    tokenizer: Any
    model: CausalLM
    resume: bool
    progress: bool
    prompt_format: PromptFormat = ALPACA  # how prompts and answers become texts (instruction and preference data)


def setup(settings: FinetuneConfig, model: CausalLM | None = None, *, resume: bool = False,
          progress: bool = True) -> Run:
    """Seed, device, the model (``settings.model`` unless one is given; quantized when
    ``settings.quantize`` asks, a given model too unless it already is) and its tokenizer.
    The jobs on prompts and answers set ``prompt_format`` (:func:`choose_prompt_format`)."""
    torch.manual_seed(settings.seed)  # a preset's random weights and a new head come from it
    device = select_device(settings.device)
    if model is None:
        model = load(settings.model, quantize=settings.quantize)
    elif settings.quantize and not is_quantized(model):
        quantize_model(model, settings.quantize)
    return Run(settings, Path(settings.output), device, load_tokenizer(settings.model), model, resume, progress)


def add_lora(run: Run) -> None:
    """Wrap the model's linear layers in LoRA adapters when ``lora_rank`` is set (they
    alone then train); :func:`finish` merges them back into the weights."""
    s = run.settings
    if s.lora_rank:
        apply_lora(run.model, s.lora_rank, s.lora_alpha if s.lora_alpha is not None else s.lora_rank)


def copy_tokenizer_files(spec: str, output: Path) -> None:
    """Copy the files a model of ``spec``'s family needs beside its weights to be read again
    (a Llama-family ``tokenizer.json`` and chat template; none for GPT-2, whose encoding is built in)."""
    source = resolve(spec)
    if source.directory is None or source.directory.resolve() == output.resolve():
        return
    for name in source.family.tokenizer_files:
        if (source.directory / name).is_file():
            write_bytes(output / name, (source.directory / name).read_bytes())



@dataclass
class PreferenceSplits:
    """A preference job's pairs split 85/5/10, tokenized in the run's prompt format, and batched."""

    parts: list[list[dict[str, str]]]  # train, validation and test pairs
    datasets: list[PreferenceDataset]
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    max_length: int  # the longest batch, within the model's context

    def examples(self) -> dict[str, int]:
        """Pairs per split, as ``metrics.json`` records them."""
        return {"train": len(self.parts[0]), "val": len(self.parts[1]), "test": len(self.parts[2])}

    def summary(self) -> str:
        return f"{len(self.parts[0])} train, {len(self.parts[1])} validation, {len(self.parts[2])} test pairs"


def preference_splits(run: Run, entries: list[dict[str, str]], max_length: int, batch_size: int,
                      seed: int) -> PreferenceSplits:
    """The splits of DPO and the reward model: each part must hold a pair at least (the error says how many)."""
    parts = split_instruction_data(entries)
    if not all(parts):
        raise ValueError(f"{len(entries)} pairs split into {len(parts[0])} train, {len(parts[1])} validation and "
                         f"{len(parts[2])} test pairs; each part needs one at least: use 20 pairs or more")
    max_length = min(max_length, run.model.cfg.context_length)
    datasets = [PreferenceDataset(part, run.tokenizer, prompt_format=run.prompt_format) for part in parts]
    collate = datasets[0].collate_fn(max_length)
    train_loader = shuffled_loader(datasets[0], batch_size, seed, drop_last=False, collate_fn=collate)
    val_loader = DataLoader(datasets[1], batch_size, collate_fn=collate)
    test_loader = DataLoader(datasets[2], batch_size, collate_fn=collate)
    return PreferenceSplits(parts, datasets, train_loader, val_loader, test_loader, max_length)

def shuffled_loader(dataset: Dataset, batch_size: int, seed: int, *, drop_last: bool,
                    collate_fn: Callable | None = None) -> DataLoader:
    """The training loader: an order that is a function of ``(seed, epoch)`` (so a resumed
    run finds its place again), without a last short batch when ``drop_last``."""
    rank, world_size = rank_and_world_size()
    sampler = ShardSampler(len(dataset), rank, world_size, shuffle=True, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))


def train(run: Run, train_loader: DataLoader, val_loader: DataLoader, *, data: str,
          loss_fn: LossFn = next_token_loss, neftune_alpha: float | None = None, **loop: Any) -> History:
    """The loop at the constant learning rate ``settings.lr`` for ``epochs`` passes with the
    job's ``loss_fn``, with one banner line first; ``loop`` sets further :class:`TrainConfig`
    fields (samples). With ``neftune_alpha``, NEFTune is on for the loop's training steps
    (``loss_fn`` gives it each example's length) and off again afterwards; without, the
    model is left as it is."""
    s = run.settings
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_loader.dataset)} training examples make no batch of {s.batch_size}: "
                         "use a smaller batch_size or more examples")
    config = TrainConfig(max_steps=s.epochs * len(train_loader), lr=s.lr, min_lr=s.lr, warmup_steps=0,
                         weight_decay=s.weight_decay, eval_every=s.eval_every, eval_iter=s.eval_iter,
                         precision=s.precision, **loop)
    logger.info("data %s | model %s: %s parameters, %s trainable | device %s | precision %s | "
                "%s steps (%d epochs of %d batches)%s%s%s", data, s.model, f"{run.model.num_parameters():,}",
                f"{run.model.num_parameters(trainable_only=True):,}", run.device,
                resolve_precision(s.precision, run.device), f"{config.max_steps:,}", s.epochs, len(train_loader),
                f" | NEFTune alpha {neftune_alpha:g}" if neftune_alpha else "",
                f" | base quantized {s.quantize} (QLoRA)" if s.quantize else "",
                f" | resuming {run.output}" if run.resume else "")
    settings = s.to_dict()
    if "prompt_format" in settings:  # the format used, by name, for whoever reads this run later (the server)
        settings["prompt_format"] = run.prompt_format.name
    save_settings(run.output, settings)
    if neftune_alpha is not None:
        enable_neftune(run.model, neftune_alpha)
    try:
        return train_model(run.model, train_loader, val_loader, config, device=run.device,
                           tokenizer=run.tokenizer if loop.get("sample_prompt") else None, loss_fn=loss_fn,
                           run_dir=run.output, resume=run.resume, progress=run.progress)
    finally:
        if neftune_alpha is not None:
            disable_neftune(run.model)  # the model leaves the job without the job's noise hook


def split_scores(run: Run, loader: DataLoader, loss_fn: LossFn = next_token_loss) -> dict[str, float]:
    """The mean loss over the whole ``loader`` in eval mode, ``{"loss": x}``, plus the means
    of the metrics ``loss_fn`` returns beside it (a preference loss's rewards)."""
    with evaluating(run.model):  # no dropout, no noise
        total, count, sums = summed_loss_and_metrics(loader, run.model, run.device, loss_fn=loss_fn)
    if not count:
        raise ValueError(f"the {len(loader.dataset)} examples of this split score nothing: they are empty, "
                         "or their prompts fill max_length; use a larger max_length or other examples")
    return {"loss": total / count, **{name: value / count for name, value in sums.items()}}


def finish(run: Run, history: History, test_loader: DataLoader, metrics: dict[str, Any],
           save: Callable[[CausalLM, Path], None], *, loss_fn: LossFn = next_token_loss,
           adapter: str | None = None) -> dict[str, Any]:
    """Test loss, LoRA merged, ``save(model, output)``, ``loss.png`` and ``metrics.json``
    (written last and atomically: its presence means the job completed; the checkpoint's
    optimizer state is deleted before). Returns the metrics: ``metrics`` plus
    ``test_loss``, and ``test_perplexity`` for the next-token loss, or ``test``, the
    loss and the figures of another ``loss_fn`` that returns some (see :func:`split_scores`).
    With LoRA and ``adapter``, the adapter alone is also saved, to that file of the
    output, before it is merged. A quantized base (QLoRA) is dequantized by the merge:
    the saved model is a full-precision one."""
    scores = split_scores(run, test_loader, loss_fn)
    metrics = {**metrics, "test_loss": scores["loss"]}
    if has_perplexity(loss_fn):
        metrics["test_perplexity"] = perplexity(scores["loss"])
    if len(scores) > 1:
        metrics["test"] = scores
    if run.settings.lora_rank:
        if adapter:
            save_lora(run.model, run.output / adapter)
        merge_lora(run.model)
    save(run.model, run.output)
    copy_tokenizer_files(run.settings.model, run.output)
    (run.output / STATE_FILE).unlink(missing_ok=True)  # the run is complete: its optimizer state is not needed
    plot_losses(history, run.output / "loss.png")
    write_json(run.output / "metrics.json", metrics)
    return metrics
