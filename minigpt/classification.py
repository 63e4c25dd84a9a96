"""Fine-tuning a GPT to classify texts, e.g. SMS messages as spam or ham (book chapter 6).

The one idea: a classifier is a GPT with a smaller head. The output layer that
scored 50,257 vocabulary entries is replaced by ``Linear(emb_dim, num_classes)``,
and a text's class is read at its **last real token**: causal attention lets only
that position see the whole text.

That makes a label just another next-token target. A classification example is
``(input_ids, targets)`` like a pretraining one, except that ``targets`` is
``-100`` (ignored by the loss) everywhere but the last real token, which holds
the class id. Padding after the text is never read, so the training loop's
ordinary cross-entropy (``minigpt.training.calc_loss_batch``) trains a
classifier unchanged, and a padded text gets exactly the scores of the unpadded one.

The SMS Spam Collection is read one message per line, split at the first tab,
with no quote handling: 54 messages start with ``"``, and a CSV reader would
merge some of them with the lines that follow (pandas finds 5,572 messages
instead of 5,574). The book's figures come from that merged reading; we keep
every message. Both readings have 747 spam messages, so the balanced data set
has 1,494 texts either way.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from minigpt.config import GPTConfig
from minigpt.data import tokenize
from minigpt.download import ChecksumError, atomic_write, cache_dir, data_dir, download, sha256_of
from minigpt.lora import apply_lora, merge_lora
from minigpt.model import GPTModel
from minigpt.plots import plot_losses
from minigpt.tokenizer import ENDOFTEXT_ID, get_gpt2_tokenizer
from minigpt.training import (
    IGNORE_INDEX,
    History,
    TrainConfig,
    calc_loss_loader,
    select_device,
    train_model,
)
from minigpt.weights import CONFIG_FILE, WEIGHTS_FILE

PAD_TOKEN_ID = ENDOFTEXT_ID  # GPT-2 has no padding token: pad with <|endoftext|>

SMS_SPAM_RELPATH = "sms_spam/SMSSpamCollection.tsv"
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SMS_SPAM_ZIP_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_LABELS = ("ham", "spam")

# Trained by default: the last transformer block, the final norm and the new head.
# The book found that tuning these few layers is nearly as good as tuning everything.
DEFAULT_TRAINABLE: tuple[str, ...] = ("trf_blocks.-1", "final_norm", "out_head")

LABELS_FILE = "classifier.json"

# One labelled text: (text, label name).
Example = tuple[str, str]


# --- Data ----------------------------------------------------------------------------------


def sms_spam_path() -> Path:
    """Local path of ``SMSSpamCollection.tsv``, checked against its SHA-256.

    Looked for in ``MINIGPT_DATA_DIR`` and the cache; otherwise UCI's zip is downloaded
    into the cache and the file extracted from it. The zip's own checksum is not
    pinned (UCI may repackage it), so the extracted file is what gets verified.
    """
    for root in (data_dir(), cache_dir()):
        if root is not None and (root / SMS_SPAM_RELPATH).is_file():
            return _verified(root / SMS_SPAM_RELPATH)
    archive = download(SMS_SPAM_ZIP_URL, cache_dir() / "sms_spam" / "sms_spam_collection.zip")
    with zipfile.ZipFile(archive) as zf:
        content = zf.read("SMSSpamCollection")
    dest = cache_dir() / SMS_SPAM_RELPATH
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(content))
    return _verified(dest)


def _verified(path: Path) -> Path:
    if sha256_of(path) != SMS_SPAM_SHA256:
        raise ChecksumError(f"{path} does not have the expected SHA-256 {SMS_SPAM_SHA256}")
    return path


def read_sms_spam(path: str | os.PathLike) -> list[Example]:
    """``(text, label)`` for every line ``label<TAB>text`` of the SMS Spam Collection.

    No quote handling: a ``"`` is part of the message (see the module docstring).
    A line without a tab or with a label other than ``ham``/``spam`` is an error
    naming its line number.
    """
    content = Path(path).read_text(encoding="utf-8")
    # split("\n"), not splitlines(): that would also split at characters such as U+2028.
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    examples = []
    for number, line in enumerate(lines, start=1):
        label, tab, text = line.rstrip("\r").partition("\t")
        if not tab or label not in SMS_SPAM_LABELS:
            raise ValueError(
                f"{path}, line {number}: expected 'ham' or 'spam', a tab, then the message; "
                f"got {line[:60]!r}"
            )
        examples.append((text, label))
    if not examples:
        raise ValueError(f"{path} is empty: no messages to classify")
    return examples


def read_labelled_file(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    delimiter: str | None = None,
) -> list[Example]:
    """``(text, label)`` pairs from a CSV or TSV file whose first row names the columns.

    ``delimiter`` defaults to a tab for ``.tsv``/``.tab`` files and a comma otherwise;
    fields may be quoted as usual in CSV. Errors name the line number.
    """
    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty: expected a header row naming the columns")
        for column in (text_column, label_column):
            if column not in header:
                raise ValueError(f"{path} has no column {column!r}; its columns are {header}")
        text_at, label_at = header.index(text_column), header.index(label_column)
        examples = []
        for row in reader:
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {reader.line_num}: {len(row)} fields, but the header has "
                    f"{len(header)}; is a field with a {delimiter!r} missing its quotes?"
                )
            if not row[label_at].strip():
                raise ValueError(f"{path}, line {reader.line_num}: the label is empty")
            examples.append((row[text_at], row[label_at].strip()))
    if not examples:
        raise ValueError(f"{path} has a header but no examples")
    return examples


def load_labelled_texts(
    name_or_path: str | os.PathLike, text_column: str = "text", label_column: str = "label"
) -> list[Example]:
    """``"spam"`` for the SMS Spam Collection, or a CSV/TSV path (see :func:`read_labelled_file`)."""
    if str(name_or_path) == "spam":
        return read_sms_spam(sms_spam_path())
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}; use 'spam' or the path of a CSV/TSV file")
    return read_labelled_file(path, text_column, label_column)


def balance_classes(examples: Sequence[Example], seed: int = 123) -> list[Example]:
    """Undersample every class to the size of the smallest one, keeping the file order.

    Otherwise a classifier can score well by always answering the majority class
    (87% of the SMS messages are ham); balanced, that strategy scores 1 / num_classes.
    """
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(i)
    smallest = min(len(indices) for indices in by_label.values())
    rng = random.Random(seed)
    keep = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], smallest))
    return [examples[i] for i in keep]


def split_examples(
    examples: Sequence[Any], train_frac: float = 0.7, val_frac: float = 0.1, seed: int = 123
) -> tuple[list[Any], list[Any], list[Any]]:
    """Shuffle with ``seed``, then cut into (train, validation, test); the test part
    gets the rest. 1,494 examples give the book's 1,045 / 149 / 300."""
    if train_frac <= 0 or val_frac < 0 or train_frac + val_frac >= 1:
        raise ValueError(f"need 0 < train_frac and train_frac + val_frac < 1, got {train_frac}, {val_frac}")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    train_end = int(len(shuffled) * train_frac)
    val_end = train_end + int(len(shuffled) * val_frac)
    return shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:]


