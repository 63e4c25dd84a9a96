"""Fine-tuning a GPT to classify texts, e.g. SMS messages as spam or ham (book chapter 6).

The one idea: a classifier is a GPT with a smaller head. The output layer that
scored 50,257 vocabulary entries is replaced by ``Linear(emb_dim, num_classes)``,
and a text's class is read at its **last real token**: causal attention lets only
that position see the whole text.

That makes a label just another next-token target. A classification example is
``(input_ids, targets)`` like a pretraining one, except that ``targets`` is
``-100`` (ignored by the loss) everywhere but the last real token, which holds
the class id. Padding after the text is never read, so the training loop's
ordinary next-token loss (``minigpt.training.losses.next_token_loss``; named
:func:`classification_loss` here, a loss over classes, with no perplexity) trains a
classifier unchanged, and a padded text gets exactly the scores of the unpadded one.

Reading, balancing and splitting the labelled texts is :mod:`minigpt.finetuning.labelled_data`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from minigpt.data.windows import tokenize
from minigpt.finetuning.heads import last_token_logits, load_with_head, replace_head, save_with_head, set_trainable
from minigpt.finetuning.labelled_data import Example, label_names_of
from minigpt.io.files import write_json
from minigpt.models.base import CausalLM, evaluating
from minigpt.runtime.runtime import select_device
from minigpt.tokenizers.gpt2 import PAD_TOKEN_ID
from minigpt.training.config import TrainConfig
from minigpt.training.loop import History, train_model
from minigpt.training.losses import IGNORE_INDEX, next_token_loss

# Trained by default: the last transformer block, the final norm and the new head.
# The book found that tuning these few layers is nearly as good as tuning everything.
DEFAULT_TRAINABLE: tuple[str, ...] = ("trf_blocks.-1", "final_norm", "out_head")

LABELS_FILE = "classifier.json"


# --- Data ----------------------------------------------------------------------------------


class ClassificationDataset(Dataset):
    """Labelled texts as ``(input_ids, targets)``, both ``torch.long`` of shape ``(max_length,)``.

    Each text is tokenized once and cut to its first ``max_length`` tokens (None:
    no cut). Every example is padded with ``pad_token_id`` to the longest one, so
    ``self.max_length`` ends up the longest tokenized length. ``targets`` is
    ``IGNORE_INDEX`` everywhere except at the last real token, which holds the
    class id: ``targets[length - 1] = label_names.index(label)``.

    ``label_names`` fixes the class ids; give the training set's to the validation
    and test sets so the ids agree (default: :func:`label_names_of` the examples).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any = None,
        max_length: int | None = None,
        label_names: Sequence[str] | None = None,
        pad_token_id: int = PAD_TOKEN_ID,
    ) -> None:
        if not examples:
            raise ValueError("no examples to build a classification dataset from")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.label_names = list(label_names) if label_names is not None else label_names_of(examples)
        # Class ids are indices into label_names: validation and test sets must share the training set's.
        class_of = {name: i for i, name in enumerate(self.label_names)}
        self.encoded: list[list[int]] = []
        self.labels: list[int] = []
        for i, (text, label) in enumerate(examples):
            if label not in class_of:
                raise ValueError(f"example {i} has label {label!r}, not one of {self.label_names}")
            # Keep the first max_length tokens (the book's cut); longer texts lose their end.
            ids = tokenize(text, tokenizer)[:max_length]
            if not ids:
                raise ValueError(f"example {i} has an empty text: there is no token to classify from")
            self.encoded.append(ids)
            # Tokenized once here, not per epoch: __getitem__ only pads.
            self.labels.append(class_of[label])
        # Pad to the longest text actually seen, not to max_length: shorter batches, same scores.
        self.max_length = max(len(ids) for ids in self.encoded)
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.encoded[i]
        # Right padding: causal attention means no real token ever attends the pads after it, so
        # the last real token's scores equal those of the unpadded text.
        padding = self.max_length - len(ids)
        input_ids = torch.tensor(ids + [self.pad_token_id] * padding)
        # -100 everywhere (cross_entropy's ignore_index) but at the last real token, which holds the
        # class id: the next-token loss then trains only the class read there.
        targets = torch.full((self.max_length,), IGNORE_INDEX)
        # The class id takes the place of the next-token target at the last real token.
        targets[len(ids) - 1] = self.labels[i]
        return input_ids, targets

    def class_counts(self) -> dict[str, int]:
        """How many examples each class has: ``{label name: count}``."""
        counts = Counter(self.labels)
        return {name: counts[i] for i, name in enumerate(self.label_names)}


