"""Pretraining (book ch. 5 and appendix D): predict every next token, measure the miss
with cross-entropy, and nudge every weight to miss less.

The one idea: training is this loop, repeated::

    loss = cross_entropy(model(inputs), targets)   # how surprised was the model?
    loss.backward()                                # which way should each weight move?
    optimizer.step()                               # move it a little

Everything else here makes the loop work well and reproducibly:

* ``calc_loss_batch``, ``calc_loss_loader``, ``evaluate_model``, ``perplexity``: the
  book's measuring functions, small enough to call one by one in a notebook;
* AdamW with weight decay on weight matrices only; a learning rate that warms up
  linearly and then decays along a cosine; gradient clipping (appendix D);
* gradient accumulation (one large batch in several small pieces), bfloat16/float16
  mixed precision, gradient checkpointing and ``torch.compile``, all optional;
* ``train_model``: the loop, with an evaluation, a sample and a checkpoint every
  ``eval_every`` steps (:mod:`minigpt.checkpoint` makes a resumed run repeat the
  uninterrupted one exactly), and ``DistributedDataParallel`` under ``torchrun``;
* ``pretrain``: the whole job behind ``minigpt pretrain``, from a corpus name to a
  run directory with the weights, the loss curves and samples.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm  # plain text: no widget library needed in notebooks

from minigpt.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_settings,
    write_text,
)
from minigpt.config import GPTConfig
from minigpt.generation import generate, text_to_token_ids, token_ids_to_text
from minigpt.model import GPTModel

IGNORE_INDEX = -100  # targets with this id add nothing to the loss (padding, prompts)
PRECISIONS = ("auto", "float32", "bfloat16", "float16")

# A loss function maps (a batch from the loader, the model, the device) to a scalar loss.
LossFn = Callable[[Any, nn.Module, torch.device], torch.Tensor]


# ------------------------------------------------------------------------ measuring


def select_device(name: str | torch.device | None = None) -> torch.device:
    """The device called ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), or the
    best available one: a CUDA GPU, then Apple's MPS, then the CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but PyTorch sees no CUDA GPU")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} was asked for, but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device: torch.device | str
) -> torch.Tensor:
    """Mean cross-entropy of one batch: ``(batch, tokens)`` ids and targets -> a scalar.

    Every position is one prediction: the logits ``(batch, tokens, vocab)`` are flattened
    to ``(batch * tokens, vocab)`` rows scored against the ``batch * tokens`` targets.
    Targets equal to ``-100`` are skipped (fine-tuning marks padding and prompts so).
    """
    logits = model(input_batch.to(device))
    # float32 for the softmax even under autocast: its sums lose digits in 16 bits.
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.to(device).flatten(),
                           ignore_index=IGNORE_INDEX)


def next_token_loss(batch: Sequence[torch.Tensor], model: nn.Module, device: torch.device | str) -> torch.Tensor:
    """The default :data:`LossFn`: ``batch`` is ``(inputs, targets)``, scored by :func:`calc_loss_batch`."""
    input_batch, target_batch = batch
    return calc_loss_batch(input_batch, target_batch, model, device)


@torch.no_grad()
def calc_loss_loader(
    data_loader: DataLoader,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
    loss_fn: LossFn = next_token_loss,
) -> float:
    """Average batch loss over the first ``num_batches`` batches (all when None).

    NaN for an empty loader, as in the book: there is nothing to average.
    """
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, batch in enumerate(data_loader):
        if i >= num_batches:
            break
        total += loss_fn(batch, model, device).item()
    return total / num_batches


def evaluate_model(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device | str,
    eval_iter: int | None,
    loss_fn: LossFn = next_token_loss,
) -> tuple[float, float]:
    """``(train loss, validation loss)`` over ``eval_iter`` batches of each, with dropout off."""
    was_training = model.training
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, eval_iter, loss_fn)
    val_loss = calc_loss_loader(val_loader, model, device, eval_iter, loss_fn)
    model.train(was_training)
    return train_loss, val_loss