def label_names_of(examples: Iterable[Example]) -> list[str]:
    """The distinct labels, sorted (numerically when they are all integers): ham -> 0, spam -> 1."""
    labels = sorted({label for _, label in examples})
    if all(label.lstrip("-").isdigit() for label in labels):
        labels.sort(key=int)
    return labels


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
        class_of = {name: i for i, name in enumerate(self.label_names)}
        self.encoded: list[list[int]] = []
        self.labels: list[int] = []
        for i, (text, label) in enumerate(examples):
            if label not in class_of:
                raise ValueError(f"example {i} has label {label!r}, not one of {self.label_names}")
            ids = tokenize(text, tokenizer)[:max_length]
            if not ids:
                raise ValueError(f"example {i} has an empty text: there is no token to classify from")
            self.encoded.append(ids)
            self.labels.append(class_of[label])
        self.max_length = max(len(ids) for ids in self.encoded)
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.encoded[i]
        padding = self.max_length - len(ids)
        input_ids = torch.tensor(ids + [self.pad_token_id] * padding)
        targets = torch.full((self.max_length,), IGNORE_INDEX)
        targets[len(ids) - 1] = self.labels[i]
        return input_ids, targets

    def class_counts(self) -> dict[str, int]:
        """How many examples each class has: ``{label name: count}``."""
        counts = Counter(self.labels)
        return {name: counts[i] for i, name in enumerate(self.label_names)}


