"""The job behind ``minigpt finetune classify``: labelled texts -> a classifier (book ch. 6).

The one idea: a pretrained GPT becomes a classifier by swapping its output head for one
with a row per class and training on labels read at each text's last token
(:mod:`minigpt.finetuning.classification`). The job loads the texts, balances the classes, splits
them 70/10/20, measures accuracy before and after, and shares its setup and finish with
instruction tuning (:mod:`minigpt.jobs.finetune`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader

from minigpt.finetuning.classification import (
    DEFAULT_TRAINABLE,
    ClassificationDataset,
    calc_accuracy_loader,
    classification_loss,
    make_classifier,
    save_classifier,
)
from minigpt.finetuning.labelled_data import balance_classes, load_labelled_texts, split_examples
from minigpt.jobs.finetune import FinetuneConfig, add_lora, finish, job_default, setup, shuffled_loader, train
from minigpt.models.base import CausalLM
from minigpt.training.plots import plot_accuracy

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ClassifyConfig(FinetuneConfig):
    """Settings of :func:`finetune_classifier`."""

    model: str = job_default("model", "gpt2-small")
    output: str = job_default("output", "runs/classifier")
    epochs: int = job_default("epochs", 5)
    data: str = field(default="spam", metadata={
        "help": "'spam' (the SMS Spam Collection) or a CSV/TSV file whose first row names the columns"})
    text_column: str = field(default="text", metadata={"help": "the column holding the texts"})
    label_column: str = field(default="label", metadata={"help": "the column holding the labels"})
    balance: bool = field(default=True, metadata={
        "help": "undersample each class to the size of the smallest"})
    subset: int | None = field(default=None, metadata={
        "help": "use only this many (balanced) examples", "none": "all"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens kept per text", "none": "the model's context length"})
    trainable: tuple[str, ...] = field(default=DEFAULT_TRAINABLE, metadata={
        "help": "modules to train, or 'all'"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.trainable = tuple(self.trainable)  # JSON gives a list back
        for name in ("subset", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


def finetune_classifier(settings: ClassifyConfig, model: CausalLM | None = None, *, resume: bool = False,
                        progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``model`` (default: ``settings.model``) into a classifier of ``settings.data``.

    ``settings.output`` receives the classifier (``minigpt.finetuning.classification.save_classifier``;
    LoRA merged), ``loss.png``, ``accuracy.png`` and ``metrics.json``, whose content is
    returned: the examples per split, the trainable parameters, the accuracy of each split
    before and after, and the test loss.
    """
    s = settings
    run = setup(s, model, resume=resume, progress=progress)
    examples = load_labelled_texts(s.data, s.text_column, s.label_column)
    if s.balance:
        examples = balance_classes(examples, s.seed)
    if s.subset is not None:
        examples = random.Random(s.seed).sample(examples, min(s.subset, len(examples)))
    train_part, val_part, test_part = split_examples(examples, seed=s.seed)
    context = run.model.cfg.context_length
    max_length = min(s.max_length or context, context)
    train_set = ClassificationDataset(train_part, run.tokenizer, max_length)
    labels = train_set.label_names
    val_set = ClassificationDataset(val_part, run.tokenizer, max_length, label_names=labels)
    test_set = ClassificationDataset(test_part, run.tokenizer, max_length, label_names=labels)

    trainable = "all" if s.trainable == ("all",) else list(s.trainable)
    make_classifier(run.model, len(labels), trainable=[] if s.lora_rank else trainable)
    add_lora(run)
    # A last, short batch would weigh as much as a full one: dropped, unless it is the only one.
    train_loader = shuffled_loader(train_set, s.batch_size, s.seed, drop_last=len(train_set) > s.batch_size)
    loaders = {"train": train_loader, "val": DataLoader(val_set, batch_size=s.batch_size),
               "test": DataLoader(test_set, batch_size=s.batch_size)}
    trainable_parameters = run.model.num_parameters(trainable_only=True)
    run.model.to(run.device)
    before = {split: calc_accuracy_loader(loader, run.model, run.device) for split, loader in loaders.items()}
    history = train(run, train_loader, loaders["val"], loss_fn=classification_loss,
                    data=f"{s.data}: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test")
    after = {split: calc_accuracy_loader(loader, run.model, run.device) for split, loader in loaders.items()}
    logger.info("accuracy: %s", ", ".join(f"{split} {before[split]:.1%} -> {after[split]:.1%}" for split in after))
    plot_accuracy(before, after, run.output / "accuracy.png")
    metrics = {
        "data": str(s.data), "label_names": labels, "max_length": train_set.max_length,
        "examples": {"train": len(train_set), "val": len(val_set), "test": len(test_set)},
        "trainable_parameters": trainable_parameters, "accuracy_before": before, "accuracy": after,
    }
    return finish(run, history, loaders["test"], metrics, lambda m, out: save_classifier(m, out, labels),
                  loss_fn=classification_loss)
