"""Group-relative policy optimisation, GRPO (Shao et al. 2024, DeepSeekMath): reinforcement
learning from checked answers without a value model.

The one idea: sample ``G`` answers to the same prompt and score each one; an answer's
*advantage* is how much better it scored than its own group::

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

PPO learns a value network to say what score to expect; GRPO asks the other answers to the
same question instead, so no critic is trained or held in memory. Every token of answer
``i`` then gets the PPO-style clipped objective with ``A_i``, and a KL term keeps the
policy near the reference (the model before RL)::

    ratio_t = pi(o_t | ...) / pi_old(o_t | ...)
    loss_t  = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i) + beta * k3_t
    k3_t    = ref/pi - log(ref/pi) - 1          (Schulman's k3: >= 0, an unbiased KL estimate)

How the token losses become one number matters (``averaging``):

* ``"token"`` (default; TRL's ``bnpo``, DAPO's choice): the mean over every answer token of
  the batch, so every token weighs the same;
* ``"sequence"`` (the paper's ``1/|o_i|``; TRL's ``grpo``): the mean of each answer's token
  mean, so every *answer* weighs the same and a token of a short answer weighs more than a
  token of a long one: a long wrong answer is pushed down less per token than a short one.

The formulas follow TRL 0.19.0's ``trl/trainer/grpo_trainer.py`` (``_generate_and_score_completions``
and ``_compute_loss``): the standard deviation is the unbiased one, ``eps = 1e-4``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn

from minigpt.finetuning.instruction import end_of_text_id
from minigpt.finetuning.reference import AdaptersOffReference, Reference, disable_dropout
from minigpt.finetuning.reward_tasks import RewardFn, reward_table
from minigpt.finetuning.rollout import Rollout, RolloutSettings, answer_logprobs, check_prompt_lengths, sample_rollouts
from minigpt.lora.adapters import lora_disabled
from minigpt.models.base import evaluating
from minigpt.training.losses import NUM_SCORED, NUM_TOKENS

logger = logging.getLogger(__name__)

AVERAGING = ("token", "sequence")
STD_EPS = 1e-4  # added to the group's standard deviation: a group of equal rewards gets advantages 0, not 0/0


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """``(prompts, G)`` rewards -> ``(prompts, G)`` advantages: each reward minus its
    group's mean, divided by the group's (unbiased) standard deviation plus :data:`STD_EPS`
    when ``scale`` (Dr. GRPO argues for ``scale=False``: hard and easy prompts then weigh alike).

    A group needs two answers at least: with one, the answer is its own baseline and
    learns nothing (and the unbiased standard deviation is 0/0)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (prompts, answers per prompt), got {tuple(rewards.shape)}")
    if rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(f"an empty group of rewards, shape {tuple(rewards.shape)}: each prompt needs its answers' "
                         "rewards")
    if rewards.shape[1] == 1:
        raise ValueError("a group of 1 answer: GRPO compares each answer with the others to the same prompt, so a "
                         "lone answer's advantage is always 0; sample 2 or more answers per prompt")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite: skip the groups with a NaN reward before computing advantages")
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    return advantages / (rewards.std(dim=1, keepdim=True) + STD_EPS) if scale else advantages


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate of the policy from the reference at tokens sampled from the
    policy: ``exp(ref - logp) - (ref - logp) - 1``, shapes as the inputs. Always >= 0, 0
    where the two agree, and its mean is ``KL(pi || ref)`` (the log-ratio alone, k1, has
    the same mean but negative samples and a larger variance)."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    averaging: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a batch of answers and its figures under TRL's names.

    ``logps``: ``(answers, T)`` log-probabilities of the sampled tokens under the policy
    (with gradients); ``old_logps``: the same under the policy that sampled them (equal in
    value when each rollout gets one update, so the ratio is 1 and only its gradient
    counts); ``advantages``: ``(answers,)``; ``mask``: ``(answers, T)``, 1 on answer tokens.
    ``ref_logps`` is needed when ``beta > 0``. ``epsilon_high`` defaults to ``epsilon_low``.

    Metrics (detached): ``kl`` (the mean k3 over answer tokens, when ``beta > 0``) and
    ``clip_ratio`` (the share of answer tokens whose ratio left the clip range in the
    direction the advantage pushes: there the gradient is 0).
    """
    _check_loss_settings(beta, epsilon_low, averaging)
    if ref_logps is None and beta:
        raise ValueError(f"beta={beta} needs ref_logps, the reference's log-probabilities (or set beta to 0)")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1)  # (answers, 1): one advantage for every token of an answer
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    # The pessimistic choice: a token may not gain more than the clipped ratio allows.
    per_token = -torch.min(ratio * adv, clipped * adv)
    tokens = mask.sum().clamp(min=1)
    metrics = {}
    if beta:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / tokens).detach()
    if averaging == "token":
        loss = (per_token * mask).sum() / tokens
    else:
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    outside = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    metrics["clip_ratio"] = ((outside * mask).sum() / tokens).detach()
    return loss, metrics


def _check_loss_settings(beta: float, epsilon_low: float, averaging: str) -> None:
    if averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {', '.join(AVERAGING)}, got {averaging!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be 0 or more (DeepSeekMath uses 0.04), got {beta}")
    if not 0 < epsilon_low < 1:
        raise ValueError(f"epsilon must be between 0 and 1 (PPO's usual value is 0.2), got {epsilon_low}")


def total_rewards(table: torch.Tensor, rewards: Mapping[str, tuple[RewardFn, float]],
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompts, G)`` weighted sums of :func:`reward_table`'s rows and a ``(prompts,)``
    bool mask of the groups to keep: a group with any NaN reward is skipped (and logged),
    since its mean would be NaN and so would every advantage in it."""
    if group_size < 1 or table.shape[0] % group_size:
        raise ValueError(f"{table.shape[0]} answers do not split into groups of {group_size}")
    weights = torch.tensor([weight for _, weight in rewards.values()], dtype=table.dtype)
    totals = (table * weights).sum(dim=1).view(-1, group_size)
    keep = ~totals.isnan().any(dim=1)
    if not keep.all():
        names = [name for name, column in zip(rewards, table.isnan().any(dim=0), strict=True) if column]
        logger.warning("skipping %d of %d prompts: reward function %s returned NaN for one of their answers",
                       int((~keep).sum()), len(keep), ", ".join(names))
    return totals, keep


