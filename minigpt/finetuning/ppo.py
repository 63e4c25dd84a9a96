"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022), the
formulas one at a time. The loop that uses them is :mod:`minigpt.jobs.ppo`.

The one idea: the policy (the language model) is nudged towards answers a reward model scores
high, but each token pays for moving away from the reference (the model it started as)::

    reward[t] = -kl_coef * (log pi(token t) - log ref(token t))      every answer token
              + score(answer)                                         its last token only

Without the KL term the policy finds whatever text the reward model over-rates and forgets
how to write. A **value model** ``V`` (a separate copy of the reward model, as TRL does: its
trunk then learns "how good is this so far" without pulling the policy's features) predicts
the reward still to come after each token, and GAE turns rewards and values into advantages,
how much better a token did than expected::

    delta[t] = reward[t] + gamma * V[t + 1] - V[t]
    A[t]     = delta[t] + gamma * lam * A[t + 1]            returns = A + V

The policy then takes a few epochs of minibatch steps on the **clipped surrogate**: the ratio
``pi_new / pi_old`` of each token may move the loss only within ``1 +- cliprange``, so one
rollout cannot push the policy far. The value model regresses on the returns, its change per
rollout clipped alike.

Every tensor here is ``(b, T - 1)`` in the layout of :func:`minigpt.finetuning.rollout.answer_logprobs`:
column ``t`` scores token ``t + 1``, and ``mask`` selects answer tokens. Formulas and logged
names follow TRL's ``PPOTrainer`` (trl/trainer/ppo_trainer.py and trl/trainer/utils.py, v0.11
to v0.19).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from minigpt.finetuning.rollout import Rollout


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` where ``mask`` is set (all elements count alike)."""
    mask = mask.bool()
    # Every answer token weighs the same, so long answers count more than short ones (as in TRL);
    # an empty selection gives 0 rather than the NaN of an empty mean.
    return values[mask].mean() if mask.any() else values.new_zeros(())


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the masked elements, with the unbiased
    variance (TRL's ``masked_whiten``); ``shift_mean=False`` keeps the mean. Whitened advantages
    have the same scale whatever the reward model's, so one learning rate fits all."""
    selected = values[mask.bool()]
    # The unbiased variance of one value divides by 0.
    if selected.numel() < 2:
        raise ValueError(f"whitening needs at least 2 answer tokens in the batch, got {selected.numel()}: "
                         "sample longer answers or more prompts per rollout")
    # Statistics over the answer tokens only: prompt and padding columns are 0 and would drag the
    # mean towards 0 and shrink the variance.
    mean = selected.mean()
    var = selected.var(unbiased=True)
    # Whitening the advantages: mean 0 and variance 1 over the batch, so some tokens are pushed up and
    # others down, on the same scale whatever the reward model's; 1e-8 guards a zero variance.
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    # shift_mean=False rescales but keeps the mean (TRL uses it for rewards).
    return whitened if shift_mean else whitened + mean


def token_values(value_model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """``(b, T - 1)``: the value model's estimate after reading ``ids[: t + 1]``, the reward still
    to come from answer token ``t + 1`` on; 0 outside the answer. Gradients flow."""
    # The value head has one output: (b, T, 1) -> column 0. Dropping the last position aligns
    # V[t] with the log-prob layout: column t is the state after reading ids[: t + 1].
    values = value_model(rollout.ids, attention_mask=rollout.attention_mask)[:, :-1, 0].float()
    # Zero outside the answer, so GAE's bootstrap V[t + 1] is 0 after the last answer token.
    return values * rollout.answer_mask[:, 1:]


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, T - 1)`` rewards and per-token KL: ``-kl_coef * kl`` on every answer token, plus the
    ``(b,)`` score on each answer's last token. ``kl = logprobs - ref_logprobs`` (the sampled
    tokens' log-ratio, whose mean over samples is KL(pi || ref)); 0 outside ``mask``."""
    mask = mask.bool()
    # The k1 estimator of KL(pi || ref): log pi(x) - log ref(x) of the sampled token. Unbiased
    # (its mean over samples from pi is the KL), but a single token's value may be negative.
    kl = (logprobs - ref_logprobs).masked_fill(~mask, 0.0)
    # Every answer token pays for its log-ratio: the reward model alone would be exploited.
    rewards = -kl_coef * kl
    columns = torch.arange(mask.shape[1], device=mask.device)
    # The score is a reward for the whole answer, so it lands on the last token only; GAE carries
    # it back to the earlier tokens.
    last = (mask * columns).amax(dim=1)  # the column that scores each answer's last token
    rewards[torch.arange(len(scores), device=mask.device), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): ``(advantages, returns)``, both
    ``(b, T - 1)``, from rewards and values that are 0 outside ``mask``. Walked backwards, so each
    advantage sums the discounted TD errors after it; ``lam`` trades the value model's bias
    (0: one step) against the rewards' variance (1: the whole answer). ``returns = A + V`` are
    the value model's targets; advantages are 0 outside ``mask``."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        # Bootstrap: the value of the next state; beyond the last column there is nothing to come.
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        # The TD error: what this step brought plus what is expected after it, minus what was expected.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # GAE's backward recursion, A[t] = delta[t] + gamma * lam * A[t + 1]: walking from the last
        # column to the first turns the sum of discounted future TD errors into one pass.
        running = delta + gamma * lam * running
        advantages[:, t] = running
    # Returns = A + V, the value model's regression targets (TD(lambda) returns).
    returns = advantages + values
    # Prompt and padding columns may carry nonzero values from the recursion: masked away here.
    return advantages * mask, returns


@dataclass
class PPOLosses:
    """One minibatch's loss and what TRL logs of it (floats, detached)."""

    loss: torch.Tensor
    policy: float
    value: float
    clipfrac: float
    value_clipfrac: float
    approxkl: float
    ratio: float


def ppo_losses(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1) -> PPOLosses:
    """The clipped surrogate and the clipped value loss, averaged over the answer tokens::

        ratio       = exp(new - old)
        policy loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
        value loss  = 0.5 * mean(max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2))
        loss        = policy loss + vf_coef * value loss

    The max of the two (negated) terms is the pessimistic one: a token whose ratio already moved
    past the clip in the direction its advantage wants gets no gradient."""
    log_ratio = new_logprobs - old_logprobs
    # pi_new / pi_old per token, from log-probs: exp of a difference is stabler than a quotient.
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    # PPO's clipped ratio: outside [1 - eps, 1 + eps] the clamp is flat, so it has no gradient.
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    # max of the two *losses* = min of the two objectives: the pessimistic bound. With A > 0 a
    # ratio above 1 + eps earns nothing more; with A < 0 a ratio below 1 - eps neither.
    policy = masked_mean(torch.max(unclipped, clipped), mask)
    # Value clipping: the new prediction may move at most cliprange_value from the rollout's; the
    # max below keeps the worse of clipped and unclipped errors, as for the policy.
    values_clipped = torch.clamp(new_values, old_values - cliprange_value, old_values + cliprange_value)
    value_losses = (new_values - returns) ** 2
    value_losses_clipped = (values_clipped - returns) ** 2
    value = 0.5 * masked_mean(torch.max(value_losses, value_losses_clipped), mask)
    with torch.no_grad():
        stats = dict(policy=float(policy), value=float(value),
                     clipfrac=float(masked_mean((clipped > unclipped).float(), mask)),
                     value_clipfrac=float(masked_mean((value_losses_clipped > value_losses).float(), mask)),
                     # 0.5 * (log r)^2 (the k2 estimator): a non-negative estimate of KL(old || new) for small moves.
                     approxkl=float(0.5 * masked_mean(log_ratio ** 2, mask)),
                     ratio=float(masked_mean(ratio, mask)))
    return PPOLosses(loss=policy + vf_coef * value, **stats)


class AdaptiveKLController:
    """The KL coefficient adapted towards a target KL (Ziegler et al. 2019, section 2.2): after
    each rollout, ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``. Too much KL
    raises the penalty, too little lowers it; ``n`` is the rollout's number of answers."""

    def __init__(self, init: float, target: float, horizon: float) -> None:
        if not (init > 0 and target > 0 and horizon > 0):
            raise ValueError(f"the adaptive KL controller needs init, target and horizon above 0, got "
                             f"{init}, {target}, {horizon}")
        self.value = init
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n: int) -> float:
        """Move the coefficient after a rollout of ``n`` answers whose mean KL was ``kl``; returns it."""
        # A NaN KL would make the coefficient NaN, and every later reward with it.
        if not math.isfinite(kl):
            raise FloatingPointError(f"the KL to the reference is {kl}: the policy diverged; lower the learning rate")
        # Proportional control with the error clipped to +-20 %, so one odd rollout cannot swing the
        # coefficient; n / horizon makes the step size per answer, not per rollout.
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
        return self.value
