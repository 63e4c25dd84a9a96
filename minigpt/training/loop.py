"""Training (book ch. 5 and appendix D): predict every next token, measure the miss with
cross-entropy, and nudge every weight to miss less.

The one idea: training is this loop, repeated::

    loss = loss_fn(model, batch)   # how surprised was the model? (minigpt.training.losses)
    loss.backward()                # which way should each weight move?
    optimizer.step()               # move it a little (minigpt.training.optim)

:func:`train_model` is that loop in small pieces (one optimizer step, one evaluation, one
checkpoint) with what makes it work well and reproducibly: schedule, clipping, accumulation,
mixed precision (:mod:`minigpt.runtime.runtime`), several processes (:mod:`minigpt.training.distributed`),
exact resume (:mod:`minigpt.training.checkpoint`), a clean stop on Ctrl-C (:mod:`minigpt.training.interrupt`).
The loss is pluggable, ``loss_fn(model, batch) -> loss`` (or ``(loss, metrics)``): fine-tuning
shares this loop. A run records a :class:`~minigpt.training.history.History` (importable from here too).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm  # plain text: no widget library needed in notebooks

from minigpt.generation.generate import generate
from minigpt.generation.text import text_to_token_ids, token_ids_to_text
from minigpt.models.base import check_token_ids, evaluating
from minigpt.runtime.runtime import (
    autocast,
    compile_with_loss,
    grad_scaler,
    resolve_precision,
    select_device,
)
from minigpt.training.checkpoint import load_checkpoint, save_checkpoint
from minigpt.training.config import TrainConfig
from minigpt.training.distributed import mean_over_ranks, rank_and_world_size, rng_state_of_all_ranks, sum_over_ranks
from minigpt.training.history import History, TrainingInterrupted
from minigpt.training.interrupt import GracefulInterrupt
from minigpt.training.losses import (
    LossFn,
    evaluation_scope,
    has_perplexity,
    input_tokens,
    loss_and_metrics,
    next_token_loss,
    perplexity,
    summed_loss_and_metrics,
    to_device,
)
from minigpt.training.optim import create_optimizer, lr_at_step
from minigpt.training.progress import log_above_bar

__all__ = ["History", "TrainingInterrupted", "train_model"]

logger = logging.getLogger(__name__)


@dataclass
class _Loop:
    """One call of :func:`train_model`: what it trains with, and where it stands."""

    config: TrainConfig
    model: nn.Module
    forward: nn.Module  # the model as trained: wrapped for several processes
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    loss_fn: LossFn
    train_loader: Iterable
    val_loader: Iterable
    tokenizer: Any = None
    run_dir: Path | None = None
    rank: int = 0
    world_size: int = 1
    interrupt: GracefulInterrupt = field(default_factory=GracefulInterrupt)
    history: History = field(default_factory=History)
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    saved_step: int | None = None  # the step of the last checkpoint this call saved
    train_loss: Callable[[Any], Any] | None = None  # batch -> loss_fn(forward, batch); compiled: training only


def train_model(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
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
    ``eval_iter`` batches (logged), a sample of ``sample_prompt`` (needs ``tokenizer``),
    and, with ``run_dir``, a checkpoint. ``resume=True`` continues from it with the losses
    the uninterrupted run would have had (see :func:`minigpt.training.distributed.sharded_loader`).

    ``loss_fn(model, batch)`` scores one batch of whatever the loaders yield, already on
    the device. Under ``torchrun`` the model is wrapped in ``DistributedDataParallel``;
    only rank 0 writes and shows progress.

    On SIGINT (Ctrl-C) or SIGTERM the current step is finished, a checkpoint saved (with
    ``run_dir``) and :class:`TrainingInterrupted` raised. A NaN or infinite loss or gradient
    raises ``FloatingPointError``, after saving the last good step's weights to ``run_dir``.
    """
    device = select_device(device)
    _check_loaders(train_loader, val_loader, device)
    loop = _start(model, config, device, loss_fn, train_loader, val_loader, tokenizer, run_dir, resume)
    cfg = config
    batches = _batches(train_loader, loop.epoch, loop.batch_in_epoch)
    bar = tqdm(total=cfg.max_steps, initial=loop.step, disable=not progress or loop.rank != 0,
               desc="training", unit="step", dynamic_ncols=True)
    with loop.interrupt, bar, log_above_bar(bar):
        if loop.step == 0 and not loop.history.steps:
            _evaluate(loop)  # the starting point of the curves: an untrained model's loss
        while loop.step < cfg.max_steps:
            if _stop_requested(loop):
                _checkpoint(loop)  # no-op when this step's checkpoint is saved already
                raise TrainingInterrupted(loop.step, loop.run_dir, loop.interrupt.exit_code,
                                          loop.interrupt.signal_name, loop.history)
            start = time.perf_counter()
            tokens = _optimizer_step(loop, batches)
            bar.update(1)
            bar.set_postfix(loss=f"{loop.history.step_losses[-1]:.3f}", lr=f"{loop.history.lrs[-1]:.2e}",
                            tok_s=f"{tokens * loop.world_size / (time.perf_counter() - start):,.0f}")
            if loop.step % cfg.eval_every == 0 or loop.step == cfg.max_steps:
                _evaluate(loop)
                _checkpoint(loop)
    return loop.history