# --- Model surgery -------------------------------------------------------------------------


def make_classifier(
    model: GPTModel,
    num_classes: int,
    trainable: Sequence[str] | Literal["all"] = DEFAULT_TRAINABLE,
) -> GPTModel:
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
    head = nn.Linear(model.cfg.emb_dim, num_classes)
    model.out_head = head.to(device=model.tok_emb.weight.device, dtype=model.tok_emb.weight.dtype)
    if model.cfg.tie_weights:
        model.cfg = dataclasses.replace(model.cfg, tie_weights=False)  # a copy: others may share the config
    set_trainable(model, trainable)
    return model


def set_trainable(model: nn.Module, trainable: Sequence[str] | Literal["all"]) -> None:
    """Freeze every parameter of ``model``, then unfreeze the named submodules (or ``"all"``)."""
    if trainable == "all":
        model.requires_grad_(True)
        return
    if isinstance(trainable, str):
        raise TypeError(f"trainable must be a list of module names or 'all', not the string {trainable!r}")
    modules = [submodule(model, name) for name in trainable]
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, where a negative number indexes from the end."""
    module = model
    for part in name.split("."):
        if part.lstrip("-").isdigit() and isinstance(module, (nn.Sequential, nn.ModuleList)):
            if not -len(module) <= int(part) < len(module):
                raise ValueError(f"{name!r}: index {part} is out of range for {len(module)} modules")
            module = module[int(part)]
        elif part in module._modules:
            module = module._modules[part]
        else:
            children = [child for child, _ in model.named_children()]
            raise ValueError(f"the model has no submodule {name!r}; its top-level modules are {children}")
    return module


def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens, classes)`` logits and ``(batch,)`` real lengths -> ``(batch, classes)``:
    the scores at position ``length - 1`` of each sequence, its last real token."""
    if lengths.min() < 1 or lengths.max() > logits.shape[1]:
        raise ValueError(f"lengths must be in [1, {logits.shape[1]}], got {lengths.tolist()}")
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths.to(logits.device) - 1]


# --- Evaluation and training ---------------------------------------------------------------


