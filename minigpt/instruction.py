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

What is new is in the batches: texts of different lengths are padded with
``<|endoftext|>``, and the targets of the padding are set to ``-100`` so the loss
ignores them, all but the first, which teaches the model to stop. Optionally the
prompt's targets are ignored too, so the model is graded only on its answers.

After training, the model answers the prompt of each test entry, and the answers
are scored: loss and perplexity on the test texts, and a 0-100 rating from a
*judge*, either a bigger language model behind an HTTP API (Ollama, or any
OpenAI-compatible server) or any minigpt model (see :class:`ModelJudge`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from minigpt.data import tokenize
from minigpt.download import fetch
from minigpt.generation import generate
from minigpt.lora import apply_lora, merge_lora
from minigpt.model import GPTModel
from minigpt.plots import plot_losses
from minigpt.tokenizer import ENDOFTEXT_ID, get_gpt2_tokenizer
from minigpt.training import (
    IGNORE_INDEX,
    TrainConfig,
    calc_loss_loader,
    perplexity,
    select_device,
    train_model,
)

PAD_TOKEN_ID = ENDOFTEXT_ID  # GPT-2 has no padding token: pad with <|endoftext|>

INSTRUCTION_DATA_RELPATH = "instruct/instruction-data.json"
INSTRUCTION_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
)
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"

PROMPT_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"

# An entry: {"instruction": str, "input": str (may be empty or absent), "output": str}.
Entry = dict[str, str]


# --- The prompt format ---------------------------------------------------------------------


def format_input(entry: Entry) -> str:
    """The prompt: the introduction, the instruction and, when not empty, the input."""
    text = f"{PROMPT_INTRO}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_response(entry: Entry) -> str:
    """What follows the prompt in a training text: the response header and the output."""
    return f"{RESPONSE_HEADER}{entry['output']}"


def extract_response(continuation: str) -> str:
    """The answer in what a model wrote after the prompt, without the response header."""
    return continuation.strip().removeprefix(RESPONSE_HEADER.strip()).strip()


# --- Data ----------------------------------------------------------------------------------


def load_instruction_data(path: str | os.PathLike | None = None) -> list[Entry]:
    """The entries of a JSON file holding a list of ``{instruction, input, output}`` objects.

    Without ``path``, the book's 1,100 entries (from ``MINIGPT_DATA_DIR`` or downloaded).
    Malformed JSON, or an entry without a string ``instruction`` or ``output``, is an
    error naming the place; ``input`` may be missing (it then counts as empty).
    """
    if path is None:
        path = fetch(INSTRUCTION_DATA_RELPATH, INSTRUCTION_DATA_URL, INSTRUCTION_DATA_SHA256)
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err
    return validate_entries(data, source=str(path))


def validate_entries(data: Any, source: str = "the data") -> list[Entry]:
    """``data`` itself if it is a non-empty list of valid entries; otherwise a ValueError
    that names the first bad entry by its index."""
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source} must hold a non-empty JSON list of {{instruction, input, output}} objects")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is a {type(entry).__name__}, not an object")
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
    test_end = train_end + int(len(data) * test_frac)
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
    """

    def __init__(self, data: Sequence[Entry], tokenizer: Any = None) -> None:
        validate_entries(list(data))
        self.examples = []
        for entry in data:
            prompt = tokenize(format_input(entry), tokenizer)
            response = tokenize(format_response(entry), tokenizer)
            self.examples.append(TokenizedExample(prompt + response, len(prompt)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenizedExample:
        return self.examples[i]


def collate_instructions(
    batch: Sequence[TokenizedExample | Sequence[int]],
    pad_token_id: int = PAD_TOKEN_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    mask_instruction: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of token-id sequences -> ``(inputs, targets)``, both ``(batch, tokens)`` long.

    Each sequence gets one ``pad_token_id`` (the end-of-text the model must learn to
    emit) and is padded with more to the longest sequence + 1; inputs drop the last
    position and targets the first (targets are inputs shifted by one). Target
    positions after the first end-of-text are ``ignore_index``: they are padding.
    With ``mask_instruction`` (items must then be :class:`TokenizedExample`) the
    targets that are prompt tokens are ignored too. ``allowed_max_length`` keeps only
    the first that many positions (with a masked prompt longer than that, nothing
    is left to grade).

    The book's example, ``[[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]``, gives the inputs
    ``[5, 6, 50256, 50256, 50256]`` and targets ``[6, 50256, -100, -100, -100]``
    for the second sequence.
    """
    examples = [item if isinstance(item, TokenizedExample) else TokenizedExample(list(item), 0)
                for item in batch]
    if mask_instruction and not all(isinstance(item, TokenizedExample) for item in batch):
        raise ValueError("mask_instruction needs TokenizedExample items (ids and prompt length), "
                         "e.g. from InstructionDataset")
    width = max(len(example.ids) for example in examples) + 1
    inputs, targets = [], []
    for ids, prompt_length in examples:
        padded = torch.tensor(ids + [pad_token_id] * (width - len(ids)))
        target = padded[1:].clone()
        target[len(ids):] = ignore_index  # keep the first pad, at len(ids) - 1: it ends the text
        if mask_instruction:
            # target[j] is token j + 1: positions before prompt_length - 1 predict prompt tokens.
            target[: max(prompt_length - 1, 0)] = ignore_index
        inputs.append(padded[:-1])
        targets.append(target)
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
) -> DataLoader:
    """Batches of ``(inputs, targets)`` for :func:`minigpt.training.train_model`."""
    collate = functools.partial(
        collate_instructions, allowed_max_length=allowed_max_length, mask_instruction=mask_instruction
    )
    return DataLoader(InstructionDataset(data, tokenizer), batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last, collate_fn=collate, num_workers=num_workers)