def _check_loaders(train_loader: Iterable, val_loader: Iterable, device: torch.device) -> None:
    """Refuse loaders without a batch before any work (all processes together)."""
    try:
        sizes = [len(train_loader), len(val_loader)]
    except TypeError:  # loaders of unknown length: found out when they are read
        return
    n_train, n_val = sum_over_ranks(sizes, device)
    if n_train == 0:
        raise ValueError("the training loader yields no batches: its text is shorter than one batch of windows; "
                         "use a longer text, a smaller batch size or a shorter context length")
    if n_val == 0:
        raise ValueError("the validation loader yields no batches: the validation split is shorter than one "
                         "window; use a shorter context length, a larger validation share or a larger corpus")


def _start(model: nn.Module, config: TrainConfig, device: torch.device, loss_fn: LossFn, train_loader: Iterable,
           val_loader: Iterable, tokenizer: Any, run_dir: str | os.PathLike | None, resume: bool) -> _Loop:
    """Move the model to ``device``, build the optimizer, and load the checkpoint to resume."""
    precision = resolve_precision(config.precision, device)
    rank, world_size = rank_and_world_size()
    model.to(device)
    optimizer = create_optimizer(model, config.lr, config.weight_decay, config.betas)
    loop = _Loop(config, model, model, optimizer, grad_scaler(device, precision), device, precision, loss_fn,
                 train_loader, val_loader, tokenizer, None if run_dir is None else Path(run_dir), rank, world_size)
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs the run_dir to resume from")
        state = load_checkpoint(run_dir, model, optimizer, loop.scaler, rank=rank)
        loop.history = History.from_dict(state.history)
        loop.step, loop.epoch, loop.batch_in_epoch, loop.tokens_seen = (state.step, state.epoch,
                                                                        state.batch_in_epoch, state.tokens_seen)
    loop.history.precision = precision
    model.gradient_checkpointing = config.gradient_checkpointing  # read by GPTModel.forward
    model.train()
    if world_size > 1:
        loop.forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loop.train_loss = compile_with_loss(loop.forward, loss_fn) if config.compile else partial(loss_fn, loop.forward)
    if rank == 0:
        logger.info("training on %s in %s precision: steps %d to %d%s", device, precision, loop.step,
                    config.max_steps, f", {world_size} processes" if world_size > 1 else "")
    return loop


def _batches(loader: Iterable, epoch: int, skip: int) -> Iterator[tuple[int, int, Any]]:
    """``(epoch, batches done in that epoch, batch)`` forever, starting ``skip`` batches
    into ``epoch`` (skipped batches are read and dropped: cheap for token windows)."""
    while True:
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield epoch, i + 1, batch
        epoch, skip = epoch + 1, 0