# --- Model surgery -------------------------------------------------------------------------


def make_classifier(
    model: CausalLM,
    num_classes: int,
    trainable: Sequence[str] | Literal["all"] = DEFAULT_TRAINABLE,
) -> CausalLM:
    """Turn ``model`` (in place) into a classifier: ``(batch, tokens) -> (batch, tokens, num_classes)``.

    The output head becomes a fresh ``Linear(emb_dim, num_classes)``. A head tied to
    the token embedding is simply replaced: the embedding keeps its matrix, and
    ``cfg.tie_weights`` becomes False (in a copy of the config). Then every
    parameter is frozen except those of the ``trainable`` submodules, named as in
    ``model.named_modules()`` with negative block numbers counting from the end
    (``"trf_blocks.-1"`` is the last block); ``"all"`` trains everything.
    Returns ``model``.
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    # Replace first, then freeze: set_trainable must find the *new* head to unfreeze it.
    replace_head(model, num_classes)
    set_trainable(model, trainable)
    return model


# --- Evaluation and training ---------------------------------------------------------------


@torch.no_grad()
def calc_accuracy_loader(
    data_loader: DataLoader, model: nn.Module, device: torch.device | str, num_batches: int | None = None
) -> float:
    """Fraction of correctly classified examples over the first ``num_batches`` batches
    (all when None) of ``(input_ids, targets)`` batches from :class:`ClassificationDataset`.

    The prediction is the arg-max at the one position whose target is not ignored.
    The model runs in eval mode (no dropout) and gets its previous mode back afterwards.
    """
    correct = total = 0
    with evaluating(model):
        for i, (input_ids, targets) in enumerate(data_loader):
            if num_batches is not None and i >= num_batches:
                break
            # No attention mask: the texts are right-padded, and the labelled position is the last real one.
            logits = model(input_ids.to(device))  # (batch, tokens, classes)
            targets = targets.to(device)
            # Boolean indexing picks the (batch, classes) logits at the labelled positions in one step.
            labelled = targets != IGNORE_INDEX  # (batch, tokens), one True per row
            # The arg-max over the classes at the labelled position is the prediction.
            correct += int((logits[labelled].argmax(dim=-1) == targets[labelled]).sum())
            total += int(labelled.sum())
    if total == 0:
        raise ValueError("the data loader gave no labelled examples")
    return correct / total


@dataclass
class ClassifierTraining:
    """What :func:`train_classifier` measured."""

    history: History                  # losses every eval_every steps, from train_model
    accuracy_before: dict[str, float]  # {"train": ..., "val": ...} with the untrained head
    accuracy_after: dict[str, float]


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The next-token loss, scored only at each text's label position (see the module docstring):
    a cross-entropy over the classes, not over the vocabulary, so no perplexity is logged for it."""
    return next_token_loss(model, batch)


