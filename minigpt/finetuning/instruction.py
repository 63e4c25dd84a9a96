"""Instruction fine-tuning: teaching a GPT to follow requests (book chapter 7).

The one idea: nothing about the training changes. An instruction-following model
is still trained to predict the next token, only on texts that all follow one
template (Alpaca's)::

    Below is an instruction that describes a task. Write a response that
    appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:            <- only when the entry has an input
    {input}

    ### Response:
    {output}

What is new is in the batches: each text gets one ``<|endoftext|>`` appended,
which teaches the model to stop, and is padded with more to the batch's longest;
the targets after that appended end-of-text are set to ``-100`` so the loss
ignores the padding. Optionally the prompt's targets are ignored too, so the
model is graded only on its answers.

After training, the model answers the prompt of each test entry
(:func:`generate_responses`); :mod:`minigpt.evaluation.judges` rates the answers.

Chat models (Llama 3, SmolLM2, Qwen3) were trained on their own format, the chat
template their tokenizer ships: the datasets take a :mod:`minigpt.finetuning.prompt_format`
(Alpaca's by default; a chat template's turn marker then ends each text instead of an
appended end-of-text).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from minigpt.data.corpora import read_text_file
from minigpt.finetuning.neftune import neftune_lengths
from minigpt.finetuning.prompt_format import ALPACA, Entry, PromptFormat, extract_response
from minigpt.generation.generate import generate
from minigpt.io import sources
from minigpt.io.download import fetch
from minigpt.io.files import write_json
from minigpt.tokenizers.gpt2 import ENDOFTEXT_ID, PAD_TOKEN_ID
from minigpt.training.losses import IGNORE_INDEX, language_model_loss, next_token_loss


def end_of_text_id(tokenizer: Any = None) -> int:
    """The id that ends a text and pads a batch: the tokenizer's ``eot_token`` (a Hugging Face
    tokenizer's ``eos_token``), GPT-2's ``<|endoftext|>`` (50256) without a tokenizer."""
    # One id both ends a text and pads a batch: GPT-2's vocabulary has no padding token.
    return ENDOFTEXT_ID if tokenizer is None else getattr(tokenizer, "eot_token", ENDOFTEXT_ID)


# --- Data ----------------------------------------------------------------------------------


def load_instruction_data(path: str | os.PathLike | None = None) -> list[Entry]:
    """The entries of a JSON file holding a list of ``{instruction, input, output}`` objects.

    Without ``path``, the book's 1,100 entries (from ``MINIGPT_DATA_DIR``, the cache, or
    downloaded; checked by SHA-256).
    Malformed JSON, or an entry without a string ``instruction`` or ``output``, is an
    error naming the place; ``input`` may be missing (it then counts as empty).
    """
    # fetch checks the file's SHA-256: a changed upstream copy cannot silently change the results.
    path = fetch(sources.INSTRUCTION_DATA) if path is None else Path(path)
    return validate_entries(read_json(path), source=str(path))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON content of ``path``; malformed JSON, JSON nested deeper than Python's parser
    recurses, or a file that is not UTF-8 is a ValueError naming the file (and the place)."""
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err
    # json.loads recurses once per nesting level: [[[[...]]]] thousands deep overflows the stack.
    except RecursionError:
        raise ValueError(f"{path} nests JSON lists or objects too deeply to read; the data is a flat list of "
                         "objects") from None


def validate_entries(data: Any, source: str = "the data") -> list[Entry]:
    """``data`` itself if it is a non-empty list of valid entries; otherwise a ValueError
    that names the first bad entry by its index."""
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source} must hold a non-empty JSON list of {{instruction, input, output}} objects")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is a {type(entry).__name__}, not an object")
        # input is optional (many Alpaca entries have none); instruction and output are not.
        for field in ("instruction", "output"):
            if field not in entry:
                raise ValueError(f"{source}: entry {i} has no {field!r} field (it has {sorted(entry)})")
        for field in ("instruction", "input", "output"):
            if field in entry and not isinstance(entry[field], str):
                raise ValueError(f"{source}: entry {i}: {field!r} must be a string, "
                                 f"got {type(entry[field]).__name__}")
    return data


def split_instruction_data(
    data: Sequence[Entry], train_frac: float = 0.85, test_frac: float = 0.10
) -> tuple[list[Entry], list[Entry], list[Entry]]:
    """(train, validation, test) in file order, as the book cuts them: the first 85 %
    train, the next 10 % test, the rest validation: 935 / 55 / 110 of 1,100 entries."""
    if train_frac <= 0 or test_frac < 0 or train_frac + test_frac >= 1:
        raise ValueError(f"need 0 < train_frac and train_frac + test_frac < 1, got {train_frac}, {test_frac}")
    train_end = int(len(data) * train_frac)
    # The test part follows the training part; the validation part gets what is left at the end.
    test_end = train_end + int(len(data) * test_frac)
    # Returned as (train, validation, test), although the test part is cut before the validation
    # part: the book's order, which its figures depend on.
    return list(data[:train_end]), list(data[test_end:]), list(data[train_end:test_end])


