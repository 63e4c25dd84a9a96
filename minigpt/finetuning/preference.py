"""Preference data: pairs of answers to one prompt, the one people preferred and the other.

The one idea: to teach a model *which* answer is better, show it both. An entry is an
instruction-tuning entry with two answers instead of one::

    {"instruction": ..., "input": ..., "chosen": "the preferred answer", "rejected": "the other"}

Each pair is tokenized once, as instruction tuning formats a text: the Alpaca prompt
(:func:`minigpt.finetuning.prompt_format.format_input`), the response header, then the answer and one
end-of-text; or, for a chat model, its chat template's user turn and assistant turn
(:class:`minigpt.finetuning.prompt_format.ChatTemplateFormat`). The two answers share the prompt.
A batch holds both sequences of every pair and, for each, a mask that marks the answer's
tokens: only they are scored, since the prompt is the same on both sides and tells nothing
about the preference (:mod:`minigpt.finetuning.dpo` computes the loss).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from minigpt.finetuning.instruction import end_of_text_id as _end_of_text_id
from minigpt.finetuning.instruction import read_json
from minigpt.finetuning.prompt_format import ALPACA, PromptFormat
from minigpt.io import sources
from minigpt.io.download import fetch
from minigpt.tokenizers.gpt2 import PAD_TOKEN_ID
from minigpt.training.losses import NUM_SCORED, NUM_TOKENS

logger = logging.getLogger(__name__)

# An entry: {"instruction", "input" (may be empty or absent), "output" (optional), "chosen", "rejected"}.
Entry = dict[str, str]

_REQUIRED = ("instruction", "chosen", "rejected")
_TEXT_FIELDS = ("instruction", "input", "output", "chosen", "rejected")
_MAX_LISTED = 10  # bad entries named in one error


def load_preference_data(path: str | os.PathLike | None = None) -> list[Entry]:
    """The entries of a JSON file holding a list of ``{instruction, input, chosen, rejected}``
    objects, checked by :func:`validate_preference_entries`.

    Without ``path``, the book's 1,100 entries (from ``MINIGPT_DATA_DIR``, the cache, or
    downloaded; checked by SHA-256); 6 of them have two identical answers and are dropped.
    """
    path = fetch(sources.PREFERENCE_DATA) if path is None else Path(path)
    return validate_preference_entries(read_json(path), source=str(path))


def validate_preference_entries(data: Any, source: str = "the data") -> list[Entry]:
    """The valid pairs of ``data``, a non-empty list of entries.

    Every bad entry is named in one ValueError by its index and key: a missing
    ``instruction``, ``chosen`` or ``rejected``, an empty answer, a field that is not a
    string. Pairs whose two answers are the same teach nothing: they are dropped, with
    one warning giving their count. Returns a new list.
    """
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source} must hold a non-empty JSON list of {{instruction, input, chosen, rejected}} "
                         "objects")
    # Every problem is collected before raising: one error names all the bad entries.
    problems = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            problems.append(f"entry {i} is a {type(entry).__name__}, not an object")
            continue
        problems += [f"entry {i} has no {key!r} field" for key in _REQUIRED if key not in entry]
        problems += [f"entry {i}: {key!r} must be a string, got {type(entry[key]).__name__}"
                     for key in _TEXT_FIELDS if key in entry and not isinstance(entry[key], str)]
        # An empty answer would have nothing to score but its end-of-text.
        problems += [f"entry {i}: {key!r} is empty" for key in ("chosen", "rejected")
                     if isinstance(entry.get(key), str) and not entry[key].strip()]
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"{source} has bad entries: " + "; ".join(problems[:_MAX_LISTED]) + more)
    # Identical answers give h = 0 whatever the model does: a constant loss with no gradient.
    kept = [entry for entry in data if entry["chosen"] != entry["rejected"]]
    if len(kept) < len(data):
        logger.warning("%s: dropped %d of %d pairs whose chosen and rejected answers are the same",
                       source, len(data) - len(kept), len(data))
    if not kept:
        raise ValueError(f"{source}: every pair has the same chosen and rejected answer; nothing to learn from")
    return kept


class PreferenceExample(NamedTuple):
    """One pair, tokenized: ``prompt + chosen`` and ``prompt + rejected`` are the two texts.

    ``prompt``: the Alpaca prompt and the response header (a chat template's prompt);
    ``chosen``, ``rejected``: each answer's ids and one end-of-text (the template's answer).
    ``reference``: the reference model's summed log-probabilities of (chosen, rejected) when precomputed (see
    :func:`minigpt.finetuning.reference.precompute_reference`), with ``reference_cut``, the
    ``allowed_max_length`` they were computed with.
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    reference: tuple[float, float] | None = None
    reference_cut: int | None = None


