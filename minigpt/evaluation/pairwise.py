"""Pairwise judges: which of two answers to one prompt is better, asked blindly and in both orders.

The one idea: a judge shown answers "A" and "B" is biased: language-model judges often
prefer the first position (or the longer answer) whatever the content. So the judge
never learns which model wrote which answer, and it is asked twice, once with the
candidate as A and once with it as B (:func:`judge_both_orders`). The candidate wins
only when both verdicts prefer it, loses only when both prefer the other answer, and
everything else, a verdict that flips with the order included, is a tie. A judge that
always says "A" thus gives nothing but ties.

A pairwise judge is anything with the call ``judge(entry, answer_a, answer_b) -> "A" | "B" | "tie"``
(``entry`` is an instruction entry whose ``output`` is the reference answer):

* :class:`ChatPairJudge`: a model behind an HTTP chat API (any OpenAI-compatible server,
  or Ollama's), through :class:`minigpt.evaluation.judges.HTTPJudge`'s client;
* :class:`ModelPairJudge`: a minigpt model, comparing its probabilities of "A" and "B" as
  the next token;
* :class:`OverlapJudge`: offline, the answer whose words overlap the reference more
  (ROUGE-L, :mod:`minigpt.evaluation.rouge`), a tie within a margin; a degenerate answer
  (:func:`degenerate`: empty, looping, or the prompt echoed) loses to any other, since
  word overlap alone rewards an answer that repeats the reference's words in a loop.
"""

from __future__ import annotations

import re
from typing import Any, Literal, NamedTuple, Protocol

import torch

from minigpt.data.windows import tokenize
from minigpt.evaluation.judges import HTTPJudge
from minigpt.evaluation.rouge import rouge_l, words
from minigpt.finetuning.instruction import Entry
from minigpt.finetuning.prompt_format import RESPONSE_HEADER, format_input
from minigpt.models.base import CausalLM, evaluating

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "tie", "loss"]  # for the candidate


class PairJudge(Protocol):
    """Anything that says which of two answers to ``entry`` is better: "A", "B" or "tie"."""

    def __call__(self, entry: Entry, answer_a: str, answer_b: str) -> Verdict: ...


def pairwise_prompt(entry: Entry, answer_a: str, answer_b: str) -> str:
    """The comparison request: the prompt, the reference answer and the two answers."""
    return (
        f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
        f"which response is better?\n\nResponse A: `{answer_a}`\n\nResponse B: `{answer_b}`\n\n"
        "Respond with the single letter A or B, or the word tie."
    )


def parse_verdict(reply: str) -> Verdict:
    """"A", "B" or "tie" from a judge's reply: its first standalone capital A or B, or the
    word tie in any case ("Response B." counts as B; the article "a" does not count); a
    reply naming none of them is a tie (no preference)."""
    match = re.search(r"\b(A|B|(?i:tie))\b", reply)
    if match is None:
        return "tie"
    return "tie" if match.group(1).lower() == "tie" else match.group(1)  # type: ignore[return-value]


class ChatPairJudge:
    """A chat model behind ``url`` (see :class:`minigpt.evaluation.judges.HTTPJudge`: Ollama's
    ``.../api/chat`` or an OpenAI-compatible ``.../v1/chat/completions``) answering
    :func:`pairwise_prompt` at temperature 0. ``score`` is the single-answer 0..100
    judge on the same endpoint."""

    def __init__(self, url: str, model: str = "llama3", api_key: str | None = None, timeout: float = 120.0) -> None:
        self.score = HTTPJudge(url, model, api_key, timeout)

    def __call__(self, entry: Entry, answer_a: str, answer_b: str) -> Verdict:
        return parse_verdict(self.score.chat(pairwise_prompt(entry, answer_a, answer_b)))