def train_classifier(
    model: CausalLM,
    train_loader: DataLoader,
    val_loader: DataLoader,
    epochs: int = 5,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    eval_every: int = 50,
    eval_iter: int | None = 5,
    device: torch.device | str | None = None,
    progress: bool = True,
    precision: str | None = None,
) -> ClassifierTraining:
    """Fine-tune a :func:`make_classifier` model for ``epochs`` passes over ``train_loader``.

    This is :func:`minigpt.training.loop.train_model` unchanged: the labels are next-token
    targets (see the module docstring), so its next-token loss is the classification
    loss. As in the book the learning rate is constant (no warm-up, no decay); 5e-5
    suits pretrained weights, a randomly initialised model wants about 1e-3.
    ``precision`` is one of ``minigpt.runtime.runtime.PRECISIONS`` (None: ``TrainConfig``'s default).
    Accuracy is measured on the whole train and validation loaders before and after.
    """
    device = select_device(device)
    model.to(device)
    # Before training the new head is random: about 1 / num_classes on balanced data.
    before = {"train": calc_accuracy_loader(train_loader, model, device),
              "val": calc_accuracy_loader(val_loader, model, device)}
    settings: dict[str, Any] = {} if precision is None else {"precision": precision}
    # min_lr = lr and no warm-up: a constant learning rate, as the book trains its classifier.
    config = TrainConfig(max_steps=epochs * len(train_loader), lr=lr, min_lr=lr, warmup_steps=0,
                         weight_decay=weight_decay, eval_every=eval_every, eval_iter=eval_iter, **settings)
    history = train_model(model, train_loader, val_loader, config, device=device, loss_fn=classification_loss,
                          progress=progress)
    after = {"train": calc_accuracy_loader(train_loader, model, device),
             "val": calc_accuracy_loader(val_loader, model, device)}
    return ClassifierTraining(history, before, after)


@torch.no_grad()
def classify_texts(
    texts: Sequence[str],
    model: CausalLM,
    tokenizer: Any = None,
    label_names: Sequence[str] | None = None,
    max_length: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
) -> list[str] | list[int]:
    """The predicted class of each text: a name from ``label_names``, or the class id.

    Texts are cut to ``max_length`` tokens (default: the model's context length),
    right-padded to a common length and classified at their last real token.
    """
    # Never more than the context: positions past it have no embedding.
    max_length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    encoded = [tokenize(text, tokenizer)[:max_length] for text in texts]
    if not all(encoded):
        raise ValueError("cannot classify an empty text: it has no token to classify from")
    longest = max(len(ids) for ids in encoded)
    # Right padding, no attention mask needed: each text is read at its own last token.
    input_ids = torch.tensor([ids + [pad_token_id] * (longest - len(ids)) for ids in encoded])
    lengths = torch.tensor([len(ids) for ids in encoded])
    with evaluating(model):
        logits = last_token_logits(model(input_ids.to(model.device)), lengths)  # (texts, classes)
    # The class with the largest logit; softmax would not change the order.
    predicted = logits.argmax(dim=-1).tolist()
    return [label_names[i] for i in predicted] if label_names is not None else predicted


def classify(
    text: str,
    model: CausalLM,
    tokenizer: Any = None,
    label_names: Sequence[str] | None = None,
    max_length: int | None = None,
) -> str | int:
    """The predicted class of one text (see :func:`classify_texts`)."""
    return classify_texts([text], model, tokenizer, label_names, max_length)[0]


# --- Saving and loading --------------------------------------------------------------------


def save_classifier(model: CausalLM, directory: str | os.PathLike, label_names: Sequence[str]) -> None:
    """Write the model as ``save_pretrained`` does, plus ``classifier.json`` (the label names).

    The head has ``num_classes`` rows instead of ``vocab_size``, so the directory is
    read with :func:`load_classifier`, not ``minigpt.models.load``.
    """
    if model.out_head.out_features != len(label_names):
        raise ValueError(f"the head has {model.out_head.out_features} classes but {len(label_names)} "
                         "label names were given")
    save_with_head(model, directory)
    write_json(Path(directory) / LABELS_FILE, {"label_names": list(label_names)})


def load_classifier(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CausalLM, list[str]]:
    """``(model, label_names)`` from a directory written by :func:`save_classifier`, in eval mode.

    The tensors are read by the weights layer's checked loader and must match a classifier
    of the saved config with one head row per label; a mismatch names each tensor.
    """
    directory = Path(directory)
    labels_path = directory / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(f"{directory} has no {LABELS_FILE}; was it written by save_classifier?")
    label_names = json.loads(labels_path.read_text(encoding="utf-8"))["label_names"]
    model = load_with_head(directory, len(label_names), f"a classifier for the labels {label_names}")
    return model.to(device).eval(), label_names