def perplexity(loss: float) -> float:
    """``exp(loss)``: the number of tokens the model is, on average, as unsure as if
    choosing uniformly among (50,257 for an untrained GPT-2, 1 for a perfect one)."""
    return math.exp(loss) if loss < 709 else math.inf  # exp overflows a float beyond 709


# ------------------------------------------------------------ optimizer and schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weight matrices, none on the rest.

    Decay pulls weights towards zero. That regularises the matrices of linear layers;
    shrinking a bias, a LayerNorm scale or an embedding row (which only moves when its
    token appears) has no such benefit, so those are left alone. A tied output head is
    the embedding matrix and counts as an embedding.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # each shared parameter once
        if param.requires_grad:
            is_matrix = param.dim() >= 2 and id(param) not in embeddings
            (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with the fused kernel where PyTorch has one
    (one pass over all parameters instead of a dozen small ops per tensor)."""
    device_type = next(model.parameters()).device.type
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


def lr_at_step(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay.

    Warm-up: ``max_lr * (step + 1) / warmup_steps``, so the first, wildest updates of a
    random model are small. Then the rate follows half a cosine from ``max_lr`` at
    ``warmup_steps`` down to ``min_lr`` at ``max_steps``, and stays at ``min_lr`` after.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- precision


def has_fast_bfloat16(device: torch.device) -> bool:
    """Whether the hardware computes in bfloat16 natively (CUDA since Ampere; CPUs with
    AVX-512-BF16 or AMX). Elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bfloat16"`` where it is fast, else ``"float32"``; checks the others."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if has_fast_bfloat16(device) else "float32"
    if precision == "float16" and device.type != "cuda":
        raise ValueError("float16 training needs CUDA (loss scaling); on this device use bfloat16 or float32")
    if precision == "bfloat16" and not has_fast_bfloat16(device):
        warnings.warn(f"{device.type} has no native bfloat16: it is emulated and slower than float32",
                      stacklevel=2)
    return precision


def autocast(device: torch.device, precision: str):
    """Context in which matrix products run in ``precision`` (a no-op for float32).

    Weights, gradients and the optimizer stay float32 (mixed precision); only the
    activations are computed in 16 bits.
    """
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainConfig:
    """Settings of :func:`train_model` (the loop); the data and the model are arguments."""

    # The defaults suit `minigpt pretrain`'s tiny model: a few minutes on a laptop CPU.
    max_steps: int = 120
    lr: float = 3e-3               # peak learning rate, reached after the warm-up
    min_lr: float = 3e-4           # floor of the cosine decay
    warmup_steps: int = 12
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0  # largest gradient norm; None: no clipping
    grad_accum: int = 1            # micro-batches per optimizer step
    eval_every: int = 30           # steps between evaluations (and checkpoints)
    eval_iter: int | None = 5      # batches per evaluation; None: the whole loaders
    precision: str = "auto"        # "auto" (bfloat16 where fast), "float32", "bfloat16", "float16" (CUDA)
    compile: bool = False          # torch.compile the model for training
    gradient_checkpointing: bool = False
    sample_prompt: str | None = None  # continued greedily at every evaluation
    sample_tokens: int = 50

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list back
        for name in ("max_steps", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr <= lr, got warmup_steps="
                             f"{self.warmup_steps}, min_lr={self.min_lr}, lr={self.lr}")


@dataclass
class History:
    """What :func:`train_model` records.

    Per evaluation: ``steps`` (optimizer steps done), ``tokens_seen`` (training tokens
    of all processes), ``train_losses``, ``val_losses``, ``samples``. Per optimizer step:
    ``lrs``, ``step_losses`` (mean over all processes and micro-batches) and
    ``grad_norms`` (before clipping); entry ``i`` belongs to step ``i + 1``.
    """

    steps: list[int] = field(default_factory=list)
    tokens_seen: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, list]) -> "History":
        return cls(**values)


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sharded_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A loader whose order is a pure function of ``(seed, epoch)``, split across processes.

    ``DistributedSampler`` shuffles with a generator seeded ``seed + epoch`` (the loop
    calls ``set_epoch``), so a resumed run can find its place again, and gives process
    ``r`` of ``n`` the windows ``r, r + n, ...`` of that order. One process is the case
    ``n = 1``. Across processes the batches of one step together hold exactly the
    windows one process would get with ``n`` times the batch size.
    """
    rank, world_size = rank_and_world_size()
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=True)
    # Our own generator: the loader's per-epoch seed draw must not advance the global
    # RNG, whose state (dropout) the checkpoint restores.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def _batches(loader: DataLoader, epoch: int, skip: int) -> Iterator[tuple[int, int, Any]]:
    """``(epoch, batches done in that epoch, batch)`` forever, starting ``skip`` batches
    into ``epoch`` (skipped batches are read and dropped: cheap for token windows)."""
    if len(loader) == 0:
        raise ValueError("the training loader yields no batches: the text is shorter than "
                         "one batch of windows; use a longer text or a smaller batch or context")
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield epoch, i + 1, batch
        epoch, skip = epoch + 1, 0


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _sample(model: GPTModel, tokenizer, prompt: str, max_new_tokens: int, device: torch.device) -> str:
    """Greedy continuation of ``prompt``: deterministic, so it draws no random numbers."""
    idx = text_to_token_ids(prompt, tokenizer).to(device)[:, -model.cfg.context_length:]
    out = generate(model, idx, max_new_tokens)
    return token_ids_to_text(out, tokenizer)


def train_model(
    model: GPTModel,
    train_loader: DataLoader,
    val_loader: DataLoader,
    config: TrainConfig,
    *,
    device: torch.device | str | None = None,
    tokenizer=None,
    loss_fn: LossFn = next_token_loss,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> History:
    """Train ``model`` for ``config.max_steps`` optimizer steps; returns the :class:`History`.

    At step 0, every ``eval_every`` steps and at the end: the train and validation loss over
    ``eval_iter`` batches, a greedy sample of ``sample_prompt`` (needs ``tokenizer``),
    and, with ``run_dir``, a checkpoint there. ``resume=True`` continues from that
    checkpoint with the same losses the uninterrupted run would have had, when the
    training loader's sampler has ``set_epoch`` (see :func:`sharded_loader`).

    ``loss_fn(batch, model, device)`` scores one batch of whatever the loaders yield.
    Inside ``torch.distributed`` (``torchrun``) the model is wrapped in
    ``DistributedDataParallel``; only rank 0 writes and shows progress.

    A NaN or infinite loss or gradient stops training with ``FloatingPointError``,
    after saving the weights of the last good step to ``run_dir``.
    """
    cfg = config
    device = select_device(device)
    precision = resolve_precision(cfg.precision, device)
    rank, world_size = rank_and_world_size()
    model.to(device)
    optimizer = create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "float16")
    history, step, epoch, batch_in_epoch, tokens_seen = History(), 0, 0, 0, 0
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs the run_dir to resume from")
        state = load_checkpoint(run_dir, model, optimizer, scaler, rank=rank)
        history = History.from_dict(state.history)
        step, epoch, batch_in_epoch, tokens_seen = state.step, state.epoch, state.batch_in_epoch, state.tokens_seen

    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    forward_model: nn.Module = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        forward_model = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        forward_model = torch.compile(forward_model)
    batches = _batches(train_loader, epoch, batch_in_epoch)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress or rank != 0,
               desc="training", unit="step", dynamic_ncols=True)

    def evaluate() -> None:
        # Evaluation must not draw from the global RNG (the val loader's iterator does),
        # or it would change the dropout of the steps that follow.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with autocast(device, precision):
                losses = evaluate_model(model, train_loader, val_loader, device, cfg.eval_iter, loss_fn)
                sample = (_sample(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, device)
                          if tokenizer is not None and cfg.sample_prompt and rank == 0 else "")
        train_loss, val_loss = _mean_over_ranks(list(losses), device)
        history.steps.append(step)
        history.tokens_seen.append(tokens_seen)
        history.train_losses.append(train_loss)
        history.val_losses.append(val_loss)
        history.samples.append(sample)
        if rank == 0 and progress:
            bar.write(f"step {step:>6} | tokens {tokens_seen:>10,} | train loss {train_loss:.3f} "
                      f"| val loss {val_loss:.3f} (perplexity {perplexity(val_loss):,.1f})")
            if sample:
                bar.write("  " + sample.replace("\n", " ")[:200])

    def checkpoint() -> None:
        rngs = rng_state_of_all_ranks(device)
        if run_dir is not None and rank == 0:
            save_checkpoint(run_dir, model, optimizer, scaler, step=step, epoch=epoch,
                            batch_in_epoch=batch_in_epoch, tokens_seen=tokens_seen,
                            history=history.to_dict(), rng_states=rngs)

    if step == 0:
        evaluate()  # the starting point of the curves: an untrained model's loss
    while step < cfg.max_steps:
        start = time.perf_counter()
        lr = lr_at_step(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, step_tokens = torch.zeros((), device=device), 0
        for micro in range(cfg.grad_accum):
            epoch, batch_in_epoch, batch = next(batches)
            # DDP averages gradients across processes in backward; only the last
            # micro-batch of a step needs that.
            last = micro == cfg.grad_accum - 1
            sync = nullcontext() if last or world_size == 1 else forward_model.no_sync()
            with sync:
                with autocast(device, precision):
                    loss = loss_fn(batch, forward_model, device)
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            step_tokens += batch[0].numel()
        step_loss, = _mean_over_ranks([loss_sum.item() / cfg.grad_accum], device)
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
        if not math.isfinite(step_loss) or (not math.isfinite(grad_norm) and not scaler.is_enabled()):
            # The weights are still those of the last step: the update was not applied.
            checkpoint()
            bar.close()
            what = "loss" if not math.isfinite(step_loss) else "gradient norm"
            raise FloatingPointError(
                f"the {what} became {step_loss if what == 'loss' else grad_norm} at step {step + 1}; "
                f"training stopped"
                + (f" and the last good weights (step {step}) are saved in {run_dir}" if run_dir else "")
                + ". Try a lower learning rate, a smaller grad_clip or float32 precision."
            )
        scaler.step(optimizer)  # skipped by the scaler when float16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens * world_size
        history.lrs.append(lr)
        history.step_losses.append(step_loss)
        history.grad_norms.append(grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{step_tokens * world_size / (time.perf_counter() - start):,.0f}")

        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            evaluate()
            checkpoint()
    bar.close()
    return history


def rng_state_of_all_ranks(device: torch.device) -> list[dict[str, Any]]:
    """Every process's RNG state (a list indexed by rank), gathered for rank 0 to save."""
    state = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