# --- Answering -----------------------------------------------------------------------------


def generate_response(
    model: GPTModel, entry: Entry, tokenizer: Any, max_new_tokens: int = 256, eos_id: int = PAD_TOKEN_ID
) -> str:
    """The model's greedy answer to the entry's prompt, stopped at end-of-text."""
    prompt = torch.tensor([tokenize(format_input(entry), tokenizer)], device=model.device)
    out = generate(model, prompt, max_new_tokens, eos_id=eos_id)
    new = out[0, prompt.shape[1]:].tolist()
    if eos_id in new:
        new = new[: new.index(eos_id)]
    return extract_response(tokenizer.decode(new))


def generate_responses(
    model: GPTModel, entries: Sequence[Entry], tokenizer: Any, max_new_tokens: int = 256, progress: bool = True
) -> list[dict[str, str]]:
    """Each entry with the model's answer added as ``model_response``."""
    return [
        {**entry, "model_response": generate_response(model, entry, tokenizer, max_new_tokens)}
        for entry in tqdm(entries, desc="responses", disable=not progress)
    ]


def save_responses(
    entries: Sequence[dict[str, str]], path: str | os.PathLike, scores: Sequence[float | None] | None = None
) -> None:
    """A JSON list of ``{instruction, input, output, model_response}`` (``output`` is the
    reference answer), each with its judge ``score`` when ``scores`` are given."""
    fields = ("instruction", "input", "output", "model_response")
    rows = [{field: entry.get(field, "") for field in fields} for entry in entries]
    for row, score in zip(rows, scores or []):
        row["score"] = score
    Path(path).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- Judging -------------------------------------------------------------------------------


class Judge(Protocol):
    """Anything that rates a response to an entry from 0 to 100 (None: no usable rating)."""

    def __call__(self, entry: Entry, response: str) -> float | None: ...


def judge_prompt(entry: Entry, response: str) -> str:
    """The book's rating request: the prompt, the reference output and the response to score."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{response}`"
        " on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def parse_score(reply: str) -> int | None:
    """The first whole number in a judge's reply if it lies in 0..100, else None."""
    match = re.search(r"\d+", reply)
    if match is None or int(match.group()) > 100:
        return None
    return int(match.group())


class HTTPJudge:
    """A judge behind an HTTP chat API, e.g. a local Ollama server.

    ``url`` is the full endpoint: Ollama's ``http://localhost:11434/api/chat``, or an
    OpenAI-compatible ``.../v1/chat/completions`` (Ollama serves one too). Replies
    are requested without sampling (temperature 0), so scores are repeatable.
    """

    def __init__(self, url: str, model: str = "llama3", api_key: str | None = None, timeout: float = 120.0) -> None:
        self.url, self.model, self.api_key, self.timeout = url, model, api_key, timeout
        self.ollama = url.rstrip("/").endswith("/api/chat")

    def chat(self, prompt: str) -> str:
        """Send one user message, return the reply's text."""
        messages = [{"role": "user", "content": prompt}]
        if self.ollama:
            payload = {"model": self.model, "messages": messages, "stream": False,
                       "options": {"temperature": 0, "seed": 123}}
        else:
            payload = {"model": self.model, "messages": messages, "temperature": 0}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(f"the judge at {self.url} did not answer: {err}") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"the judge at {self.url} did not answer with JSON: {err}") from err
        try:
            return reply["message"]["content"] if self.ollama else reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"unexpected reply from the judge at {self.url}: {str(reply)[:200]}") from err

    def __call__(self, entry: Entry, response: str) -> float | None:
        return parse_score(self.chat(judge_prompt(entry, response)))


