"""Measuring a model (book ch. 5): how surprised is it by the tokens that really come next?

The one idea: the loss of one prediction is ``-log p(the true next token)``, the
cross-entropy; a model's loss on a text is the mean over all of its predictions.

* :func:`calc_loss_batch`: the book's function, one batch of ``(inputs, targets)``;
* :data:`LossFn`: the shape of every loss the training loop can use,
  ``loss_fn(model, batch) -> scalar``, with the batch already on the model's device
  (:func:`to_device`). :func:`next_token_loss` is pretraining's; classification,
  instruction and preference tuning bring their own and share the loop. A loss may
  also return ``(scalar, metrics)``, figures to log beside it (:func:`loss_and_metrics`);
* :func:`calc_loss_loader`, :func:`evaluate_model`: the mean over a whole loader (or its
  first batches): every batch counts by its number of scored targets, so the result is
  the true mean over the split, a last short batch included;
* :func:`perplexity`: the loss as "as unsure as choosing among this many tokens" (the
  perplexity of one long text is evaluation's: :mod:`minigpt.evaluation.perplexity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.models.base import evaluating
from minigpt.models.decoder import Decoder
from minigpt.runtime.linear import Linear
from minigpt.training.head_loss import head_cross_entropy

IGNORE_INDEX = -100  # targets with this id add nothing to the loss (padding, prompts)

# A loss function maps (the model, one batch from the loader, on the device) to a scalar loss,
# or to (scalar loss, {name: figure}) with figures to record beside the loss (each a mean over the batch).
Metrics = Mapping[str, torch.Tensor | float]
LossFn = Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, Metrics]]

# Keys by which a dict batch states its own counts (see scored_targets and input_tokens).
NUM_SCORED = "num_scored"
NUM_TOKENS = "num_tokens"


def loss_and_metrics(output: torch.Tensor | tuple[torch.Tensor, Metrics]) -> tuple[torch.Tensor, dict[str, Any]]:
    """What a :data:`LossFn` returned as ``(loss, metrics)``: a bare loss has no metrics."""
    if isinstance(output, (tuple, list)):
        loss, metrics = output
        return loss, dict(metrics)
    return output, {}


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it moved to ``device``: a tensor, or tuples, lists and
    dicts of them (nested); anything else is returned unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device: torch.device | str
) -> torch.Tensor:
    """Mean cross-entropy of one batch: ``(batch, tokens)`` ids and targets -> a scalar.

    Every position is one prediction: the logits ``(batch, tokens, vocab)`` are flattened
    to ``(batch * tokens, vocab)`` rows scored against the ``batch * tokens`` targets.
    Targets equal to ``-100`` are skipped (fine-tuning marks padding and prompts so).
    A model whose head :func:`plain_head_weight` finds gets the head and the loss in one
    (:func:`~minigpt.training.head_loss.head_cross_entropy`), which never holds all the logits.
    """
    inputs = input_batch.to(device)
    targets = target_batch.to(device).flatten()
    weight = plain_head_weight(model)
    if weight is not None:
        # The head and its loss in one, a chunk of rows at a time (minigpt.training.head_loss):
        # the (batch * tokens, vocab) logits never exist whole. Same loss, same gradients.
        hidden = model(inputs, head=False)  # (batch, tokens, emb_dim)
        return head_cross_entropy(hidden.flatten(0, 1), weight, targets, ignore_index=IGNORE_INDEX)
    logits = model(inputs)
    # float32 for the softmax even under autocast: its sums lose digits in 16 bits.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX)


def plain_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The output head's ``(vocab, emb_dim)`` weight where :func:`calc_loss_batch` may apply the
    head itself: a :class:`~minigpt.models.decoder.Decoder` (it can stop before its head) whose head
    is a plain linear layer without bias. None for anything else (a LoRA, quantized or classifier
    head with a bias, a wrapped model), and inside ``torch.compile``, which fuses the loss itself."""
    head = getattr(model, "out_head", None)
    if (not isinstance(model, Decoder) or type(head) not in (nn.Linear, Linear) or head.bias is not None
            or type(head.weight) is not nn.Parameter or torch.compiler.is_compiling()):
        return None
    return head.weight


def language_model_loss(loss_fn: LossFn) -> LossFn:
    """Mark ``loss_fn`` as a mean cross-entropy over next tokens: its exponential is a
    perplexity, which the training loop then logs beside it (a preference or any other loss
    gets no perplexity: exp of it means nothing)."""
    loss_fn.is_language_model_loss = True
    return loss_fn


