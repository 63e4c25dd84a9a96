"""The job behind ``minigpt finetune grpo``: reinforcement learning from checked answers (GRPO).

The one idea: a model improves at a task whose answers can be checked by sampling several
answers to each prompt, scoring them with plain Python functions, and raising the
probability of the answers that beat their group (:mod:`minigpt.finetuning.grpo`). No reward model,
no value model: the rewards of :mod:`minigpt.finetuning.reward_tasks` (or ``--reward module:function``)
and the policy's own answers are all it needs.

A model with random weights (the ``tiny`` preset) has no answers worth comparing, so
``sft_steps`` first teaches it the task's answer format with a short supervised warm-up on
the training problems (resumable in ``<output>/sft``). The model after that is GRPO's
reference. GRPO then runs through the shared training loop (:func:`minigpt.training.loop.train_model`),
so it is checkpointed, stops cleanly on Ctrl-C and resumes exactly. The job reports the
held-out exact-match accuracy (greedy answers) before and after GRPO and plots the reward,
the accuracy of the sampled answers and the KL to the reference (``grpo.png``).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader

from minigpt.finetuning.grpo import AVERAGING, GRPOLoss, collate_prompts, greedy_accuracy, tokenize_prompts
from minigpt.finetuning.instruction import TokenizedExample, collate_instructions, end_of_text_id, instruction_loss
from minigpt.finetuning.reference import AdaptersOffReference, FrozenReference
from minigpt.finetuning.reward_tasks import TASKS, RewardTask, load_reward, load_task
from minigpt.finetuning.rollout import RolloutSettings
from minigpt.jobs.finetune import FinetuneConfig, Run, add_lora, finish, job_default, setup, shuffled_loader, train
from minigpt.models.gpt2.model import GPTModel
from minigpt.training.checkpoint import STATE_FILE, save_settings
from minigpt.training.config import TrainConfig
from minigpt.training.loop import train_model
from minigpt.training.plots import plot_metrics

logger = logging.getLogger(__name__)

SFT_DIR = "sft"  # the warm-up's own run directory inside the output
TEST_PROMPTS = 64  # held-out prompts whose sampled answers give the final reward and KL (the accuracy reads all)


@dataclass(kw_only=True)
class GRPOConfig(FinetuneConfig):
    """Settings of :func:`finetune_grpo`. The defaults are the run measured on a 2-core CPU
    (about 7 minutes): the ``tiny`` preset warmed up for 80 steps on the ``larger`` task (45%
    held-out accuracy), then 200 GRPO steps with DeepSeekMath's beta and PPO's clip (67.5%)."""

    model: str = job_default("model", "tiny")
    output: str = job_default("output", "runs/grpo")
    epochs: int = job_default("epochs", 5)
    batch_size: int = field(default=8, metadata={"help": "prompts per step; each is answered group_size times"})
    lr: float = field(default=1e-3, metadata={"help": "constant learning rate of the GRPO steps"})
    eval_every: int = job_default("eval_every", 25)
    eval_iter: int | None = job_default("eval_iter", 1)
    task: str = field(default="larger", metadata={
        "help": "the prompts, their held-out split and their checker", "choices": tuple(TASKS)})
    subset: int | None = field(default=None, metadata={
        "help": "train on only the first N training prompts", "none": "all"})
    reward: str | None = field(default=None, metadata={
        "help": "module:function, a reward (prompt, answer) -> float to train on instead of the task's own",
        "none": "the task's rewards"})
    group_size: int = field(default=8, metadata={"help": "answers sampled per prompt (G), compared with each other"})
    max_new_tokens: int = field(default=4, metadata={"help": "longest sampled answer in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the answers"})
    beta: float = field(default=0.04, metadata={"help": "weight of the KL term to the reference (0: no reference)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the probability ratio, 1 +- epsilon"})
    averaging: str = field(default="token", metadata={
        "help": "token: every answer token weighs the same; sequence: every answer does", "choices": AVERAGING})
    scale_rewards: bool = field(default=True, metadata={
        "help": "divide advantages by their group's standard deviation"})
    sft_steps: int = field(default=80, metadata={
        "help": "supervised steps on the task's training answers before GRPO (a preset needs them to learn the "
                "answer format)"})
    sft_lr: float = field(default=3e-3, metadata={"help": "peak learning rate of the supervised warm-up"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2: GRPO compares each answer with the others to the same "
                             f"prompt, got {self.group_size}")
        if self.max_new_tokens < 1 or self.sft_steps < 0 or (self.subset is not None and self.subset < 1):
            raise ValueError(f"need max_new_tokens >= 1, sft_steps >= 0 and subset >= 1, got {self.max_new_tokens}, "
                             f"{self.sft_steps} and {self.subset}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {', '.join(AVERAGING)}, got {self.averaging!r}")
        if self.sft_steps and self.quantize:
            raise ValueError("sft_steps trains every weight, which a quantized model cannot: warm up first "
                             "without quantize, or leave sft_steps at 0")
        if self.reward is not None:
            load_reward(self.reward)  # a wrong name fails now, before any model is loaded


def warm_up(run: Run, task: RewardTask, steps: int, lr: float) -> None:
    """``steps`` supervised steps on the task's training problems (prompt, answer, end-of-text;
    the loss on the answer only), in ``<output>/sft``: resumable, and a no-op once done."""
    s = run.settings
    eos = end_of_text_id(run.tokenizer)
    examples = [TokenizedExample(run.tokenizer.encode(p.prompt) + run.tokenizer.encode(p.answer),
                                 len(run.tokenizer.encode(p.prompt))) for p in task.train + task.test]
    train_part = examples[:len(task.train)]
    val_part = examples[len(task.train):]
    collate = functools.partial(collate_instructions, pad_token_id=eos, mask_instruction=True)
    loader = shuffled_loader(train_part, s.batch_size * 4, s.seed, drop_last=True, collate_fn=collate)
    val_loader = DataLoader(val_part, batch_size=s.batch_size * 4, collate_fn=collate)
    sft_dir = run.output / SFT_DIR
    config = TrainConfig(max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(10, steps // 10),
                         eval_every=max(1, steps // 4), eval_iter=2, precision=s.precision)
    logger.info("supervised warm-up: %d steps on %d training answers", steps, len(train_part))
    train_model(run.model, loader, val_loader, config, device=run.device, loss_fn=instruction_loss, run_dir=sft_dir,
                resume=run.resume and (sft_dir / STATE_FILE).is_file(), progress=run.progress)


def finetune_grpo(settings: GRPOConfig, model: GPTModel | None = None, *, resume: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """GRPO on ``settings.task``: warm-up (``sft_steps``), then ``epochs`` passes over the
    training prompts, ``batch_size`` prompts and ``group_size`` answers each per step.

    ``settings.output`` receives the model (LoRA merged), ``loss.png``, ``grpo.png`` and
    ``metrics.json``, whose content is returned: the held-out exact-match accuracy of greedy
    answers before and after GRPO (``accuracy_before``, ``accuracy``), and the figures of the
    GRPO loss on answers sampled for the first :data:`TEST_PROMPTS` held-out prompts (``test``:
    reward, KL, ...)."""
    s = settings
    run = setup(s, model, resume=resume, progress=progress)
    task = load_task(s.task)
    rewards = task.rewards if s.reward is None else {s.reward.rpartition(":")[2]: (load_reward(s.reward), 1.0)}
    run.model.to(run.device)
    save_settings(run.output, s.to_dict())  # a run stopped in the warm-up resumes with these settings too
    if s.sft_steps:
        warm_up(run, task, s.sft_steps, s.sft_lr)
        run.resume = resume and (run.output / STATE_FILE).is_file()  # a stop in the warm-up leaves no GRPO state
    check = task.rewards[task.accuracy_reward][0]
    test_prompts = [p.prompt for p in task.test]
    before = greedy_accuracy(run.model, run.tokenizer, test_prompts, check, s.max_new_tokens)
    logger.info("held-out accuracy before GRPO: %.1f%% of %d prompts", 100 * before, len(test_prompts))
    add_lora(run)
    reference = None
    if s.beta:
        reference = AdaptersOffReference(run.model) if s.lora_rank else FrozenReference(run.model)
    eos = end_of_text_id(run.tokenizer)
    sampling = RolloutSettings(max_new_tokens=s.max_new_tokens, temperature=s.temperature, eos_id=eos, pad_id=eos)
    loss_fn = GRPOLoss(rewards, run.tokenizer, sampling, s.group_size, reference=reference, beta=s.beta,
                       epsilon=s.epsilon, averaging=s.averaging, scale_rewards=s.scale_rewards)
    context = run.model.cfg.context_length
    train_set, test_set = (tokenize_prompts([p.prompt for p in part], run.tokenizer, context, s.max_new_tokens)
                           for part in (task.train[:s.subset], task.test))
    train_loader = shuffled_loader(train_set, s.batch_size, s.seed, drop_last=True, collate_fn=collate_prompts)
    test_loader = DataLoader(test_set, batch_size=s.batch_size, collate_fn=collate_prompts)
    # The held-out prompts are the loop's validation split: their rollouts are scored, never trained on.
    history = train(run, train_loader, test_loader, loss_fn=loss_fn,
                    data=f"{s.task}: {len(train_set)} train, {len(test_set)} held-out prompts")
    after = greedy_accuracy(run.model, run.tokenizer, test_prompts, check, s.max_new_tokens)
    logger.info("held-out accuracy after GRPO: %.1f%% (before: %.1f%%)", 100 * after, 100 * before)
    panels = {"reward": "reward"}
    if s.reward is None:
        panels[f"rewards/{task.accuracy_reward}/mean"] = "accuracy (sampled)"
    if s.beta:
        panels["kl"] = "KL to the reference"
    plot_metrics(history, panels, run.output / "grpo.png",
                 recorded_by="the GRPO loss (minigpt.finetuning.grpo.GRPOLoss)")
    metrics = {"task": s.task, "prompts": {"train": len(train_set), "test": len(test_set)},
               "accuracy_before": before, "accuracy": after}
    sample = DataLoader(test_set[:TEST_PROMPTS], batch_size=s.batch_size, collate_fn=collate_prompts)
    return finish(run, history, sample, metrics, lambda m, out: m.save_pretrained(out), loss_fn=loss_fn)


def demo_grpo(output: str | os.PathLike, *, steps: int = 40, progress: bool = False) -> dict[str, Any]:
    """GRPO's moving parts on a CPU in well under a minute (the notebook's demonstration): the
    default settings (the tiny preset, its 80-step warm-up on the ``larger`` task) with only
    ``steps`` GRPO steps, at a gentler learning rate (3e-4: at the default 1e-3, a handful of
    steps from this warm-up pushed the KL up fast and the greedy accuracy down).

    A few steps show each part at work in ``grpo.png`` and the returned metrics: groups sampled
    and scored, the spread of their rewards (``frac_reward_zero_std``: groups that teach nothing),
    the KL to the reference growing from 0. They do not show learning: over 8 steps the sampled
    and greedy accuracies move within their noise. The default 200 steps of :func:`finetune_grpo`
    (about 7 minutes on 2 cores) are what raise the greedy held-out accuracy (45 % to 67.5 %)."""
    settings = GRPOConfig(output=str(output), subset=8 * steps, epochs=1, eval_every=max(1, steps // 4), lr=3e-4)
    return finetune_grpo(settings, progress=progress)