# ----------------------------------------------------------------------- the whole job


@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain` (``minigpt pretrain``): data, model, and the loop's ``train``.

    The defaults train the ``tiny`` preset on the offline ``python-docs`` corpus in a
    few minutes on a laptop CPU.
    """

    corpus: str = "python-docs"
    preset: str = "tiny"
    context_length: int | None = None  # None: the preset's
    drop_rate: float | None = None     # None: the preset's
    batch_size: int = 8                # per process; a step sees batch_size * processes * grad_accum windows
    val_ratio: float = 0.1             # the end of the corpus is held out for validation
    seed: int = 123                    # initial weights, data order, dropout
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PretrainConfig":
        try:
            return cls(**{**values, "train": TrainConfig(**values.get("train", {}))})
        except TypeError as err:  # an unknown or missing field
            raise ValueError(f"invalid pretraining settings: {err}") from err

    def replace(self, **changes: Any) -> "PretrainConfig":
        """A copy with ``changes``; names of :class:`TrainConfig` fields go to ``train``."""
        loop_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        loop = {k: v for k, v in changes.items() if k in loop_fields}
        own = {k: v for k, v in changes.items() if k not in loop_fields}
        return dataclasses.replace(self, **own, train=dataclasses.replace(self.train, **loop))

    def model_config(self) -> GPTConfig:
        overrides = {k: v for k, v in (("context_length", self.context_length),
                                       ("drop_rate", self.drop_rate)) if v is not None}
        return GPTConfig.from_preset(self.preset, **overrides)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` ...): NCCL between GPUs, gloo between CPU processes.
    Returns ``(rank, world_size)``; ``(0, 1)`` when not started by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank_and_world_size()


