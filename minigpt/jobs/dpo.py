"""The job behind ``minigpt finetune dpo``: preference tuning with DPO (Rafailov et al. 2023).

The one idea: an instruction-tuned model learns *which* of two answers people prefer by
raising the log-probability of the chosen answer relative to the rejected one, measured
against a frozen reference, the model it started as (:mod:`minigpt.finetuning.dpo`). The job splits
the pairs 85/5/10 like instruction tuning, picks the reference one of three ways::

    --lora-rank R      the same model with its LoRA adapters switched off (no second copy)
    (default)          a frozen deep copy, in eval mode
    --precompute-ref   the reference's log-probabilities, computed once and cached in the output

trains through the shared loop with the DPO loss, and writes what changed: the rewards
before and after (``metrics.json``, ``preference.png``) and the reference's and the tuned
model's answers to the validation prompts side by side (``ab_samples.json``). Setup and
finish are shared with the other fine-tuning jobs (:mod:`minigpt.jobs.finetune`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt.finetuning.dpo import LOSS_TYPES, DPOLoss
from minigpt.finetuning.instruction import generate_responses
from minigpt.finetuning.preference import PreferenceDataset, load_preference_data
from minigpt.finetuning.reference import AdaptersOffReference, FrozenReference, Reference, precompute_reference
from minigpt.io import sources
from minigpt.io.files import write_json
from minigpt.jobs.finetune import (
    FinetuneConfig,
    Run,
    add_lora,
    check_neftune_alpha,
    check_prompt_format,
    choose_prompt_format,
    finish,
    job_default,
    neftune_field,
    preference_splits,
    prompt_format_field,
    setup,
    split_scores,
    train,
)
from minigpt.jobs.instruct import InstructConfig
from minigpt.models.base import CausalLM
from minigpt.training.plots import plot_preference

logger = logging.getLogger(__name__)

AB_SAMPLES = "ab_samples.json"
ADAPTER_FILE = "adapter.safetensors"


@dataclass(kw_only=True)
class DPOConfig(FinetuneConfig):
    """Settings of :func:`finetune_dpo`. The defaults follow the book's DPO notebook: one
    epoch at a learning rate of 5e-6 (DPO collapses easily), weight decay 0.01, beta 0.1."""

    model: str = field(default=InstructConfig.__dataclass_fields__["output"].default, metadata={
        "help": "the instruction-tuned model to align: a run directory (the output of finetune instruct), "
                "a GPT-2 name, or a preset"})
    output: str = job_default("output", "runs/dpo")
    epochs: int = job_default("epochs", 1)
    lr: float = field(default=5e-6, metadata={"help": "constant learning rate (DPO collapses easily: keep it small)"})
    weight_decay: float = job_default("weight_decay", 0.01)
    eval_every: int = job_default("eval_every", 25)
    data: str | None = field(default=None, metadata={
        "help": "a JSON list of {instruction, input, chosen, rejected}", "none": "the book's 1,100 pairs"})
    subset: int | None = field(default=None, metadata={"help": "use only the first N pairs", "none": "all"})
    max_length: int = field(default=1024, metadata={"help": "longest sequence (prompt and answer) in tokens"})
    beta: float = field(default=0.1, metadata={
        "help": "the scale of the rewards: a smaller beta lets the tuned model move further from the reference"})
    loss: str = field(default="sigmoid", metadata={
        "help": "sigmoid (DPO), ipo (Azar et al. 2023) or hinge", "choices": LOSS_TYPES})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "share of pairs assumed mislabelled (conservative DPO; sigmoid loss)"})
    precompute_ref: bool = field(default=False, metadata={
        "help": "compute the reference's log-probabilities once, cached in the output, instead of a reference "
                "model during training"})
    neftune_alpha: float | None = neftune_field()
    prompt_format: str = prompt_format_field()
    max_new_tokens: int = field(default=256, metadata={"help": "longest answer of the A/B samples in tokens"})
    num_responses: int | None = field(default=None, metadata={
        "help": "A/B samples for only the first N validation prompts", "none": "all"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("subset", "max_length", "num_responses"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {self.max_new_tokens}")
        if not self.beta > 0:
            raise ValueError(f"beta must be more than 0 (the book uses 0.1), got {self.beta}")
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"the loss must be one of {', '.join(LOSS_TYPES)}, got {self.loss!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be at least 0 and less than 0.5, got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to the sigmoid loss only, not to {self.loss}; leave it at 0")
        if self.data is not None and not Path(self.data).is_file():
            raise FileNotFoundError(f"{self.data} does not exist: the preference data must be a JSON file of "
                                    "{instruction, input, chosen, rejected} pairs")
        check_neftune_alpha(self.neftune_alpha)
        check_prompt_format(self.prompt_format)


def make_reference(run: Run, datasets: list[PreferenceDataset], max_length: int) -> tuple[Reference | None, str]:
    """The reference of the loss and its name: the model with its adapters off (LoRA), a
    frozen deep copy, or None after precomputing every split's log-probabilities (cached
    in the output directory; a resumed run reads them back)."""
    s = run.settings
    if s.precompute_ref:
        reference = AdaptersOffReference(run.model) if s.lora_rank else FrozenReference(run.model, copy=False)
        for dataset in datasets:
            precompute_reference(reference, dataset, allowed_max_length=max_length, batch_size=s.batch_size,
                                 device=run.device, cache_dir=run.output)
        return None, "precomputed" + (" (adapters off)" if s.lora_rank else "")
    if s.lora_rank:
        return AdaptersOffReference(run.model), "adapters off"
    return FrozenReference(run.model), "frozen copy"


def answers(run: Run, entries: list[dict[str, str]]) -> list[str]:
    """The model's greedy answers to the entries' prompts (in eval mode: no dropout, no noise)."""
    responses = generate_responses(run.model, entries, run.tokenizer, run.settings.max_new_tokens, run.progress,
                                   prompt_format=run.prompt_format)
    return [response["model_response"] for response in responses]


def finetune_dpo(settings: DPOConfig, model: CausalLM | None = None, *, resume: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Align ``model`` (default: ``settings.model``) with the preference pairs of ``settings.data``.

    The first ``subset`` pairs (all when None; pairs with two identical answers dropped)
    are split 85/5/10 (train/val/test). The policy trains with the DPO loss against the
    reference of :func:`make_reference`, dropout off. ``settings.output`` receives the model
    (``save_pretrained``; LoRA merged, and the adapter alone in ``adapter.safetensors``),
    ``loss.png``, ``preference.png`` (loss, reward margin and accuracy), ``ab_samples.json``
    and ``metrics.json``, whose content is returned: the loss and the rewards of the whole
    validation split before (``val_before``) and after (``val``) and of the test split
    (``test``, and ``test_loss``).
    """
    s = settings
    entries = load_preference_data(s.data)[:s.subset]  # bad data is named before a model loads
    run = setup(s, model, resume=resume, progress=progress)
    run.prompt_format = choose_prompt_format(s.prompt_format, s.model, run.tokenizer)
    splits = preference_splits(run, entries, s.max_length, s.batch_size, s.seed)
    add_lora(run)
    run.model.to(run.device)
    reference, strategy = make_reference(run, splits.datasets, splits.max_length)
    loss_fn = DPOLoss(reference, beta=s.beta, label_smoothing=s.label_smoothing, loss_type=s.loss)
    val_part = splits.datasets[1].entries
    prompts = splits.datasets[1].entries[:s.num_responses]
    before = split_scores(run, splits.val_loader, loss_fn)
    reference_answers = answers(run, prompts)  # the policy is still the reference
    data = s.data or sources.PREFERENCE_DATA.relpath
    history = train(run, splits.train_loader, splits.val_loader, loss_fn=loss_fn, neftune_alpha=s.neftune_alpha,
                    sample_prompt=run.prompt_format.prompt(val_part[0]), sample_tokens=35, sample_temperature=0.0,
                    data=f"{data}: {splits.summary()} "
                         f"| reference: {strategy} | loss {s.loss}, beta {s.beta:g}")
    after = split_scores(run, splits.val_loader, loss_fn)
    logger.info("validation (whole split): %s", ", ".join(
        f"{name} {before[name]:.3f} -> {after[name]:.3f}" for name in after))
    tuned_answers = answers(run, prompts)
    write_json(run.output / AB_SAMPLES, [
        {"instruction": entry["instruction"], "input": entry.get("input", ""), "reference_response": old,
         "tuned_response": new, "chosen": entry["chosen"], "rejected": entry["rejected"]}
        for entry, old, new in zip(prompts, reference_answers, tuned_answers, strict=True)])
    plot_preference(history, run.output / "preference.png")
    metrics = {
        "data": str(data), "examples": splits.examples(),
        "reference": strategy, "loss_type": s.loss, "beta": s.beta, "val_before": before, "val": after,
        "ab_samples": len(tuned_answers),
    }
    return finish(run, history, splits.test_loader, metrics, lambda m, out: m.save_pretrained(out), loss_fn=loss_fn,
                  adapter=ADAPTER_FILE)