def has_perplexity(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` was marked with :func:`language_model_loss`."""
    return getattr(loss_fn, "is_language_model_loss", False)


@language_model_loss
def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The default :data:`LossFn`: ``batch`` is ``(inputs, targets)``, scored by :func:`calc_loss_batch`."""
    input_batch, target_batch = batch
    return calc_loss_batch(input_batch, target_batch, model, input_batch.device)


def scored_targets(batch: Any) -> int:
    """How many predictions the mean loss of ``batch`` averages over: its targets (the
    second item of an ``(inputs, targets, ...)`` batch, or ``batch["targets"]``) that are
    not ``-100``. A batch of another shape counts its rows (the first tensor's length),
    unless it is a dict that states the count itself as ``batch["num_scored"]`` (e.g. the
    pairs of a preference batch)."""
    if isinstance(batch, Mapping) and NUM_SCORED in batch:
        return int(batch[NUM_SCORED])
    if isinstance(batch, Mapping) and "targets" in batch:
        targets = batch["targets"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        targets = batch[1]
    else:
        first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
        return len(first)
    return int((targets != IGNORE_INDEX).sum())


def input_tokens(batch: Any) -> int:
    """How many tokens ``batch`` feeds the model: the size of its first tensor (the input ids),
    or what a dict batch states as ``batch["num_tokens"]`` (a preference batch feeds two)."""
    if isinstance(batch, Mapping) and NUM_TOKENS in batch:
        return int(batch[NUM_TOKENS])
    while not isinstance(batch, torch.Tensor):
        batch = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return batch.numel()


@torch.no_grad()
def summed_loss(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
    loss_fn: LossFn = next_token_loss,
) -> tuple[float, int]:
    """``(sum of every scored prediction's loss, number of scored predictions)`` over the
    first ``num_batches`` batches (all when None). ``(0.0, 0)`` for an empty loader.

    Sums rather than a mean, so that several processes (or splits) can be combined
    exactly: ``sum(totals) / sum(counts)``. Batches whose targets are all ``-100`` score
    nothing and are skipped (their mean loss would be NaN).
    """
    total, count, _ = summed_loss_and_metrics(data_loader, model, device, num_batches, loss_fn)
    return total, count


@torch.no_grad()
def summed_loss_and_metrics(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
    loss_fn: LossFn = next_token_loss,
) -> tuple[float, int, dict[str, float]]:
    """:func:`summed_loss` plus the sums of the metrics the loss function returns beside
    the loss, each weighted like the loss by its batch's count: ``sums[name] / count`` is
    the metric's mean over every scored item. Empty for a loss without metrics."""
    total = 0.0
    count = 0
    sums = {}
    for i, batch in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        n = scored_targets(batch)
        if n:
            loss, metrics = loss_and_metrics(loss_fn(model, to_device(batch, device)))
            total += loss.item() * n
            count += n
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
    return total, count, sums


def calc_loss_loader(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
    loss_fn: LossFn = next_token_loss,
) -> float:
    """Mean loss per scored target over the first ``num_batches`` batches: an estimate
    over those batches, or, when ``num_batches`` is None, the loss over the whole loader.

    Each batch counts by its number of scored targets (see :func:`scored_targets`), so a
    last, shorter batch weighs what it holds and the result is the true mean over the
    split, not a mean of batch means. An empty loader is an error: there is nothing to
    measure.
    """
    total, count = summed_loss(data_loader, model, device, num_batches, loss_fn)
    if count == 0:
        raise ValueError(
            "there is nothing to measure the loss on: the loader yields no batches (or only fully masked "
            "targets). Its split is shorter than one window: use a shorter context length, give that split "
            "a larger share of the text, or use a larger corpus")
    return total / count


def evaluation_scope(data_loader: Iterable, num_batches: int | None) -> str:
    """What a loss over the first ``num_batches`` batches of ``data_loader`` measures:
    ``"whole split"``, or ``"estimate over 5 of 12 batches"``."""
    try:
        total = len(data_loader)
    except TypeError:  # a loader of unknown length
        total = None
    if num_batches is None or (total is not None and num_batches >= total):
        return "whole split"
    return f"estimate over {num_batches} of {total} batches" if total is not None else \
        f"estimate over {num_batches} batches"


def evaluate_model(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    device: torch.device | str,
    eval_iter: int | None,
    loss_fn: LossFn = next_token_loss,
) -> tuple[float, float]:
    """``(train loss, validation loss)`` over ``eval_iter`` batches of each (all when
    None), with dropout off; the model's mode is restored afterwards."""
    with evaluating(model):
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, loss_fn)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, loss_fn)
    return train_loss, val_loss


def perplexity(loss: float) -> float:
    """``exp(loss)``: the number of tokens the model is, on average, as unsure as if
    choosing uniformly among (50,257 for an untrained GPT-2, 1 for a perfect one)."""
    return math.exp(loss) if loss < 709 else math.inf  # exp overflows a float beyond 709