def _default_prompt(val_ids: torch.Tensor, tokenizer, num_tokens: int = 8) -> str:
    """The first words of the first validation document (after an ``<|endoftext|>``,
    if any): a prompt the model has never been trained on."""
    ends = (val_ids == tokenizer.eot_token).nonzero()
    start = int(ends[0]) + 1 if len(ends) and int(ends[0]) + 1 < len(val_ids) else 0
    return tokenizer.decode(val_ids[start:start + num_tokens].tolist())


def pretrain(
    settings: PretrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> History:
    """Pretrain a fresh model of ``settings.preset`` on ``settings.corpus`` into ``run_dir``.

    ``run_dir`` receives the checkpoint (see :mod:`minigpt.checkpoint`; it loads with
    ``GPTModel.from_pretrained(run_dir)``), ``settings.json``, ``loss.png``, ``lr.png``
    and ``samples.txt``. ``resume=True`` continues the checkpoint there. Under
    ``torchrun`` every process trains on its own share of each batch.
    """
    from minigpt.data import GPTDataset
    from minigpt.datasets import load_token_ids, split_text
    from minigpt.plots import plot_losses, plot_lr
    from minigpt.tokenizer import get_gpt2_tokenizer

    run_dir = Path(run_dir)
    device = select_device(device)
    rank, world_size = init_distributed(device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        tokenizer = get_gpt2_tokenizer()
        train_ids, val_ids = split_text(load_token_ids(settings.corpus, tokenizer), 1 - settings.val_ratio)
        model_cfg = settings.model_config()
        n = model_cfg.context_length
        # stride = context: every token is an input once per epoch, windows never overlap.
        train_loader = sharded_loader(GPTDataset(train_ids, max_length=n, stride=n),
                                      settings.batch_size, shuffle=True, seed=settings.seed)
        val_loader = sharded_loader(GPTDataset(val_ids, max_length=n, stride=n),
                                    settings.batch_size, shuffle=False)
        torch.manual_seed(settings.seed)
        model = GPTModel(model_cfg)  # identical on every process
        torch.manual_seed(settings.seed + rank)  # but each process draws its own dropout masks
        loop = settings.train
        if loop.sample_prompt is None:
            loop = dataclasses.replace(loop, sample_prompt=_default_prompt(val_ids, tokenizer))
        if rank == 0:
            save_settings(run_dir, settings.to_dict())
        history = train_model(model, train_loader, val_loader, loop, device=device, tokenizer=tokenizer,
                              run_dir=run_dir, resume=resume, progress=progress)
        if rank == 0:
            plot_losses(history, run_dir / "loss.png")
            plot_lr(history, run_dir / "lr.png")
            write_text(run_dir / "samples.txt", "".join(
                f"--- step {step} ({tokens:,} tokens seen, validation loss {val:.3f})\n{sample}\n\n"
                for step, tokens, val, sample in zip(history.steps, history.tokens_seen,
                                                     history.val_losses, history.samples)))
        return history
    finally:
        if world_size > 1:
            dist.destroy_process_group()