class PreferenceDataset(Dataset):
    """Pairs tokenized once, as :class:`PreferenceExample` items.

    The prompt (with the response header) and each answer are tokenized separately and
    concatenated, as instruction tuning does, so the boundary between prompt and answer
    is exact. ``tokenizer``: GPT-2's BPE when None, or any with tiktoken's ``encode``.
    ``end_of_text_id`` (default: the tokenizer's, :func:`minigpt.finetuning.instruction.end_of_text_id`)
    ends each answer when the format asks for it (Alpaca's does) and pads the batches.
    ``prompt_format``: :data:`minigpt.finetuning.instruction.ALPACA` or a chat template's format.
    ``entries`` are the entries kept (pairs with two identical answers are dropped).
    """

    def __init__(self, data: Sequence[Entry], tokenizer: Any = None, end_of_text_id: int | None = None,
                 prompt_format: PromptFormat = ALPACA) -> None:
        self.entries = validate_preference_entries(list(data))
        # The end-of-text id also pads: padding is never scored, so the id it uses does not matter.
        self.pad_token_id = _end_of_text_id(tokenizer) if end_of_text_id is None else end_of_text_id
        end = [self.pad_token_id] if prompt_format.end_of_text else []
        encode = functools.partial(prompt_format.encode, tokenizer=tokenizer)
        header = prompt_format.header
        self.examples = []
        for entry in self.entries:
            # The header that opens every answer (Alpaca's "### Response:") is shared: it goes to the prompt.
            # Tokenized apart from the answers, so prompt + answer has the exact boundary the mask needs.
            prompt = encode(prompt_format.prompt(entry)) + (encode(header) if header else [])
            # The header went to the prompt, so each answer is tokenized without it.
            chosen, rejected = (encode(prompt_format.answer(entry, entry[key]).removeprefix(header)) + end
                                for key in ("chosen", "rejected"))
            self.examples.append(PreferenceExample(prompt, chosen, rejected))
        self.reference_logps: torch.Tensor | None = None  # (pairs, 2) when precomputed
        self.reference_cut: int | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PreferenceExample:
        example = self.examples[i]
        if self.reference_logps is None:
            return example
        # Precomputed values ride along with the example, so the collate function can batch them.
        chosen, rejected = self.reference_logps[i].tolist()
        return example._replace(reference=(chosen, rejected), reference_cut=self.reference_cut)

    def set_reference(self, logps: torch.Tensor, allowed_max_length: int | None) -> None:
        """Store precomputed reference log-probabilities, ``(pairs, 2)``: (chosen, rejected)
        summed over each answer as cut to ``allowed_max_length``; batches then carry them."""
        if tuple(logps.shape) != (len(self), 2):
            raise ValueError(f"reference log-probabilities must have shape ({len(self)}, 2), got {tuple(logps.shape)}")
        # On the CPU: DataLoader workers read them example by example.
        self.reference_logps = logps.detach().to("cpu", torch.float32)
        self.reference_cut = allowed_max_length

    def clear_reference(self) -> None:
        """Forget precomputed reference log-probabilities."""
        self.reference_logps = None
        self.reference_cut = None

    def collate_fn(self, allowed_max_length: int | None = None) -> Callable:
        """:func:`collate_preferences` with this dataset's padding id."""
        return functools.partial(collate_preferences, pad_token_id=self.pad_token_id,
                                 allowed_max_length=allowed_max_length)

    def fingerprint(self) -> str:
        """SHA-256 of every pair's token ids: equal for the same data tokenized alike."""
        digest = hashlib.sha256()
        for example in self.examples:
            # example[:3] is (prompt, chosen, rejected): the precomputed reference values are left out.
            digest.update(json.dumps(example[:3], separators=(",", ":")).encode())
        return digest.hexdigest()


