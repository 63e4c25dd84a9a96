"""Direct preference optimisation, DPO (Rafailov et al. 2023): learn from pairs of answers
without a reward model.

The one idea: a model's *implicit reward* for an answer ``y`` to a prompt ``x`` is how much
more likely it makes ``y`` than a frozen reference model (the model before this training)::

    reward(y) = beta * (log pi(y | x) - log ref(y | x))

and DPO raises the reward of the chosen answer above the rejected one's (eq. 7)::

    h    = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))
    loss = -log sigmoid(beta * h)

``beta`` sets how far the model may move from the reference: a small beta lets it drift
further. Everything here is built from :func:`sequence_logprobs`, the log-probability of
an answer given its prompt, summed over the answer's tokens.

The reference can be a frozen copy (:class:`FrozenReference`), the same LoRA model with its
adapters switched off (:class:`AdaptersOffReference`, no second copy in memory), or
log-probabilities computed once before training and stored with the data
(:func:`precompute_reference`). :class:`DPOLoss` is the loss for the shared training loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.finetuning.reference import FrozenReference, Reference, disable_dropout, pair_logprobs

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean preference loss over a batch of pairs, and its figures under TRL's names.

    Inputs are log-probabilities ``(batch,)`` of the answers under the policy and the
    reference. With ``h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)``:

    * ``"sigmoid"`` (DPO): ``-(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)``,
      ``eps = label_smoothing``, the share of labels assumed flipped (conservative DPO);
    * ``"ipo"`` (Azar et al. 2023): ``(h - 1 / (2 * beta)) ** 2``, meant for log-probabilities
      *averaged* over the answer's tokens (:class:`DPOLoss` gives it those);
    * ``"hinge"`` (SLiC): ``max(0, 1 - beta * h)``.

    Metrics (detached means over the pairs): ``rewards/chosen`` = ``beta * (policy_chosen -
    ref_chosen)``, ``rewards/rejected`` likewise, ``rewards/margins`` (their difference) and
    ``rewards/accuracies``, the share of pairs whose chosen reward is strictly higher
    (0 while the policy equals the reference).
    """
    _check_settings(beta, label_smoothing, loss_type)
    # h is the difference of two log-ratios: log(pi/ref)(chosen) - log(pi/ref)(rejected). The
    # reference terms make it measure how far training *moved* the preference, not where it is.
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        # Bradley-Terry on the implicit rewards beta * log(pi/ref): -log sigmoid(beta * h). A large
        # beta saturates the loss at a small h, so the policy stays near the reference; a small beta
        # lets it drift further. logsigmoid stays exact where sigmoid would round to 0.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO regresses h onto a fixed target 1 / (2 beta) instead of pushing it to infinity: the
        # sigmoid loss keeps rewarding a larger margin even on pairs it already separates.
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        # Hinge: pairs whose scaled margin beta * h already exceeds 1 contribute nothing.
        losses = torch.relu(1 - beta * h)
    # The implicit rewards, logged only (detached): beta * log(pi/ref) of each answer.
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
               "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean()}
    # Mean over pairs: the training loop weighs batches by num_scored, the number of pairs.
    return losses.mean(), metrics


def _check_settings(beta: float, label_smoothing: float, loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    # At 0.5 the two terms weigh the same and the loss no longer prefers either answer.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not to {loss_type!r}; set it to 0")


# --- The reference ---------------------------------------------------------------------------


class DPOLoss:
    """The DPO loss for :func:`minigpt.training.loop.train_model`: ``loss_fn(model, batch) ->
    (loss, metrics)`` on batches of :func:`minigpt.finetuning.preference.collate_preferences`.

    ``reference``: a :class:`FrozenReference` or :class:`AdaptersOffReference`; a model is
    taken as ``FrozenReference(model)`` (a frozen copy made now); None when every batch
    carries precomputed values (:func:`precompute_reference`), which are used whenever
    present. ``beta``, ``label_smoothing``, ``loss_type``: see :func:`dpo_loss`; for "ipo" the
    log-probabilities are averaged over each answer's tokens. The policy's dropout is
    switched off (:func:`disable_dropout`) at each call.
    """

    def __init__(self, reference: Reference | nn.Module | None = None, beta: float = 0.1,
                 label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> None:
        _check_settings(beta, label_smoothing, loss_type)
        # A bare model becomes a frozen copy *now*, before the policy trains away from it.
        self.reference = FrozenReference(reference) if isinstance(reference, nn.Module) else reference
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.loss_type = loss_type

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        disable_dropout(model)
        # IPO's target 1 / (2 beta) assumes per-token (averaged) log-probabilities: a sum grows with
        # the answer's length and would never sit at a fixed target.
        average = self.loss_type == "ipo"
        # The reference first, without gradients; then the policy's forward, whose graph the
        # backward pass needs.
        ref_chosen, ref_rejected = self.reference_logps(batch, average)
        policy_chosen, policy_rejected = pair_logprobs(model, batch, average)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing,
                        self.loss_type)

    def reference_logps(self, batch: Mapping[str, Any], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ``(chosen, rejected)`` log-probabilities of ``batch``: precomputed
        ones when the batch carries them, else from the reference model."""
        if "ref_chosen_logps" in batch:
            chosen = batch["ref_chosen_logps"]
            rejected = batch["ref_rejected_logps"]
            if average:  # stored as sums: divide by the same token counts as sequence_logprobs
                # clamp(min=1): a pair whose answer was cut away entirely scores 0, not NaN.
                chosen = chosen / batch["chosen_mask"][:, 1:].sum(dim=1).clamp(min=1)
                rejected = rejected / batch["rejected_mask"][:, 1:].sum(dim=1).clamp(min=1)
            return chosen, rejected
        if self.reference is None:
            raise ValueError("this batch carries no precomputed reference log-probabilities and DPOLoss has no "
                             "reference model: call precompute_reference(...) on the dataset, or give a reference")
        return self.reference.logps(batch, average)


