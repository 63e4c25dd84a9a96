"""Labelled texts for classification (book chapter 6): reading, balancing, splitting.

The one idea: a classification data set is a list of ``(text, label)`` pairs, and
everything before the model (which file, which classes, which split) is done on
those pairs alone.

The SMS Spam Collection is read one message per line, split at the first tab,
with no quote handling: 54 messages start with ``"``, and a CSV reader would
merge some of them with the lines that follow (pandas finds 5,572 messages
instead of 5,574). The book's figures come from that merged reading; we keep
every message. Both readings have 747 spam messages, so the balanced data set
has 1,494 texts either way.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from minigpt.io import sources
from minigpt.io.download import fetch

SMS_SPAM_LABELS = ("ham", "spam")

# One labelled text: (text, label name).
Example = tuple[str, str]

T = TypeVar("T")


def read_sms_spam(path: str | os.PathLike) -> list[Example]:
    """``(text, label)`` for every line ``label<TAB>text`` of the SMS Spam Collection.

    No quote handling: a ``"`` is part of the message (see the module docstring).
    A line without a tab or with a label other than ``ham``/``spam`` is an error
    naming its line number.
    """
    content = Path(path).read_text(encoding="utf-8")
    # split("\n"), not splitlines(): that would also split at characters such as U+2028.
    lines = content.split("\n")
    # A final newline leaves one empty string after the split: not a message.
    if lines and lines[-1] == "":
        lines.pop()
    examples = []
    for number, line in enumerate(lines, start=1):
        # partition at the *first* tab: a message may contain tabs of its own. rstrip("\r") accepts
        # Windows line ends.
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
        # newline="" above lets the csv module see the line ends itself, as it needs for quoted fields
        # that span lines.
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty: expected a header row naming the columns")
        for column in (text_column, label_column):
            if column not in header:
                raise ValueError(f"{path} has no column {column!r}; its columns are {header}")
        # Columns are found by name, so their order in the file does not matter.
        text_at = header.index(text_column)
        label_at = header.index(label_column)
        examples = []
        for row in reader:
            if not row:  # a blank line
                continue
            # A text with an unquoted delimiter splits into extra fields: stop here rather than read
            # shifted columns.
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
    """``"spam"`` for the SMS Spam Collection, or a CSV/TSV path (see :func:`read_labelled_file`).

    The collection is found in ``MINIGPT_DATA_DIR`` or the cache, or else taken from
    UCI's zip; either way its SHA-256 is checked.
    """
    if str(name_or_path) == "spam":
        return read_sms_spam(fetch(sources.SMS_SPAM))
    # "~" in a path is expanded as a shell would.
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
    # Undersample, not oversample: no text is repeated, so no copy can leak into the test split.
    smallest = min(len(indices) for indices in by_label.values())
    rng = random.Random(seed)
    # sorted(by_label) makes the draw order independent of the file's class order; sorting the kept
    # indices restores the file order.
    keep = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], smallest))
    return [examples[i] for i in keep]


def split_examples(
    examples: Sequence[T], train_frac: float = 0.7, val_frac: float = 0.1, seed: int = 123
) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with ``seed``, then cut into (train, validation, test); the test part
    gets the rest. 1,494 examples give the book's 1,045 / 149 / 300."""
    if train_frac <= 0 or val_frac < 0 or train_frac + val_frac >= 1:
        raise ValueError(f"need 0 < train_frac and train_frac + val_frac < 1, got {train_frac}, {val_frac}")
    shuffled = list(examples)
    # A private generator: the split depends on the seed only, not on the global random state.
    random.Random(seed).shuffle(shuffled)
    # int() rounds down; the test part takes what the two cuts leave.
    train_end = int(len(shuffled) * train_frac)
    val_end = train_end + int(len(shuffled) * val_frac)
    return shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:]


def label_names_of(examples: Iterable[Example]) -> list[str]:
    """The distinct labels, sorted (numerically when they are all integers): ham -> 0, spam -> 1."""
    labels = sorted({label for _, label in examples})
    if all(label.lstrip("-").isdigit() for label in labels):
        # "10" sorts before "2" as text: numeric labels get numeric order, so "0" is class 0.
        labels.sort(key=int)
    return labels