class ModelPairJudge:
    """A minigpt model as the judge: is "A" or "B" the more probable next token?

    The comparison request is wrapped in the Alpaca prompt (so an instruction-tuned model
    understands it); the logits of the next token are read for the tokens ``"A"`` and
    ``"B"`` and the larger wins (equal logits: a tie). Prompts longer than the context
    keep their end.
    """

    def __init__(self, model: CausalLM, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.choice_ids = [tokenize(letter, tokenizer)[0] for letter in ("A", "B")]

    @torch.no_grad()
    def probabilities(self, entry: Entry, answer_a: str, answer_b: str) -> tuple[float, float]:
        """``(P(A), P(B))`` renormalised over the two letters."""
        request = {"instruction": pairwise_prompt(entry, answer_a, answer_b)}
        prompt = tokenize(format_input(request) + RESPONSE_HEADER, self.tokenizer)
        ids = torch.tensor([prompt[-self.model.cfg.context_length:]], device=self.model.device)  # (1, tokens)
        with evaluating(self.model):
            logits = self.model(ids)[0, -1]  # (vocab,)
        p_a, p_b = logits[self.choice_ids].float().softmax(dim=-1).tolist()
        return p_a, p_b

    def __call__(self, entry: Entry, answer_a: str, answer_b: str) -> Verdict:
        p_a, p_b = self.probabilities(entry, answer_a, answer_b)
        return "A" if p_a > p_b else "B" if p_b > p_a else "tie"


Degeneracy = Literal["empty", "repetition", "echo"]
ECHO_F1 = 0.8  # an answer this close to its prompt (ROUGE-L F1) repeats the prompt rather than answers it


def repeats_a_phrase(answer_words: list[str], shortest: int = 2) -> bool:
    """Whether a phrase of ``shortest`` or more words comes twice in a row ("is sheep is sheep",
    "that the task that the task"): the loop a small model falls into, rare in written answers."""
    n = len(answer_words)
    return any(answer_words[i] == answer_words[i + k] and answer_words[i:i + k] == answer_words[i + k:i + 2 * k]
               for k in range(shortest, n // 2 + 1) for i in range(n - 2 * k + 1))


def degenerate(entry: Entry, answer: str) -> Degeneracy | None:
    """What is wrong with an answer no judge of word overlap should reward, or None:
    ``"empty"`` (no words), ``"repetition"`` (:func:`repeats_a_phrase`) or ``"echo"`` (the
    prompt repeated: ROUGE-L F1 against it of ``ECHO_F1`` or more, where the reference's is lower)."""
    answer_words = words(answer)
    if not answer_words:
        return "empty"
    if repeats_a_phrase(answer_words):
        return "repetition"
    prompt = f"{entry['instruction']} {entry.get('input', '')}"
    if rouge_l(answer, prompt).f1 >= ECHO_F1 > rouge_l(entry["output"], prompt).f1:
        return "echo"
    return None


class OverlapJudge:
    """The answer with the higher ROUGE-L F1 against the reference wins; F1 values within
    ``margin`` of each other are a tie. A :func:`degenerate` answer loses to one that is not
    (two degenerate answers tie), since overlap alone would reward "the the capital capital".
    Needs no model and no network; symmetric, so it never flips with the order. ``score``
    rates one answer: its F1 times 100, 0 when degenerate.

    What it cannot see: whether an answer is right, fluent or helpful; only how many of the
    reference's words it repeats in order. A correct answer in other words loses to a wrong one
    in the reference's words."""

    LIMITS = ("the overlap judge counts the words an answer shares with the reference, in order (ROUGE-L): it "
              "cannot see whether an answer is right, fluent or helpful, and a correct answer in other words loses "
              "to a wrong one in the reference's words; empty, looping and prompt-echoing answers lose")

    def __init__(self, margin: float = 0.02) -> None:
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be at least 0 and below 1 (a difference in ROUGE-L F1), got {margin}")
        self.margin = margin

    def __call__(self, entry: Entry, answer_a: str, answer_b: str) -> Verdict:
        junk_a, junk_b = (degenerate(entry, answer) is not None for answer in (answer_a, answer_b))
        if junk_a or junk_b:
            return "tie" if junk_a and junk_b else "B" if junk_a else "A"
        f_a, f_b = (rouge_l(answer, entry["output"]).f1 for answer in (answer_a, answer_b))
        if abs(f_a - f_b) <= self.margin:
            return "tie"
        return "A" if f_a > f_b else "B"

    def score(self, entry: Entry, answer: str) -> float:
        return 0.0 if degenerate(entry, answer) else 100 * rouge_l(answer, entry["output"]).f1


class PairVerdict(NamedTuple):
    """The outcome for the candidate and the two verdicts it came from: ``candidate_first``
    (candidate shown as A) and ``candidate_second`` (candidate shown as B)."""

    outcome: Outcome
    candidate_first: Verdict
    candidate_second: Verdict


def judge_both_orders(judge: PairJudge, entry: Entry, candidate: str, base: str) -> PairVerdict:
    """Ask ``judge`` with the candidate as A, then as B; see the module docstring."""
    first = judge(entry, candidate, base)
    second = judge(entry, base, candidate)
    if (first, second) == ("A", "B"):
        outcome: Outcome = "win"
    elif (first, second) == ("B", "A"):
        outcome = "loss"
    else:
        outcome = "tie"
    return PairVerdict(outcome, first, second)
