"""The job behind ``minigpt finetune ppo``: RLHF's second stage, the loop a learner reads in one sitting.

Each update (one rollout)::

    1 act       sample an answer to each of batch_size prompts (minigpt.finetuning.rollout)
    2 score     the policy's, the reference's and the value model's view of every answer token,
                and the reward model's score of each whole answer (a missing end-of-text may cost
                missing_eos_penalty)
    3 reward    the score on the last token minus kl_coef times each token's KL to the reference
    4 advantage GAE(gamma, lam), whitened over the batch's answer tokens
    5 learn     ppo_epochs passes of minibatch steps on the clipped surrogate + the value loss

The reference is the policy with its LoRA adapters off (``--lora-rank``, no second copy) or a
frozen copy. Policy and value model train as one module with one optimizer and are checkpointed
atomically every ``eval_every`` updates and on Ctrl-C; ``--resume`` repeats the run exactly. The
held-out prompts (the test split of the preference data) are answered before and after with one
fixed seed, and scored by the reward model and the KL to the reference.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from minigpt.finetuning.instruction import split_instruction_data
from minigpt.finetuning.ppo import (
    AdaptiveKLController,
    gae,
    kl_penalised_rewards,
    masked_whiten,
    ppo_losses,
    token_values,
)
from minigpt.finetuning.preference import load_preference_data
from minigpt.finetuning.reference import AdaptersOffReference, FrozenReference, Reference, disable_dropout
from minigpt.finetuning.reward import load_reward_model, reward_scores
from minigpt.finetuning.rollout import Rollout, RolloutSettings, answer_logprobs, sample_rollouts
from minigpt.io.files import write_json
from minigpt.jobs.finetune import FinetuneConfig, add_lora, choose_prompt_format, job_default, setup
from minigpt.jobs.instruct import InstructConfig
from minigpt.jobs.reward import RewardConfig
from minigpt.lora.adapters import lora_disabled, merge_lora
from minigpt.models.base import evaluating
from minigpt.runtime.runtime import rng_state
from minigpt.training.checkpoint import load_checkpoint, save_checkpoint, save_settings
from minigpt.training.history import TrainingInterrupted
from minigpt.training.interrupt import GracefulInterrupt
from minigpt.training.optim import create_optimizer
from minigpt.training.plots import plot_ppo

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PPOConfig(FinetuneConfig):
    """Settings of :func:`finetune_ppo`; the PPO defaults are TRL's ``PPOConfig``'s."""

    model: str = field(default=InstructConfig.__dataclass_fields__["output"].default, metadata={
        "help": "the instruction-tuned model to align (the output of finetune instruct)"})
    reward_model: str = field(default=RewardConfig.__dataclass_fields__["output"].default, metadata={
        "help": "the reward model (the output of finetune reward); the value model starts as a copy"})
    output: str = job_default("output", "runs/ppo")
    epochs: int = job_default("epochs", 1)
    lr: float = job_default("lr", 3e-6)
    eval_every: int = field(default=10, metadata={"help": "updates between checkpoints"})
    data: str | None = field(default=None, metadata={
        "help": "a JSON list of {instruction, input, ...}: the prompts", "none": "the book's 1,100 pairs"})
    subset: int | None = field(default=None, metadata={"help": "use only the first N prompts", "none": "all"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest sampled answer in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    kl_coef: float = field(default=0.05, metadata={"help": "beta: the price of each unit of KL to the reference"})
    target_kl: float | None = field(default=None, metadata={
        "help": "adapt kl_coef towards this KL per answer (Ziegler et al.)", "none": "a fixed kl_coef"})
    kl_horizon: float = field(default=10000.0, metadata={"help": "the adaptive controller's horizon"})
    gamma: float = field(default=1.0, metadata={"help": "discount per token"})
    lam: float = field(default=0.95, metadata={"help": "GAE's lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "the policy ratio's clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "the value prediction's clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    minibatches: int = field(default=1, metadata={"help": "minibatches per pass"})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "subtracted from the score of an answer without end-of-text", "none": "none"})
    held_out: int = field(default=32, metadata={"help": "held-out prompts answered before and after"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize:
            raise ValueError("--quantize is not supported by finetune ppo: train LoRA on the full-precision model")
        for name in ("max_new_tokens", "ppo_epochs", "minibatches", "held_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.minibatches > self.batch_size:
            raise ValueError(f"minibatches ({self.minibatches}) cannot exceed batch_size ({self.batch_size})")
        if not (self.kl_coef >= 0 and 0 <= self.gamma <= 1 and 0 <= self.lam <= 1 and self.cliprange > 0):
            raise ValueError("need kl_coef >= 0, gamma and lam in [0, 1] and cliprange > 0")


class PolicyAndValue(nn.Module):
    """The two trained models as one module: one optimizer, one checkpoint."""

    def __init__(self, policy: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value = value


def reference_logprobs(reference: Reference, rollout: Rollout) -> torch.Tensor:
    """The reference's ``(b, T - 1)`` log-probabilities of the rollout's answer tokens."""
    adapters_off = lora_disabled(reference.model) if isinstance(reference, AdaptersOffReference) else nullcontext()
    with torch.no_grad(), evaluating(reference.model), adapters_off:
        return answer_logprobs(reference.model, rollout)


def fitting_prompts(entries: list[dict], run: Any, max_new_tokens: int) -> list[list[int]]:
    """The entries' prompts as ids; one that leaves no room for an answer is skipped, logged."""
    fmt = run.prompt_format
    limit = run.model.cfg.context_length
    prompts = []
    for i, entry in enumerate(entries):
        ids = fmt.encode(fmt.prompt(entry) + fmt.header, tokenizer=run.tokenizer)
        if len(ids) + max_new_tokens > limit:
            logger.warning("prompt %d skipped: %d tokens + %d answer tokens exceed the context of %d",
                           i, len(ids), max_new_tokens, limit)
        else:
            prompts.append(ids)
    return prompts