# --- Prompts, the loss for the training loop, accuracy ----------------------------------------------


class TokenizedPrompt(NamedTuple):
    """A prompt as the reward functions read it (``text``) and as the model reads it (``ids``)."""

    text: str
    ids: list[int]


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any, context_length: int,
                     max_new_tokens: int) -> list[TokenizedPrompt]:
    """Each prompt with its token ids, checked once before training: a prompt and its longest
    answer must fit the model's context (the error names the prompt's index)."""
    tokenized = [TokenizedPrompt(prompt, tokenizer.encode(prompt)) for prompt in prompts]
    check_prompt_lengths([item.ids for item in tokenized], max_new_tokens, context_length)
    return tokenized


def collate_prompts(items: Sequence[TokenizedPrompt]) -> dict[str, Any]:
    """A batch of prompts for :class:`GRPOLoss`: their texts and ids, and the counts the
    training loop reads (prompts scored, prompt tokens fed)."""
    return {"prompts": [item.text for item in items], "prompt_ids": [item.ids for item in items],
            NUM_SCORED: len(items), NUM_TOKENS: sum(len(item.ids) for item in items)}


def answer_texts(rollout: Rollout, tokenizer: Any) -> list[str]:
    """Each sampled answer as text, without the end-of-text that ended it."""
    return [tokenizer.decode(ids[:-1] if ended else ids)
            for ids, ended in zip(rollout.answers(), rollout.ended.tolist(), strict=True)]


