"""The job behind ``minigpt finetune instruct``: instruction tuning and its scores (book ch. 7).

The one idea: a GPT learns to follow instructions by training on prompts formatted the
same way every time, each followed by the answer and an end-of-text
(:mod:`minigpt.finetuning.instruction`). The job splits the entries 85/5/10, fine-tunes (with
NEFTune's noisy embeddings if asked, :mod:`minigpt.finetuning.neftune`), answers the test prompts,
and, given a judge (:mod:`minigpt.evaluation.judges`), scores those answers. Setup and finish are
shared with the other fine-tuning jobs (:mod:`minigpt.jobs.finetune`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from minigpt.evaluation.judges import HTTPJudge, Judge, ModelJudge, judge_responses
from minigpt.finetuning.instruction import (
    InstructionDataset,
    generate_responses,
    instruction_dataloader,
    instruction_loss,
    load_instruction_data,
    save_responses,
    split_instruction_data,
)
from minigpt.io import sources
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
    prompt_format_field,
    setup,
    shuffled_loader,
    train,
)
from minigpt.models.base import CausalLM
from minigpt.models.loader import load, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class InstructConfig(FinetuneConfig):
    """Settings of :func:`finetune_instructions`."""

    model: str = job_default("model", "gpt2-medium")
    output: str = job_default("output", "runs/instruct")
    epochs: int = job_default("epochs", 2)
    data: str | None = field(default=None, metadata={
        "help": "a JSON list of {instruction, input, output}", "none": "the book's 1,100 entries"})
    subset: int | None = field(default=None, metadata={"help": "use only the first N entries", "none": "all"})
    max_length: int = field(default=1024, metadata={"help": "longest training sequence in tokens"})
    mask_instruction: bool = field(default=False, metadata={"help": "score the loss on the responses only"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest answer in tokens"})
    num_responses: int | None = field(default=None, metadata={
        "help": "answer only the first N test prompts", "none": "all"})
    judge_model: str | None = field(default=None, metadata={
        "help": "a model to rate the answers 0-100 (a name, directory or preset)", "none": "no judge"})
    judge_url: str | None = field(default=None, metadata={
        "help": "a chat endpoint to rate the answers: Ollama's http://localhost:11434/api/chat or an "
                "OpenAI-compatible .../v1/chat/completions (sends $OPENAI_API_KEY if set)", "none": "no judge"})
    judge_name: str = field(default="llama3", metadata={"help": "the model name sent to judge_url"})
    neftune_alpha: float | None = neftune_field()
    prompt_format: str = prompt_format_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("subset", "max_length", "num_responses"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {self.max_new_tokens}")
        check_neftune_alpha(self.neftune_alpha)
        check_prompt_format(self.prompt_format)
        if self.judge_model and self.judge_url:
            raise ValueError("give one judge: judge_model or judge_url, not both")


def make_judge(settings: InstructConfig, run: Run) -> Judge | None:
    """The judge the settings name: a model on this run's device, an HTTP endpoint, or None."""
    if settings.judge_model:
        return ModelJudge(load(settings.judge_model).to(run.device), load_tokenizer(settings.judge_model))
    if settings.judge_url:
        return HTTPJudge(settings.judge_url, settings.judge_name, api_key=os.environ.get("OPENAI_API_KEY"))
    return None


def finetune_instructions(settings: InstructConfig, model: CausalLM | None = None, judge: Judge | None = None,
                          *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Instruction-tune ``model`` (default: ``settings.model``) on ``settings.data``.

    The first ``subset`` entries (all when None) are split 85/5/10 (train/val/test); the
    model trains at a constant learning rate (like the book; with LoRA when ``lora_rank``
    is set, with NEFTune when ``neftune_alpha`` is), then answers the first
    ``num_responses`` test prompts, rated by ``judge`` (default: the one the settings
    name, if any). ``settings.output`` receives the model (``save_pretrained``; LoRA
    merged), ``loss.png``, ``responses.json`` and ``metrics.json``, whose content is
    returned: test loss and perplexity, and the mean judge score (None without a judge).
    """
    s = settings
    run = setup(s, model, resume=resume, progress=progress)
    run.prompt_format = choose_prompt_format(s.prompt_format, s.model, run.tokenizer)
    entries = load_instruction_data(s.data)[:s.subset]
    train_part, val_part, test_part = split_instruction_data(entries)
    if not (train_part and val_part and test_part):
        raise ValueError(f"{len(entries)} entries split into {len(train_part)} train, {len(val_part)} validation "
                         f"and {len(test_part)} test entries; each part needs one at least: use 20 entries or more")
    max_length = min(s.max_length, run.model.cfg.context_length)
    train_set = InstructionDataset(train_part, run.tokenizer, run.prompt_format)
    train_loader = shuffled_loader(train_set, s.batch_size, s.seed, drop_last=False,
                                   collate_fn=train_set.collate_fn(max_length, s.mask_instruction))
    val_loader, test_loader = (
        instruction_dataloader(part, run.tokenizer, s.batch_size, allowed_max_length=max_length,
                               mask_instruction=s.mask_instruction, prompt_format=run.prompt_format)
        for part in (val_part, test_part))
    add_lora(run)
    data = s.data or sources.INSTRUCTION_DATA.relpath
    history = train(run, train_loader, val_loader, loss_fn=instruction_loss, neftune_alpha=s.neftune_alpha,
                    sample_prompt=run.prompt_format.prompt(val_part[0]), sample_tokens=35, sample_temperature=0.0,
                    data=f"{data}: {len(train_part)} train, {len(val_part)} validation, {len(test_part)} test")
    responses = generate_responses(run.model, test_part[:s.num_responses], run.tokenizer, s.max_new_tokens,
                                   progress, prompt_format=run.prompt_format)
    judge = judge if judge is not None else make_judge(s, run)
    scores = judge_responses(responses, judge, progress) if judge is not None else None
    save_responses(responses, run.output / "responses.json", scores)
    valid = [score for score in scores or [] if score is not None]
    metrics = {
        "data": str(data), "examples": {"train": len(train_part), "val": len(val_part), "test": len(test_part)},
        "judge_score": sum(valid) / len(valid) if valid else None, "judged": len(valid),
        "responses": len(responses),
    }
    return finish(run, history, test_loader, metrics, lambda m, out: m.save_pretrained(out))