class TokenizedExample(NamedTuple):
    """The token ids of prompt + response, and how many of them are the prompt."""

    ids: list[int]
    prompt_length: int


class InstructionDataset(Dataset):
    """Entries tokenized once, as :class:`TokenizedExample` items.

    Prompt and response are tokenized separately and concatenated, so the boundary
    between them is exact (for masking the prompt), and the prompt's ids are the
    same as when the model later sees the prompt alone to answer it.
    ``prompt_format``: :data:`ALPACA` (default) or a :class:`ChatTemplateFormat`;
    ``pad_token_id``: the tokenizer's end-of-text (:func:`end_of_text_id`), which
    :meth:`collate_fn` appends (when the format asks for it) and pads with.
    """

    def __init__(self, data: Sequence[Entry], tokenizer: Any = None, prompt_format: PromptFormat = ALPACA) -> None:
        validate_entries(list(data))
        self.prompt_format = prompt_format
        self.pad_token_id = end_of_text_id(tokenizer)
        self.examples = []
        for entry in data:
            # Tokenized separately: BPE could merge across the boundary if prompt and answer were one
            # string, and the prompt's ids must equal those the model sees when it answers.
            prompt = prompt_format.encode(prompt_format.prompt(entry), tokenizer)
            response = prompt_format.encode(prompt_format.answer(entry), tokenizer)
            # The prompt's length is kept, so the collate function can ignore its targets (mask_instruction).
            self.examples.append(TokenizedExample(prompt + response, len(prompt)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenizedExample:
        return self.examples[i]

    def collate_fn(self, allowed_max_length: int | None = None, mask_instruction: bool = False) -> Callable:
        """:func:`collate_instructions` with this dataset's padding id and end-of-text rule."""
        # A partial, not a closure: DataLoader worker processes must be able to pickle it.
        return functools.partial(collate_instructions, pad_token_id=self.pad_token_id,
                                 allowed_max_length=allowed_max_length, mask_instruction=mask_instruction,
                                 end_of_text=self.prompt_format.end_of_text)


def collate_instructions(
    batch: Sequence[TokenizedExample | Sequence[int]],
    pad_token_id: int = PAD_TOKEN_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    mask_instruction: bool = False,
    end_of_text: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of token-id sequences -> ``(inputs, targets)``, both ``(batch, tokens)`` long.

    Each sequence gets one ``pad_token_id`` appended (the end-of-text the model must
    learn to emit) and is padded with more to the longest sequence + 1; inputs drop
    the last position and targets the first (targets are inputs shifted by one).
    The targets after the *appended* end-of-text are ``ignore_index``: they are
    padding. The masking goes by position, not by id, so an end-of-text that is part
    of a text itself stays a target like any other token, and so does the appended
    one. With ``mask_instruction`` (items must then be :class:`TokenizedExample`)
    the targets that are prompt tokens are ignored too. ``allowed_max_length`` keeps
    only the first that many positions (with a masked prompt longer than that,
    nothing is left to grade). ``end_of_text=False`` appends nothing: for texts that
    end themselves (a chat template's end-of-turn); their last token is then the last
    target.

    The book's example, ``[[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]``, gives the inputs
    ``[5, 6, 50256, 50256, 50256]`` and targets ``[6, 50256, -100, -100, -100]``
    for the second sequence; ``[5, 50256, 6]`` beside ``[0, 1, 2, 3, 4]`` gives the
    targets ``[50256, 6, 50256, -100, -100]``.
    """
    # Plain id lists (the book's format) are examples with an empty prompt.
    examples = [item if isinstance(item, TokenizedExample) else TokenizedExample(list(item), 0)
                for item in batch]
    if mask_instruction and not all(isinstance(item, TokenizedExample) for item in batch):
        raise ValueError("mask_instruction needs TokenizedExample items (ids and prompt length), "
                         "e.g. from InstructionDataset")
    # The end-of-text id doubles as the padding id: GPT-2 has no pad token.
    end = [pad_token_id] if end_of_text else []
    # The width: the longest text plus its end-of-text; inputs and targets are each one column
    # shorter after the shift below.
    width = max(len(example.ids) + len(end) for example in examples)
    inputs = []
    targets = []
    for ids, prompt_length in examples:
        ids = ids + end
        # (width,): the text, its end-of-text, then more of the same id as padding.
        padded = torch.tensor(ids + [pad_token_id] * (width - len(ids)))
        # Targets are the inputs shifted left by one: position t learns to predict token t + 1.
        target = padded[1:].clone()
        # Positions from len(ids) - 1 on predict padding; the appended end-of-text (the last of
        # ids), which teaches the model to stop, stays a target.
        # -100 is cross_entropy's ignore_index: those positions add nothing to the loss or its mean.
        target[len(ids) - 1:] = ignore_index
        if mask_instruction:
            # target[j] is token j + 1: positions before prompt_length - 1 predict prompt tokens.
            target[: max(prompt_length - 1, 0)] = ignore_index
        # The inputs drop the last column: nothing after it is there to predict.
        inputs.append(padded[:-1])
        targets.append(target)
    # The cut comes last, so a row longer than it loses its end (and possibly its end-of-text).
    return torch.stack(inputs)[:, :allowed_max_length], torch.stack(targets)[:, :allowed_max_length]


def instruction_dataloader(
    data: Sequence[Entry],
    tokenizer: Any = None,
    batch_size: int = 8,
    shuffle: bool = False,
    drop_last: bool = False,
    allowed_max_length: int | None = 1024,
    mask_instruction: bool = False,
    num_workers: int = 0,
    prompt_format: PromptFormat = ALPACA,
) -> DataLoader:
    """Batches of ``(inputs, targets)`` for :func:`minigpt.training.loop.train_model`."""
    dataset = InstructionDataset(data, tokenizer, prompt_format)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      collate_fn=dataset.collate_fn(allowed_max_length, mask_instruction), num_workers=num_workers)


def example_lengths(targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Each example's length without padding, ``(batch,)``, from the ``(batch, tokens)`` targets
    of :func:`collate_instructions`: the position of its last scored target, plus 1.

    The ids cannot tell (the padding id is end-of-text, which a text may hold too), the
    targets can: the appended end-of-text is the last target kept, and the inputs after
    its position are padding. A row whose targets are all ignored (a masked prompt cut by
    ``allowed_max_length``) is real tokens only, so it counts as the full width.
    """
    # positions are 1-based: the last scored target at index j means j + 1 real input tokens.
    scored = targets != ignore_index
    positions = torch.arange(1, targets.shape[1] + 1, device=targets.device)
    last = (scored * positions).amax(dim=1)  # 0 where nothing is scored
    # Nothing scored: the row's end is unknown, so it counts as all real (the full width).
    return torch.where(scored.any(dim=1), last, targets.shape[1])


@language_model_loss
def instruction_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loss for instruction batches ``(inputs, targets)``: the next-token loss, with each
    example's length (:func:`example_lengths`) given to NEFTune (:mod:`minigpt.finetuning.neftune`).
    Without NEFTune it equals :func:`minigpt.training.losses.next_token_loss`."""
    # NEFTune's noise scale needs each example's own length, which only the targets reveal.
    with neftune_lengths(model, example_lengths(batch[1])):
        return next_token_loss(model, batch)


# --- Answering -----------------------------------------------------------------------------


def generate_response(
    model: torch.nn.Module, entry: Entry, tokenizer: Any, max_new_tokens: int = 256, eos_id: int | None = None,
    prompt_format: PromptFormat = ALPACA,
) -> str:
    """The model's greedy answer to the entry's prompt, stopped at end-of-text (``eos_id``,
    default the tokenizer's, :func:`end_of_text_id`)."""
    eos_id = end_of_text_id(tokenizer) if eos_id is None else eos_id
    # The prompt alone, without the response header: the model writes the header itself.
    prompt = torch.tensor([prompt_format.encode(prompt_format.prompt(entry), tokenizer)], device=model.device)
    out = generate(model, prompt, max_new_tokens, eos_id=eos_id)
    # Only the new tokens: the prompt is not part of the answer.
    new = out[0, prompt.shape[1]:].tolist()
    if eos_id in new:
        # Drop the end-of-text and anything after it.
        new = new[: new.index(eos_id)]
    return extract_response(tokenizer.decode(new), prompt_format.header)


def generate_responses(
    model: torch.nn.Module, entries: Sequence[Entry], tokenizer: Any, max_new_tokens: int = 256,
    progress: bool = True, prompt_format: PromptFormat = ALPACA,
) -> list[dict[str, str]]:
    """Each entry with the model's answer added as ``model_response``."""
    return [
        {**entry, "model_response": generate_response(model, entry, tokenizer, max_new_tokens,
                                                      prompt_format=prompt_format)}
        for entry in tqdm(entries, desc="responses", disable=not progress)
    ]


def save_responses(
    entries: Sequence[dict[str, str]], path: str | os.PathLike, scores: Sequence[float | None] | None = None
) -> None:
    """A JSON list of ``{instruction, input, output, model_response}`` (``output`` is the
    reference answer), each with its judge ``score`` when ``scores`` are given. Written
    atomically: an interrupted write leaves the previous file, never half of one."""
    fields = ("instruction", "input", "output", "model_response")
    # Fixed fields in a fixed order, so the files of different runs compare entry by entry.
    rows = [{field: entry.get(field, "") for field in fields} for entry in entries]
    if scores is not None:
        if len(scores) != len(rows):
            raise ValueError(f"{len(scores)} scores for {len(rows)} responses: give one score (or None) each")
        for row, score in zip(rows, scores, strict=True):
            row["score"] = score
    write_json(path, rows)
