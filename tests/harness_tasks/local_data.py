"""Loads a task's documents from a JSON Lines file next to this one: no download, no network.

A task names it with ``custom_dataset: !function local_data.load`` and its file with
``dataset_kwargs: {file: NAME.jsonl}``; every document goes into the ``test`` split.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(file: str, **metadata) -> datasets.DatasetDict:
    """The documents of ``HERE / file`` (one JSON object a line) as the ``test`` split;
    ``metadata`` is what the harness passes to every task loader, unused here."""
    lines = (HERE / file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