class GRPOLoss:
    """GRPO for :func:`minigpt.training.loop.train_model`: ``loss_fn(model, batch) -> (loss,
    metrics)`` on batches of :func:`collate_prompts`. Each call is one GRPO step's data:

    1. sample ``group_size`` answers per prompt with the policy as it is now (no gradients);
    2. score them with ``rewards`` (``{name: (function, weight)}``), skipping groups with a
       NaN reward; advantages within each group (:func:`group_advantages`);
    3. the log-probabilities of the answers under the policy (with gradients) and, when
       ``beta > 0``, under ``reference`` (a :class:`~minigpt.finetuning.reference.FrozenReference` or
       :class:`~minigpt.finetuning.reference.AdaptersOffReference`);
    4. :func:`grpo_loss`. The rollout gets one update, so ``old_logps`` is the policy's
       own, detached (TRL's default ``num_iterations=1``).

    Metrics under TRL's names: ``reward``, ``reward_std``, ``frac_reward_zero_std``,
    ``rewards/<name>/mean``, ``completions/mean_length``, ``completions/clipped_ratio`` (the
    share of answers that never ended), ``kl``, ``clip_ratio``.
    """

    def __init__(self, rewards: Mapping[str, tuple[RewardFn, float]], tokenizer: Any, sampling: RolloutSettings,
                 group_size: int = 8, *, reference: Reference | None = None, beta: float = 0.04,
                 epsilon: float = 0.2, epsilon_high: float | None = None, averaging: str = "token",
                 scale_rewards: bool = True) -> None:
        _check_loss_settings(beta, epsilon, averaging)
        if group_size < 2:
            raise ValueError(f"group_size must be at least 2: GRPO compares each answer with the others to the same "
                             f"prompt, got {group_size}")
        if beta and reference is None:
            raise ValueError(f"beta={beta} needs a reference model (or set beta to 0)")
        if not rewards:
            raise ValueError("no reward functions given: GRPO needs at least one to score answers")
        self.rewards = dict(rewards)
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.group_size = group_size
        self.reference = reference
        self.beta = beta
        self.averaging = averaging
        self.scale_rewards = scale_rewards
        self.epsilon = epsilon
        self.epsilon_high = epsilon_high

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        disable_dropout(model)
        policy = getattr(model, "module", model)  # sampling needs the model itself, not a wrapper
        group = self.group_size
        with evaluating(policy):
            rollout = sample_rollouts(policy, [ids for ids in batch["prompt_ids"] for _ in range(group)],
                                      self.sampling)
        prompts = [prompt for prompt in batch["prompts"] for _ in range(group)]
        table = reward_table(self.rewards, prompts, answer_texts(rollout, self.tokenizer))
        totals, keep = total_rewards(table, self.rewards, group)
        if not keep.any():
            raise ValueError(f"every group of this batch has a NaN reward (prompts {batch['prompts'][:3]}...): "
                             "the reward functions cannot score these answers; fix them to return numbers")
        rows = keep.repeat_interleave(group).to(rollout.ids.device)
        advantages = group_advantages(totals[keep], self.scale_rewards).flatten().to(rollout.ids.device)
        logps = answer_logprobs(model, rollout)[rows]
        ref_logps = self._reference_logps(rollout)[rows] if self.beta else None
        mask = rollout.answer_mask[rows, 1:]
        loss, metrics = grpo_loss(logps, logps.detach(), advantages, mask, ref_logps=ref_logps, beta=self.beta,
                                  epsilon_low=self.epsilon, epsilon_high=self.epsilon_high, averaging=self.averaging)
        kept = totals[keep]
        metrics.update({"reward": kept.mean(), "reward_std": kept.std(dim=1).mean(),
                        "frac_reward_zero_std": (kept.std(dim=1) == 0).float().mean(),
                        "completions/mean_length": rollout.answer_mask.sum(dim=1).float().mean(),
                        "completions/clipped_ratio": (~rollout.ended).float().mean()})
        for name, column in zip(self.rewards, table.T, strict=True):
            metrics[f"rewards/{name}/mean"] = column.nanmean()
        return loss, metrics

    def _reference_logps(self, rollout: Rollout) -> torch.Tensor:
        """The reference's ``(b, T - 1)`` log-probabilities of the sampled tokens, without gradients."""
        model = self.reference.model
        adapters_off = lora_disabled(model) if isinstance(self.reference, AdaptersOffReference) else nullcontext()
        if _device_of(model) != rollout.ids.device:
            model.to(rollout.ids.device)
        with torch.no_grad(), evaluating(model), adapters_off:
            return answer_logprobs(model, rollout)


def greedy_accuracy(model: nn.Module, tokenizer: Any, prompts: Sequence[str], check: RewardFn,
                    max_new_tokens: int) -> float:
    """The share of ``prompts`` whose greedy answer (up to the end-of-text) ``check`` scores
    1: exact-match accuracy, the figure GRPO should raise on held-out prompts."""
    eos = end_of_text_id(tokenizer)
    sampling = RolloutSettings(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos, pad_id=eos)
    with evaluating(model):
        rollout = sample_rollouts(model, [tokenizer.encode(prompt) for prompt in prompts], sampling)
    answers = answer_texts(rollout, tokenizer)
    return sum(check(prompt, answer) == 1 for prompt, answer in zip(prompts, answers, strict=True)) / len(prompts)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