@torch.no_grad()
def calc_accuracy_loader(
    data_loader: DataLoader, model: nn.Module, device: torch.device | str, num_batches: int | None = None
) -> float:
    """Fraction of correctly classified examples over the first ``num_batches`` batches
    (all when None) of ``(input_ids, targets)`` batches from :class:`ClassificationDataset`.

    The prediction is the arg-max at the one position whose target is not ignored.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    for i, (input_ids, targets) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        logits = model(input_ids.to(device))
        targets = targets.to(device)
        labelled = targets != IGNORE_INDEX  # (batch, tokens), one True per row
        correct += int((logits[labelled].argmax(dim=-1) == targets[labelled]).sum())
        total += int(labelled.sum())
    model.train(was_training)
    if total == 0:
        raise ValueError("the data loader gave no labelled examples")
    return correct / total


@dataclass
class ClassifierTraining:
    """What :func:`train_classifier` measured."""

    history: History                  # losses every eval_every steps, from train_model
    accuracy_before: dict[str, float]  # {"train": ..., "val": ...} with the untrained head
    accuracy_after: dict[str, float]


def train_classifier(
    model: GPTModel,
    train_loader: DataLoader,
    val_loader: DataLoader,
    epochs: int = 5,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    eval_every: int = 50,
    eval_iter: int | None = 5,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ClassifierTraining:
    """Fine-tune a :func:`make_classifier` model for ``epochs`` passes over ``train_loader``.

    This is :func:`minigpt.training.train_model` unchanged: the labels are next-token
    targets (see the module docstring), so its cross-entropy is the classification
    loss. As in the book the learning rate is constant (no warm-up, no decay); 5e-5
    suits pretrained weights, a randomly initialised model wants about 1e-3.
    Accuracy is measured on the whole train and validation loaders before and after.
    """
    device = select_device(device) if not isinstance(device, torch.device) else device
    model.to(device)
    before = {"train": calc_accuracy_loader(train_loader, model, device),
              "val": calc_accuracy_loader(val_loader, model, device)}
    config = TrainConfig(max_steps=epochs * len(train_loader), lr=lr, min_lr=lr, warmup_steps=0,
                         weight_decay=weight_decay, eval_every=eval_every, eval_iter=eval_iter)
    history = train_model(model, train_loader, val_loader, config, device=device, progress=progress)
    after = {"train": calc_accuracy_loader(train_loader, model, device),
             "val": calc_accuracy_loader(val_loader, model, device)}
    return ClassifierTraining(history, before, after)


@torch.no_grad()
def classify_texts(
    texts: Sequence[str],
    model: GPTModel,
    tokenizer: Any = None,
    label_names: Sequence[str] | None = None,
    max_length: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
) -> list[str] | list[int]:
    """The predicted class of each text: a name from ``label_names``, or the class id.

    Texts are cut to ``max_length`` tokens (default: the model's context length),
    right-padded to a common length and classified at their last real token.
    """
    max_length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    encoded = [tokenize(text, tokenizer)[:max_length] for text in texts]
    if not all(encoded):
        raise ValueError("cannot classify an empty text: it has no token to classify from")
    longest = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([ids + [pad_token_id] * (longest - len(ids)) for ids in encoded])
    lengths = torch.tensor([len(ids) for ids in encoded])
    was_training = model.training
    model.eval()
    logits = last_token_logits(model(input_ids.to(model.device)), lengths)
    model.train(was_training)
    predicted = logits.argmax(dim=-1).tolist()
    return [label_names[i] for i in predicted] if label_names is not None else predicted


def classify(
    text: str,
    model: GPTModel,
    tokenizer: Any = None,
    label_names: Sequence[str] | None = None,
    max_length: int | None = None,
) -> str | int:
    """The predicted class of one text (see :func:`classify_texts`)."""
    return classify_texts([text], model, tokenizer, label_names, max_length)[0]


# --- Saving and plotting -------------------------------------------------------------------


def save_classifier(model: GPTModel, directory: str | os.PathLike, label_names: Sequence[str]) -> None:
    """Write the model as ``save_pretrained`` does, plus ``classifier.json`` (the label names).

    The head has ``num_classes`` rows instead of ``vocab_size``, so the directory is
    read with :func:`load_classifier`, not ``GPTModel.from_pretrained``.
    """
    if model.out_head.out_features != len(label_names):
        raise ValueError(f"the head has {model.out_head.out_features} classes but {len(label_names)} "
                         "label names were given")
    model.save_pretrained(directory)
    labels_text = json.dumps({"label_names": list(label_names)}, indent=2)
    atomic_write(Path(directory) / LABELS_FILE, lambda tmp: Path(tmp).write_text(labels_text))


def load_classifier(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPTModel, list[str]]:
    """``(model, label_names)`` from a directory written by :func:`save_classifier`."""
    directory = Path(directory)
    labels_path = directory / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(f"{directory} has no {LABELS_FILE}; was it written by save_classifier?")
    label_names = json.loads(labels_path.read_text())["label_names"]
    cfg = GPTConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    model = make_classifier(GPTModel(cfg), len(label_names), trainable="all")
    model.load_state_dict(load_file(directory / WEIGHTS_FILE))
    return model.to(device).eval(), label_names


def plot_accuracy(before: dict[str, float], after: dict[str, float], path: str | os.PathLike | None = None) -> Figure:
    """Accuracy of each split before and after fine-tuning, as bars; a PNG at ``path`` if given."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    FigureCanvasAgg(fig)  # gives the figure a PNG canvas, without pyplot's global state
    ax = fig.add_subplot()
    splits = list(after)
    x = range(len(splits))
    ax.bar([i - 0.2 for i in x], [before.get(s, 0.0) for s in splits], width=0.4, label="before", color="tab:gray")
    ax.bar([i + 0.2 for i in x], [after[s] for s in splits], width=0.4, label="after", color="tab:blue")
    for i, split in zip(x, splits):
        ax.annotate(f"{after[split]:.1%}", (i + 0.2, after[split]), ha="center", va="bottom")
    ax.set_xticks(list(x), splits)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    fig.legend(loc="outside upper center", ncols=2, title="fine-tuning")
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


# --- The whole job -------------------------------------------------------------------------


def finetune_classifier(
    model: GPTModel,
    output_dir: str | os.PathLike,
    data: str | os.PathLike = "spam",
    *,
    text_column: str = "text",
    label_column: str = "label",
    balance: bool = True,
    subset: int | None = None,
    max_length: int | None = None,
    trainable: Sequence[str] | Literal["all"] = DEFAULT_TRAINABLE,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    epochs: int = 5,
    batch_size: int = 8,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    eval_every: int = 50,
    eval_iter: int | None = 5,
    seed: int = 123,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The job behind ``minigpt finetune classify``: data -> classifier -> ``output_dir``.

    Loads ``data`` (see :func:`load_labelled_texts`), balances the classes, keeps a
    random ``subset`` of that many examples if given, splits 70/10/20, turns
    ``model`` into a classifier (with LoRA of ``lora_rank`` on top when given, else
    training the ``trainable`` modules) and trains it with :func:`train_classifier`.
    ``output_dir`` receives the classifier (:func:`save_classifier`; LoRA merged),
    ``loss.png``, ``accuracy.png`` and ``metrics.json``, whose content is returned.
    """
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    device = select_device(device)
    tokenizer = get_gpt2_tokenizer()
    examples = load_labelled_texts(data, text_column, label_column)
    if balance:
        examples = balance_classes(examples, seed)
    if subset is not None:
        examples = random.Random(seed).sample(examples, min(subset, len(examples)))
    train, val, test = split_examples(examples, seed=seed)
    max_length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    train_set = ClassificationDataset(train, tokenizer, max_length)
    labels = train_set.label_names
    val_set = ClassificationDataset(val, tokenizer, max_length, label_names=labels)
    test_set = ClassificationDataset(test, tokenizer, max_length, label_names=labels)

    make_classifier(model, len(labels), trainable=[] if lora_rank else trainable)
    if lora_rank:
        print(apply_lora(model, lora_rank, lora_alpha if lora_alpha is not None else lora_rank))
    # A last, short batch would weigh as much as a full one; drop it unless it is the only one.
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size)
    val_loader = DataLoader(val_set, batch_size=batch_size)
    test_loader = DataLoader(test_set, batch_size=batch_size)
    trainable_parameters = model.num_parameters(trainable_only=True)
    model.to(device)
    test_before = calc_accuracy_loader(test_loader, model, device)
    result = train_classifier(model, train_loader, val_loader, epochs, lr, weight_decay, eval_every,
                              eval_iter, device, progress)
    result.accuracy_before["test"] = test_before
    result.accuracy_after["test"] = calc_accuracy_loader(test_loader, model, device)
    model.eval()  # no dropout from here on
    test_loss = calc_loss_loader(test_loader, model, device)
    if lora_rank:
        merge_lora(model)
    save_classifier(model, output_dir, labels)
    plot_losses(result.history, output_dir / "loss.png")
    plot_accuracy(result.accuracy_before, result.accuracy_after, output_dir / "accuracy.png")
    metrics = {
        "data": str(data), "label_names": labels, "max_length": train_set.max_length,
        "examples": {"train": len(train_set), "val": len(val_set), "test": len(test_set)},
        "trainable_parameters": trainable_parameters,
        "accuracy_before": result.accuracy_before, "accuracy": result.accuracy_after,
        "test_loss": test_loss,
    }
    atomic_write(output_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return metrics