def score(rollout: Rollout, reward_model: nn.Module, penalty: float | None) -> torch.Tensor:
    """The reward model's ``(b,)`` scores; a NaN or infinite one is an error, never a silent NaN."""
    with torch.no_grad():
        scores = reward_scores(reward_model, rollout.ids, rollout.last_index, rollout.attention_mask)
    if not torch.isfinite(scores).all():
        raise FloatingPointError(f"the reward model returned {scores.tolist()}: check that it was trained "
                                 "(finetune reward) and loads in full precision")
    return scores - penalty * (~rollout.ended) if penalty else scores


def evaluate(policy: nn.Module, reference: Reference, reward_model: nn.Module, prompts: list[list[int]],
             settings: RolloutSettings, seed: int) -> dict[str, float]:
    """Held-out answers sampled with one fixed seed (the global generator is left as it was):
    the mean and standard deviation of their scores and their mean KL to the reference."""
    with torch.random.fork_rng(), evaluating(policy):
        torch.manual_seed(seed)
        rollout = sample_rollouts(policy, prompts, settings)
        with torch.no_grad():
            kl = (answer_logprobs(policy, rollout) - reference_logprobs(reference, rollout)).sum(dim=1)
        scores = score(rollout, reward_model, None)
    return {"score_mean": scores.mean().item(), "score_std": scores.std().item(), "kl_mean": kl.mean().item()}


def ppo_update(models: PolicyAndValue, optimizer: torch.optim.Optimizer, reference: Reference,
               reward_model: nn.Module, prompts: list[list[int]], s: PPOConfig, rollouts: RolloutSettings,
               kl_coef: float) -> dict[str, float]:
    """One rollout and its PPO epochs; returns the update's logs under TRL's names."""
    policy = models.policy
    value_model = models.value
    with torch.no_grad(), evaluating(models):  # 1-3: act and score, no dropout
        rollout = sample_rollouts(policy, prompts, rollouts)
        mask = rollout.answer_mask[:, 1:].bool()
        logprobs = answer_logprobs(policy, rollout)
        ref_logprobs = reference_logprobs(reference, rollout)
        values = token_values(value_model, rollout)
        scores = score(rollout, reward_model, s.missing_eos_penalty)
        rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)  # 4
        advantages = masked_whiten(advantages, mask) * mask
    stats: dict[str, list[float]] = {}
    for _ in range(s.ppo_epochs):  # 5: minibatch steps, in an order drawn from the (checkpointed) generator
        for rows in torch.randperm(len(prompts)).chunk(s.minibatches):
            part = Rollout(rollout.ids[rows], rollout.attention_mask[rows], rollout.answer_mask[rows],
                           rollout.prompt_lengths[rows], rollout.ended[rows], rollout.prompt_width)
            out = ppo_losses(answer_logprobs(policy, part), logprobs[rows], advantages[rows],
                             token_values(value_model, part), values[rows], returns[rows], mask[rows],
                             s.cliprange, s.cliprange_value, s.vf_coef)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            nn.utils.clip_grad_norm_(models.parameters(), 1.0)
            optimizer.step()
            for name in ("policy", "value", "clipfrac", "approxkl", "ratio"):
                stats.setdefault(name, []).append(getattr(out, name))
    kl_sum = kl.sum(dim=1).mean().item()
    non_score = (-kl_coef * kl).sum(dim=1).mean().item()
    mean = {name: sum(v) / len(v) for name, v in stats.items()}
    return {"objective/kl": kl_sum, "objective/entropy": (-logprobs * mask).sum(dim=1).mean().item(),
            "objective/non_score_reward": non_score, "objective/rlhf_reward": non_score + scores.mean().item(),
            "objective/scores": scores.mean().item(), "objective/kl_coef": kl_coef,
            "policy/approxkl_avg": mean["approxkl"], "policy/clipfrac_avg": mean["clipfrac"],
            "loss/policy_avg": mean["policy"], "loss/value_avg": mean["value"], "val/ratio": mean["ratio"],
            "val/num_eos_tokens": int(rollout.ended.sum())}