def _check_inputs(loop: _Loop, batch: Any) -> None:
    """On a GPU the model reads no ids (that would wait for the device): check the inputs here, on the CPU."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else None
    cfg = getattr(loop.model, "cfg", None)
    if loop.device.type != "cpu" and cfg is not None and isinstance(inputs, torch.Tensor) and not inputs.is_cuda:
        check_token_ids(inputs, cfg.vocab_size)


def _optimizer_step(loop: _Loop, batches: Iterator[tuple[int, int, Any]]) -> int:
    """One optimizer step over ``grad_accum`` micro-batches, recorded in the history;
    returns the number of tokens this process trained on."""
    cfg = loop.config
    lr = lr_at_step(loop.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=loop.device)
    tokens = 0
    for micro in range(cfg.grad_accum):
        loop.epoch, loop.batch_in_epoch, batch = next(batches)
        _check_inputs(loop, batch)
        batch = to_device(batch, loop.device)
        loss_sum += _forward_backward(loop, batch, last=micro == cfg.grad_accum - 1)
        tokens += input_tokens(batch)
    step_loss, = mean_over_ranks([loss_sum.item() / cfg.grad_accum], loop.device)
    loop.scaler.unscale_(loop.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.grad_clip or math.inf).item()
    _stop_if_not_finite(loop, step_loss, grad_norm)
    loop.scaler.step(loop.optimizer)  # skipped by the scaler when float16 gradients overflowed
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.step += 1
    loop.tokens_seen += tokens * loop.world_size
    loop.history.lrs.append(lr)
    loop.history.step_losses.append(step_loss)
    loop.history.grad_norms.append(grad_norm)
    return tokens


def _forward_backward(loop: _Loop, batch: Any, last: bool) -> torch.Tensor:
    """Loss and gradients of one micro-batch; returns the loss, detached."""
    # DDP averages gradients across processes in backward; only a step's last micro-batch needs it.
    with nullcontext() if last or loop.world_size == 1 else loop.forward.no_sync():
        with autocast(loop.device, loop.precision):
            loss, _ = loss_and_metrics(loop.train_loss(batch))
        loop.scaler.scale(loss / loop.config.grad_accum).backward()
    return loss.detach()


def _stop_if_not_finite(loop: _Loop, step_loss: float, grad_norm: float) -> None:
    """Raise ``FloatingPointError`` after saving the last good weights (this step's update is
    not applied yet). Under float16 loss scaling the scaler skips overflowing steps itself."""
    if math.isfinite(step_loss) and (math.isfinite(grad_norm) or loop.scaler.is_enabled()):
        return
    _checkpoint(loop)
    what, value = ("loss", step_loss) if not math.isfinite(step_loss) else ("gradient norm", grad_norm)
    saved = (f" and the last good weights (step {loop.step}) are saved in {loop.run_dir}"
             if loop.run_dir is not None else "")
    raise FloatingPointError(f"the {what} became {value} at step {loop.step + 1}; training stopped{saved}. "
                             "Try a lower learning rate, a smaller grad_clip or float32 precision.")


def _evaluate(loop: _Loop) -> None:
    """Train and validation loss (and a sample) at the current step, into the history and the log."""
    # Evaluation must not draw from the global RNG (the val loader's iterator does), or it
    # would change the dropout of the steps that follow.
    with torch.random.fork_rng(devices=[loop.device] if loop.device.type == "cuda" else []), \
            autocast(loop.device, loop.precision), evaluating(loop.model):
        train_loss, train_metrics = _eval_loss(loop, loop.train_loader)
        val_loss, val_metrics = _eval_loss(loop, loop.val_loader)
        sample = _sample(loop) if loop.rank == 0 else ""
    h = loop.history
    h.steps.append(loop.step)
    h.tokens_seen.append(loop.tokens_seen)
    h.train_losses.append(train_loss)
    h.val_losses.append(val_loss)
    h.samples.append(sample)
    h.record_metrics("train", train_metrics)
    h.record_metrics("val", val_metrics)
    if loop.rank == 0:
        scope = evaluation_scope(loop.val_loader, loop.config.eval_iter)
        if has_perplexity(loop.loss_fn):
            scope = f"perplexity {perplexity(val_loss):,.1f}, {scope}"
        logger.info("step %6d | tokens %10s | train loss %.3f | val loss %.3f (%s)", loop.step,
                    f"{loop.tokens_seen:,}", train_loss, val_loss, scope)
        for split, metrics in (("train", train_metrics), ("val", val_metrics)):
            if metrics:
                logger.info("  %-5s %s", split, " | ".join(f"{name} {value:.3f}" for name, value in metrics.items()))
        if sample:
            logger.info("  %s", sample.replace("\n", " ")[:200])


def _eval_loss(loop: _Loop, loader: Iterable) -> tuple[float, dict[str, float]]:
    """Mean loss per scored target over ``eval_iter`` batches of every process's share, and
    the mean of each metric the loss function returns (weighted alike)."""
    total, count, sums = summed_loss_and_metrics(loader, loop.model, loop.device, loop.config.eval_iter,
                                                 loop.loss_fn)
    names = sorted(sums)  # the same order in every process
    total, count, *values = sum_over_ranks([total, count, *(sums[name] for name in names)], loop.device)
    if not count:
        raise ValueError("the evaluation batches hold no scored targets (all are -100): nothing to measure")
    return total / count, {name: value / count for name, value in zip(names, values, strict=True)}


def _sample(loop: _Loop) -> str:
    """A continuation of ``sample_prompt``, greedy or sampled with the same seed every time (so
    that samples differ only because the model changed); draws nothing from the global RNG."""
    cfg = loop.config
    model = loop.model
    if loop.tokenizer is None or not cfg.sample_prompt:
        return ""
    idx = text_to_token_ids(cfg.sample_prompt, loop.tokenizer).to(loop.device)
    idx = idx[:, -model.cfg.context_length:]  # only the end of a long prompt is read
    gen = torch.Generator(loop.device).manual_seed(cfg.sample_seed) if cfg.sample_temperature else None
    out = generate(model, idx, cfg.sample_tokens, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                   generator=gen)
    return token_ids_to_text(out, loop.tokenizer)


def _stop_requested(loop: _Loop) -> bool:
    """Whether a stop was asked for (by a signal) in any process: all stop at the same step."""
    return sum_over_ranks([float(loop.interrupt.requested)], loop.device)[0] > 0


def _checkpoint(loop: _Loop) -> None:
    """Save everything needed to resume into ``run_dir`` (rank 0 writes; every process
    contributes its random state), unless saved at this step already. Signals cannot
    interrupt the save."""
    if loop.run_dir is None or loop.saved_step == loop.step:
        return
    loop.saved_step = loop.step
    rngs = rng_state_of_all_ranks(loop.device)  # collective: every process takes part
    if loop.rank != 0:
        return
    with loop.interrupt.save_guard():
        save_checkpoint(loop.run_dir, loop.model, loop.optimizer, loop.scaler, step=loop.step, epoch=loop.epoch,
                        batch_in_epoch=loop.batch_in_epoch, tokens_seen=loop.tokens_seen,
                        history=loop.history.to_dict(), rng_states=rngs)
