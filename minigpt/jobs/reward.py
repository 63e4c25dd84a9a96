"""The job behind ``minigpt finetune reward``: a reward model trained on preference pairs.

The one idea: the model that DPO skips. A GPT with a one-number head (:mod:`minigpt.finetuning.reward`)
learns to score the chosen answer of each pair above the rejected one; PPO then optimises a
language model against those scores (:mod:`minigpt.jobs.ppo`). The pairs split 85/5/10 as
for DPO, the loop is the shared one, and ``metrics.json`` reports the validation accuracy
and margin before and after, and the test split's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt.finetuning.preference import load_preference_data
from minigpt.finetuning.reward import RewardLoss, make_reward_model, save_reward_model
from minigpt.io import sources
from minigpt.jobs.finetune import (
    FinetuneConfig,
    add_lora,
    check_prompt_format,
    choose_prompt_format,
    finish,
    job_default,
    preference_splits,
    prompt_format_field,
    setup,
    split_scores,
    train,
)
from minigpt.jobs.instruct import InstructConfig
from minigpt.models.base import CausalLM
from minigpt.training.plots import plot_reward_model


@dataclass(kw_only=True)
class RewardConfig(FinetuneConfig):
    """Settings of :func:`finetune_reward`: one epoch at 1e-5 by default, every weight trained."""

    model: str = field(default=InstructConfig.__dataclass_fields__["output"].default, metadata={
        "help": "the model the reward model starts from: a run directory, a GPT-2 name, or a preset"})
    output: str = job_default("output", "runs/reward")
    epochs: int = job_default("epochs", 1)
    lr: float = job_default("lr", 1e-5)
    eval_every: int = job_default("eval_every", 25)
    data: str | None = field(default=None, metadata={
        "help": "a JSON list of {instruction, input, chosen, rejected}", "none": "the book's 1,100 pairs"})
    subset: int | None = field(default=None, metadata={"help": "use only the first N pairs", "none": "all"})
    max_length: int = field(default=1024, metadata={"help": "longest sequence (prompt and answer) in tokens"})
    center_rewards: float | None = field(default=None, metadata={
        "help": "reward centering: this times the mean squared sum of both scores keeps them near 0 "
                "(TRL suggests 0.01)", "none": "off"})
    prompt_format: str = prompt_format_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("subset", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.center_rewards is not None and not self.center_rewards >= 0:
            raise ValueError(f"center_rewards must be 0 or more, got {self.center_rewards}")
        if self.data is not None and not Path(self.data).is_file():
            raise FileNotFoundError(f"{self.data} does not exist: the preference data must be a JSON file of "
                                    "{instruction, input, chosen, rejected} pairs")
        check_prompt_format(self.prompt_format)


def finetune_reward(settings: RewardConfig, model: CausalLM | None = None, *, resume: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Train a reward model from ``model`` (default: ``settings.model``) on ``settings.data``.

    ``settings.output`` receives the reward model (:func:`minigpt.finetuning.reward.save_reward_model`;
    LoRA merged), ``loss.png``, ``reward.png`` (loss, accuracy and margin per evaluation) and
    ``metrics.json``, returned: ``val_before``, ``val`` and ``test`` hold the loss,
    ``accuracy`` and ``margin`` of the whole split.
    """
    s = settings
    entries = load_preference_data(s.data)[:s.subset]  # bad data is named before a model loads
    run = setup(s, model, resume=resume, progress=progress)
    run.prompt_format = choose_prompt_format(s.prompt_format, s.model, run.tokenizer)
    splits = preference_splits(run, entries, s.max_length, s.batch_size, s.seed)
    make_reward_model(run.model)
    add_lora(run)
    if s.lora_rank:
        run.model.out_head.requires_grad_(True)  # the new head trains in full beside the adapters
    run.model.to(run.device)
    loss_fn = RewardLoss(s.center_rewards)
    before = split_scores(run, splits.val_loader, loss_fn)
    data = s.data or sources.PREFERENCE_DATA.relpath
    history = train(run, splits.train_loader, splits.val_loader, loss_fn=loss_fn,
                    data=f"{data}: {splits.summary()}")
    after = split_scores(run, splits.val_loader, loss_fn)
    plot_reward_model(history, run.output / "reward.png")
    metrics = {"data": str(data), "examples": splits.examples(),
               "val_before": before, "val": after}
    return finish(run, history, splits.test_loader, metrics, save_reward_model, loss_fn=loss_fn)
