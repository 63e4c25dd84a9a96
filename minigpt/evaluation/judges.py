"""Judges: rating a model's response to an instruction from 0 to 100 (book chapter 7).

The one idea: a bigger (or better-tuned) language model grades the answers, given
the prompt and a reference answer, so that a free-form response gets a number.
A judge is anything with the call ``judge(entry, response) -> score``: a model
behind an HTTP chat API (:class:`HTTPJudge`: Ollama, or any OpenAI-compatible
server) or any minigpt model (:class:`ModelJudge`). ``entry`` is an instruction
entry ``{instruction, input, output}`` whose ``output`` is the reference answer.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from tqdm import tqdm

from minigpt.data.windows import tokenize
from minigpt.finetuning.instruction import Entry
from minigpt.finetuning.prompt_format import RESPONSE_HEADER, format_input
from minigpt.models.base import CausalLM, evaluating

MAX_SCORE = 100


class Judge(Protocol):
    """Anything that rates a response to an entry from 0 to 100 (None: no usable rating)."""

    def __call__(self, entry: Entry, response: str) -> float | None: ...


def judge_prompt(entry: Entry, response: str) -> str:
    """The book's rating request: the prompt, the reference output and the response to score."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{response}`"
        f" on a scale from 0 to {MAX_SCORE}, where {MAX_SCORE} is the best score. "
        "Respond with the integer number only."
    )


def parse_score(reply: str) -> int | None:
    """The first whole number in a judge's reply if it lies in 0..100, else None."""
    match = re.search(r"\d+", reply)
    if match is None or int(match.group()) > MAX_SCORE:
        return None
    return int(match.group())


class HTTPJudge:
    """A judge behind an HTTP chat API, e.g. a local Ollama server.

    ``url`` is the full endpoint: Ollama's ``http://localhost:11434/api/chat``, or an
    OpenAI-compatible ``.../v1/chat/completions`` (Ollama serves one too). Replies
    are requested without sampling (temperature 0), so scores are repeatable.
    """

    def __init__(self, url: str, model: str = "llama3", api_key: str | None = None, timeout: float = 120.0) -> None:
        self.url = url
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.ollama = url.rstrip("/").endswith("/api/chat")

    def _payload(self, prompt: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": prompt}]
        if self.ollama:
            return {"model": self.model, "messages": messages, "stream": False,
                    "options": {"temperature": 0, "seed": 123}}
        return {"model": self.model, "messages": messages, "temperature": 0}

    def chat(self, prompt: str) -> str:
        """Send one user message, return the reply's text."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(self._payload(prompt)).encode(), headers=headers)
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

    def __init__(self, model: CausalLM, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.score_ids = torch.tensor([tokenize(str(n), tokenizer)[0] for n in range(MAX_SCORE + 1)])

    @torch.no_grad()
    def __call__(self, entry: Entry, response: str) -> float:
        request = {"instruction": judge_prompt(entry, response)}
        prompt = tokenize(format_input(request) + RESPONSE_HEADER, self.tokenizer)
        ids = torch.tensor([prompt[-self.model.cfg.context_length:]], device=self.model.device)  # (1, tokens)
        with evaluating(self.model):
            logits = self.model(ids)[0, -1]  # (vocab,): the scores of the next token
        probs = logits[self.score_ids.to(logits.device)].float().softmax(dim=-1)  # (101,)
        return float(probs @ torch.arange(MAX_SCORE + 1.0, device=probs.device))


def judge_responses(entries: Sequence[dict[str, str]], judge: Judge, progress: bool = True) -> list[float | None]:
    """The judge's score for each entry's ``model_response``."""
    return [judge(entry, entry["model_response"])
            for entry in tqdm(entries, desc="judging", disable=not progress)]