def finetune_ppo(settings: PPOConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Optimise ``settings.model`` against ``settings.reward_model`` with PPO; see the module
    docstring. ``settings.output`` receives the policy (LoRA merged), ``ppo.png``,
    ``ppo_logs.json`` (one value per update and name), ``samples.json`` and ``metrics.json``
    (returned): ``held_out_before``/``held_out_after`` score mean, standard deviation and KL."""
    s = settings
    entries = load_preference_data(s.data)[:s.subset]
    run = setup(s, resume=resume, progress=progress)
    run.prompt_format = choose_prompt_format("auto", s.model, run.tokenizer)
    train_part, _, test_part = split_instruction_data(entries)
    train_prompts = fitting_prompts(train_part, run, s.max_new_tokens)
    held_out = fitting_prompts(test_part, run, s.max_new_tokens)[:s.held_out]
    if len(train_prompts) < s.batch_size or not held_out:
        raise ValueError(f"{len(train_prompts)} training and {len(held_out)} held-out prompts fit the context with "
                         f"{s.max_new_tokens} answer tokens; need batch_size={s.batch_size} and 1: lower "
                         "--max-new-tokens or use more data")
    policy = disable_dropout(run.model)
    add_lora(run)
    reference = AdaptersOffReference(policy) if s.lora_rank else FrozenReference(policy)
    reward_model = load_reward_model(s.reward_model, run.device).requires_grad_(False)
    models = PolicyAndValue(policy, disable_dropout(load_reward_model(s.reward_model).train())).to(run.device)
    optimizer = create_optimizer(models, s.lr, s.weight_decay)
    eos = run.tokenizer.eot_token if hasattr(run.tokenizer, "eot_token") else None
    rollouts = RolloutSettings(max_new_tokens=s.max_new_tokens, temperature=s.temperature, eos_id=eos,
                               pad_id=eos or 0)
    per_epoch = len(train_prompts) // s.batch_size
    total = s.epochs * per_epoch
    update = 0  # where the run stands: a resumed run reads both back
    logs = {}
    run.output.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_checkpoint(run.output, models, optimizer)
        update = state.step
        logs = state.history
    save_settings(run.output, s.to_dict())
    kl = AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon) if s.target_kl else None
    kl_coef = logs["objective/kl_coef"][-1] if kl and logs else s.kl_coef
    before = logs.get("held_out_before") or evaluate(policy, reference, reward_model, held_out, rollouts, s.seed)
    logs["held_out_before"] = before
    logger.info("PPO: %d updates of %d prompts | reference: %s | held-out score %.3f (sd %.3f)", total,
                s.batch_size, "adapters off" if s.lora_rank else "frozen copy", before["score_mean"],
                before["score_std"])

    def checkpoint() -> None:
        save_checkpoint(run.output, models, optimizer, step=update, epoch=update // max(per_epoch, 1),
                        batch_in_epoch=update % max(per_epoch, 1), tokens_seen=0, history=logs,
                        rng_states=[rng_state(run.device)])

    interrupt = GracefulInterrupt()
    with interrupt, tqdm(total=total, initial=update, desc="ppo", unit="update", disable=not progress) as bar:
        while update < total:
            if interrupt.requested:
                with interrupt.save_guard():
                    checkpoint()
                raise TrainingInterrupted(update, run.output, interrupt.exit_code, interrupt.signal_name)
            epoch, index = divmod(update, per_epoch)
            order = torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(s.seed + epoch))
            batch = [train_prompts[i] for i in order[index * s.batch_size:(index + 1) * s.batch_size].tolist()]
            step = ppo_update(models, optimizer, reference, reward_model, batch, s, rollouts, kl_coef)
            for name, value in step.items():
                logs.setdefault(name, []).append(value)
            if kl is not None:
                kl.value = kl_coef
                kl_coef = kl.update(step["objective/kl"], s.batch_size)
            update += 1
            bar.update(1)
            bar.set_postfix(score=f"{step['objective/scores']:.3f}", kl=f"{step['objective/kl']:.3f}")
            if update % s.eval_every == 0 or update == total:
                with interrupt.save_guard():
                    checkpoint()
    after = evaluate(policy, reference, reward_model, held_out, rollouts, s.seed)
    if s.lora_rank:
        merge_lora(policy)
    policy.save_pretrained(run.output)
    plot_ppo(logs, run.output / "ppo.png")
    write_json(run.output / "ppo_logs.json", logs)
    metrics = {"updates": total, "held_out": len(held_out), "held_out_before": before, "held_out_after": after,
               "kl_coef": kl_coef, "gain_in_sd": (after["score_mean"] - before["score_mean"])
               / max(before["score_std"], 1e-8)}
    write_json(run.output / "metrics.json", metrics)
    logger.info("held-out score %.3f -> %.3f (%.2f standard deviations), KL %.3f", before["score_mean"],
                after["score_mean"], metrics["gain_in_sd"], after["kl_mean"])
    return metrics