def collate_preferences(
    batch: Sequence[PreferenceExample],
    pad_token_id: int = PAD_TOKEN_ID,
    allowed_max_length: int | None = None,
) -> dict[str, Any]:
    """A list of pairs -> a dict of tensors, every one ``(batch, tokens)`` wide:

    * ``chosen_ids``, ``rejected_ids``: prompt + answer, padded with ``pad_token_id`` to
      one common width (the longest of both sides), then cut to the first
      ``allowed_max_length`` tokens;
    * ``chosen_mask``, ``rejected_mask`` (bool): True on the answer's tokens (its
      end-of-text included), False on the prompt and the padding; a pair whose prompt
      fills the cut has nothing left to score;
    * ``num_scored`` (the number of pairs) and ``num_tokens`` (ids of both sides), the
      counts the training loop weighs and reports batches by;
    * with precomputed reference log-probabilities, ``ref_chosen_logps`` and
      ``ref_rejected_logps``, ``(batch,)``.
    """
    examples = list(batch)
    if not examples:
        raise ValueError("cannot collate an empty batch of pairs")
    # One width for both sides, so DPO can stack chosen and rejected rows into one forward pass.
    width = max(len(ex.prompt) + max(len(ex.chosen), len(ex.rejected)) for ex in examples)
    out: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        # Right padding: causal attention never lets a real token see the pads after it.
        ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.bool)
        for row, example in enumerate(examples):
            answer = getattr(example, side)
            end = len(example.prompt) + len(answer)
            ids[row, :end] = torch.tensor(example.prompt + answer)
            # The answer's tokens only (its end-of-text included): the prompt is the same on both sides
            # and says nothing about the preference; padding is not text at all.
            mask[row, len(example.prompt):end] = True
        # The cut drops the ends of long answers; precomputed reference values must come from the
        # same cut (_check_references).
        out[f"{side}_ids"], out[f"{side}_mask"] = ids[:, :allowed_max_length], mask[:, :allowed_max_length]
    out[NUM_SCORED] = len(examples)
    # Both sides have the same width, hence 2 x one side's ids.
    out[NUM_TOKENS] = 2 * out["chosen_ids"].numel()
    references = [example.reference for example in examples]
    # All or none: a batch mixing precomputed and missing values is refused (_check_references).
    if any(reference is not None for reference in references):
        _check_references(examples, allowed_max_length)
        # (batch, 2) -> two (batch,) tensors.
        out["ref_chosen_logps"], out["ref_rejected_logps"] = torch.tensor(references, dtype=torch.float32).T
    return out


def _check_references(examples: Sequence[PreferenceExample], allowed_max_length: int | None) -> None:
    """Precomputed log-probabilities fit only batches cut the same way; mixing would be silent."""
    if any(example.reference is None for example in examples):
        raise ValueError("some pairs of this batch have precomputed reference log-probabilities and some do not; "
                         "precompute them for the whole dataset")
    # A summed log-probability depends on how many answer tokens the cut left.
    cuts = {example.reference_cut for example in examples}
    if cuts != {allowed_max_length}:
        raise ValueError(f"the reference log-probabilities were precomputed with allowed_max_length={cuts.pop()}, "
                         f"but this batch is cut to {allowed_max_length}; precompute them again with the same length")


def preference_dataloader(
    data: Sequence[Entry] | PreferenceDataset,
    tokenizer: Any = None,
    batch_size: int = 8,
    shuffle: bool = False,
    drop_last: bool = False,
    allowed_max_length: int | None = 1024,
    num_workers: int = 0,
    prompt_format: PromptFormat = ALPACA,
) -> DataLoader:
    """Batches of pairs (see :func:`collate_preferences`) for :func:`minigpt.training.loop.train_model`
    with :class:`minigpt.finetuning.dpo.DPOLoss`; ``data``: entries, or a :class:`PreferenceDataset`
    (``tokenizer`` and ``prompt_format`` then unused: it was tokenized already)."""
    dataset = data if isinstance(data, PreferenceDataset) else PreferenceDataset(data, tokenizer,
                                                                                  prompt_format=prompt_format)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      collate_fn=dataset.collate_fn(allowed_max_length), num_workers=num_workers)