class ModelJudge:
    """A minigpt model as the judge: the probability-weighted score it would answer.

    The rating request is wrapped in the Alpaca prompt (so an instruction-tuned model
    understands it), and the model's next-token probabilities are read for the 101
    tokens ``"0"`` .. ``"100"`` (each a single GPT-2 token). The score is their mean
    weighted by those probabilities, renormalised to sum to 1. Unlike parsing a
    generated number, this always gives a score, and a smooth one: a judge unsure
    between 80 and 90 gives 85. Prompts longer than the context keep their end.
    """

    def __init__(self, model: GPTModel, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.score_ids = torch.tensor([tokenize(str(n), tokenizer)[0] for n in range(101)])

    @torch.no_grad()
    def __call__(self, entry: Entry, response: str) -> float:
        request = {"instruction": judge_prompt(entry, response)}
        prompt = tokenize(format_input(request) + RESPONSE_HEADER, self.tokenizer)
        ids = torch.tensor([prompt[-self.model.cfg.context_length:]], device=self.model.device)
        was_training = self.model.training
        self.model.eval()
        logits = self.model(ids)[0, -1]
        self.model.train(was_training)
        probs = logits[self.score_ids.to(logits.device)].float().softmax(dim=-1)
        return float(probs @ torch.arange(101.0, device=probs.device))


def judge_responses(entries: Sequence[dict[str, str]], judge: Judge, progress: bool = True) -> list[float | None]:
    """The judge's score for each entry's ``model_response``."""
    return [judge(entry, entry["model_response"])
            for entry in tqdm(entries, desc="judging", disable=not progress)]


# --- The whole job -------------------------------------------------------------------------


def finetune_instructions(
    model: GPTModel,
    output_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    subset: int | None = None,
    epochs: int = 2,
    batch_size: int = 8,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    allowed_max_length: int = 1024,
    mask_instruction: bool = False,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    max_new_tokens: int = 256,
    num_responses: int | None = None,
    judge: Judge | None = None,
    eval_every: int = 50,
    eval_iter: int | None = 5,
    seed: int = 123,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The job behind ``minigpt finetune instruct``: data -> tuned model -> answers -> scores.

    Loads ``data`` (default: the book's 1,100 entries), keeps the first ``subset``
    entries if given, splits 85/5/10 (train/val/test), fine-tunes with
    :func:`minigpt.training.train_model` (constant learning rate, like the book; with
    LoRA when ``lora_rank`` is given), then answers the first ``num_responses`` test
    prompts (all when None) and rates them with ``judge`` if one is given.
    ``output_dir`` receives the model (``save_pretrained``; LoRA merged), ``loss.png``,
    ``responses.json`` and ``metrics.json``, whose content is returned: test loss and
    perplexity, and the mean judge score (None without a judge).
    """
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    device = select_device(device)
    tokenizer = get_gpt2_tokenizer()
    entries = load_instruction_data(data)[:subset]
    train, val, test = split_instruction_data(entries)
    if not (train and val and test):
        raise ValueError(f"{len(entries)} entries split into {len(train)} train, {len(val)} validation and "
                         f"{len(test)} test entries; each part needs one at least: use 20 entries or more")
    max_length = min(allowed_max_length, model.cfg.context_length)

    def loader(split: list[Entry], shuffle: bool) -> DataLoader:
        return instruction_dataloader(split, tokenizer, batch_size, shuffle=shuffle,
                                      allowed_max_length=max_length, mask_instruction=mask_instruction)

    train_loader, val_loader, test_loader = loader(train, True), loader(val, False), loader(test, False)
    if lora_rank:
        print(apply_lora(model, lora_rank, lora_alpha if lora_alpha is not None else lora_rank))
    config = TrainConfig(max_steps=epochs * len(train_loader), lr=lr, min_lr=lr, warmup_steps=0,
                         weight_decay=weight_decay, eval_every=eval_every, eval_iter=eval_iter,
                         sample_prompt=format_input(val[0]), sample_tokens=35)
    history = train_model(model, train_loader, val_loader, config, device=device, tokenizer=tokenizer,
                          progress=progress)
    model.eval()  # no dropout from here on
    test_loss = calc_loss_loader(test_loader, model, device)
    responses = generate_responses(model, test[:num_responses], tokenizer, max_new_tokens, progress)
    scores = judge_responses(responses, judge, progress) if judge is not None else None
    if lora_rank:
        merge_lora(model)
    model.save_pretrained(output_dir)
    plot_losses(history, output_dir / "loss.png")
    save_responses(responses, output_dir / "responses.json", scores)
    valid = [score for score in scores or [] if score is not None]
    metrics = {
        "data": str(data or INSTRUCTION_DATA_RELPATH),
        "examples": {"train": len(train), "val": len(val), "test": len(test)},
        "test_loss": test_loss, "test_perplexity": perplexity(test_loss),
        "judge_score": sum(valid) / len(valid) if valid else None,
        "judged": len(valid), "responses": len(responses),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
