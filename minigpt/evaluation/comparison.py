"""A/B evaluation: is the fine-tuned model better than its base on a golden set?

The one idea: both models answer the same prompts with the same decoding settings, a
judge compares the two answers to each prompt blindly and in both orders
(:mod:`minigpt.evaluation.pairwise`), and the result is the candidate's **win rate**,
``(wins + ties / 2) / n``, with a bootstrap confidence interval: 0.5 means "no
better, no worse", and an interval that contains 0.5 means the golden set is too
small to tell.

* the golden set (:func:`read_golden_set`): one JSON object per line,
  ``{"prompt": ..., "reference": ...}`` or an Alpaca entry ``{instruction, input, output}``;
  :func:`golden_from_instructions` takes the test split that instruction tuning never saw;
* answers (:func:`answer_prompts`): in batches, greedy by default, the same seed for both;
* :func:`judge_pairs`, :func:`score_answers`: every verdict, every 0..100 score;
* :func:`win_rate`: the rate, its interval and the counts; :func:`report_table`,
  :func:`plot_win_rate`, :func:`save_results`: the report.

A golden entry is an instruction entry (``output`` is the reference answer), so the
prompt the models see is the Alpaca prompt of :mod:`minigpt.finetuning.instruction`.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from minigpt.evaluation.pairwise import Outcome, PairJudge, PairVerdict, degenerate, judge_both_orders
from minigpt.evaluation.rouge import words
from minigpt.finetuning.instruction import Entry, end_of_text_id, load_instruction_data, split_instruction_data
from minigpt.finetuning.prompt_format import ALPACA, PromptFormat, extract_response, format_input
from minigpt.generation.batch import generate_batch
from minigpt.generation.sampling import check_sampling
from minigpt.io.files import atomic_write
from minigpt.training.plots import BEFORE_COLOR, TRAIN_COLOR, VAL_COLOR, new_figure, save_figure

OUTCOME_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


# --- The golden set ------------------------------------------------------------------------


def golden_entry(item: Any, where: str) -> Entry:
    """One golden example as an instruction entry: ``{prompt, reference}`` becomes
    ``{instruction: prompt, input: "", output: reference}``; an Alpaca entry is kept."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got a {type(item).__name__}")
    alpaca = "instruction" in item and "prompt" not in item
    needed = ("instruction", "output") if alpaca else ("prompt", "reference")
    bad = [name for name in (*needed, "input") if name in item and not isinstance(item[name], str)]
    missing = [name for name in needed if name not in item]
    if missing or bad:
        problem = f"no {', '.join(missing)}" if missing else f"{', '.join(bad)} not a string"
        raise ValueError(f"{where}: {problem}; each line must be {{\"prompt\": ..., \"reference\": ...}} "
                         "or {\"instruction\": ..., \"input\": ..., \"output\": ...} with strings")
    if alpaca:
        return {"instruction": item["instruction"], "input": item.get("input", ""), "output": item["output"]}
    return {"instruction": item["prompt"], "input": "", "output": item["reference"]}


def read_golden_set(path: str | os.PathLike) -> list[Entry]:
    """The examples of a JSONL golden set (blank lines are skipped); a bad line is a
    ValueError naming the file and its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no golden set at {path}: give a JSONL file of {{prompt, reference}} lines")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from err
        entries.append(golden_entry(item, f"{path} line {number}"))
    if not entries:
        raise ValueError(f"{path} holds no examples: write one JSON object per line, {{prompt, reference}}")
    return entries


def write_golden_set(entries: Sequence[Entry], path: str | os.PathLike) -> None:
    """Write entries as JSONL (atomically): ``{prompt, reference}`` where the input is
    empty, the Alpaca entry otherwise, so :func:`read_golden_set` gives them back."""
    save_jsonl([{"prompt": e["instruction"], "reference": e["output"]} if not e.get("input") else
                {"instruction": e["instruction"], "input": e["input"], "output": e["output"]} for e in entries], path)


def golden_from_instructions(data: str | os.PathLike | None = None, subset: int | None = None) -> list[Entry]:
    """The test split of instruction data (default: the book's 1,100 entries): the entries
    ``minigpt finetune instruct`` held out, for the same ``data`` and ``subset``."""
    _, _, test = split_instruction_data(load_instruction_data(data)[:subset])
    if not test:
        raise ValueError("the test split is empty: use 20 entries or more")
    return test


# --- Answers -------------------------------------------------------------------------------


@dataclass
class Decoding:
    """How both models answer: greedy by default; sampling draws from one seeded generator
    per model, so the two get the same random numbers."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def answer_prompts(model: nn.Module, entries: Sequence[Entry], tokenizer: Any, decoding: Decoding | None = None,
                   progress: bool = False, prompt_format: PromptFormat = ALPACA) -> list[str]:
    """The model's answer to each entry's prompt (written in ``prompt_format``: Alpaca, or a
    Llama-family model's chat template), batched, stopped at the tokenizer's end-of-text."""
    d = decoding or Decoding()
    eos = end_of_text_id(tokenizer)
    prompts = [prompt_format.encode(prompt_format.prompt(entry), tokenizer) for entry in entries]
    generator = torch.Generator(device=model.device).manual_seed(d.seed)
    new = generate_batch(model, prompts, d.max_new_tokens, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
                         eos_id=eos, generator=generator, batch_size=d.batch_size, progress=progress)
    # generate_batch keeps the end-of-text that ended an answer; the answer is what precedes it.
    return [extract_response(tokenizer.decode(ids[:-1] if ids[-1:] == [eos] else ids), prompt_format.header)
            for ids in new]


# --- Judging -------------------------------------------------------------------------------


def judge_pairs(judge: PairJudge, entries: Sequence[Entry], candidate: Sequence[str], base: Sequence[str],
                progress: bool = False) -> list[PairVerdict]:
    """:func:`minigpt.evaluation.pairwise.judge_both_orders` for each entry."""
    if not len(entries) == len(candidate) == len(base):
        raise ValueError(f"{len(entries)} entries, {len(candidate)} candidate and {len(base)} base answers: "
                         "give one answer of each model per entry")
    return [judge_both_orders(judge, entry, c, b) for entry, c, b in
            tqdm(list(zip(entries, candidate, base, strict=True)), desc="judging", disable=not progress)]


def score_answers(score: Callable[[Entry, str], float | None], entries: Sequence[Entry], answers: Sequence[str],
                  progress: bool = False) -> list[float | None]:
    """The single-answer 0..100 score of each answer (:mod:`minigpt.evaluation.judges`)."""
    return [score(entry, answer) for entry, answer in
            tqdm(list(zip(entries, answers, strict=True)), desc="scoring", disable=not progress)]


@dataclass
class WinRate:
    """The candidate's win rate ``(wins + ties / 2) / n`` and its bootstrap interval."""

    wins: int
    ties: int
    losses: int
    rate: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def win_rate(outcomes: Sequence[Outcome], confidence: float = 0.95, resamples: int = 10_000,
             seed: int = 0) -> WinRate:
    """The win rate of ``outcomes`` with a percentile bootstrap interval: the ``n`` prompts
    are drawn with replacement ``resamples`` times, and the interval holds the middle
    ``confidence`` share of the resampled rates (fixed ``seed``: repeatable).

    A resample's rate depends only on how many wins, ties and losses it drew, and those
    counts follow the multinomial distribution of ``n`` draws with the observed shares: so
    the counts are drawn directly, ``(resamples, 3)`` numbers instead of ``resamples * n``.
    """
    if not outcomes:
        raise ValueError("no outcomes: a win rate needs one judged prompt at least")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie between 0 and 1, got {confidence}")
    counts = np.array([list(outcomes).count(o) for o in OUTCOME_VALUE])  # wins, ties, losses
    n = len(outcomes)
    values = np.array(list(OUTCOME_VALUE.values()))
    resampled = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)  # (resamples, 3)
    low, high = np.quantile(resampled @ values / n, [(1 - confidence) / 2, (1 + confidence) / 2])
    wins, ties, losses = (int(c) for c in counts)
    return WinRate(wins, ties, losses, float(counts @ values / n), float(low), float(high), confidence)


# --- The report ----------------------------------------------------------------------------


@dataclass
class Comparison:
    """Everything a report shows: the models' names, the golden entries, both answers,
    every verdict, the scores (None without a score judge) and the perplexities
    (``{"text": ..., "base": ..., "candidate": ...}``, None when not measured)."""

    base: str
    candidate: str
    judge: str
    entries: list[Entry]
    base_answers: list[str]
    candidate_answers: list[str]
    verdicts: list[PairVerdict]
    base_scores: list[float | None] | None = None
    candidate_scores: list[float | None] | None = None
    perplexity: dict[str, Any] | None = None
    judge_limits: str | None = None  # what the judge cannot see, said under the table
    win: WinRate = field(init=False)

    def __post_init__(self) -> None:
        self.win = win_rate([v.outcome for v in self.verdicts])


def _mean(values: Sequence[float | None] | None) -> float | None:
    known = [v for v in values or [] if v is not None]
    return sum(known) / len(known) if known else None


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def degenerate_share(entries: Sequence[Entry], answers: Sequence[str]) -> float:
    """The share of answers that are empty, loop, or echo their prompt
    (:func:`minigpt.evaluation.pairwise.degenerate`)."""
    return sum(degenerate(entry, answer) is not None for entry, answer in zip(entries, answers, strict=True)) / len(
        answers)


def report_table(c: Comparison) -> str:
    """The report in Markdown: the judge and what it cannot see, the verdicts and win rate,
    then each model's mean score, mean answer length in words (long answers flatter judges),
    share of degenerate answers (empty, looping, the prompt echoed) and perplexity."""
    w = c.win
    lines = [f"| judge | prompts | wins | ties | losses | win rate ({w.confidence:.0%} CI) |",
             "|---|---:|---:|---:|---:|---|",
             f"| {c.judge} | {w.n} | {w.wins} | {w.ties} | {w.losses} | {w.rate:.3f} ({w.low:.3f} to {w.high:.3f}) |",
             ""]
    if c.judge_limits:
        lines += [f"Judged by {c.judge}: {c.judge_limits}.", ""]
    ppl = c.perplexity or {}
    text = f"perplexity ({ppl['text']})" if ppl else "perplexity"
    lines += [f"| model | | mean score (0-100) | mean answer length (words) | degenerate answers | {text} |",
              "|---|---|---:|---:|---:|---:|"]
    for role, name, answers, scores in (("base", c.base, c.base_answers, c.base_scores),
                                        ("candidate", c.candidate, c.candidate_answers, c.candidate_scores)):
        length = sum(len(words(a)) for a in answers) / len(answers)
        lines.append(f"| {role} | {name} | {_cell(_mean(scores))} | {length:.1f} | "
                     f"{degenerate_share(c.entries, answers):.0%} | {_cell(ppl.get(role), 2)} |")
    return "\n".join(lines) + "\n"


def forgetting_line(perplexity: dict[str, Any]) -> str:
    """The forgetting check in one line: both perplexities on a general text and the change."""
    base = perplexity["base"]
    candidate = perplexity["candidate"]
    return (f"perplexity on {perplexity['text']}: base {base:.2f}, candidate {candidate:.2f} "
            f"({candidate / base - 1:+.1%}; a rise means the candidate forgot some general text)")


def plot_win_rate(c: Comparison, path: str | os.PathLike | None = None) -> Figure:
    """One bar split into the shares of wins, ties and losses, with the win rate and its
    interval marked on it; saved as a PNG at ``path`` if given."""
    w = c.win
    fig, ax = new_figure(height=2.6)
    left = 0.0
    for count, label, color in ((w.wins, "candidate wins", TRAIN_COLOR), (w.ties, "ties", BEFORE_COLOR),
                                (w.losses, "base wins", VAL_COLOR)):
        ax.barh([0], [count / w.n], left=left, color=color, label=f"{label} ({count})", height=0.5)
        left += count / w.n
    ax.errorbar([w.rate], [0], xerr=[[w.rate - w.low], [w.high - w.rate]], fmt="D", color="black", capsize=6,
                label=f"win rate {w.rate:.2f} ({w.confidence:.0%} CI)")
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel(textwrap.fill(f"share of {w.n} prompts: {c.candidate} against {c.base}, judged by {c.judge}", 90))
    fig.legend(loc="outside upper center", ncols=4, fontsize="small")
    return save_figure(fig, path)


def result_rows(c: Comparison) -> list[dict[str, Any]]:
    """One row per prompt: the prompt, the reference, both answers, both verdicts (which
    order showed which answer first), the outcome and the scores."""
    rows = []
    for i, (entry, verdict) in enumerate(zip(c.entries, c.verdicts, strict=True)):
        rows.append({
            "prompt": format_input(entry), "reference": entry["output"],
            "base_answer": c.base_answers[i], "candidate_answer": c.candidate_answers[i],
            "verdict_candidate_as_A": verdict.candidate_first, "verdict_candidate_as_B": verdict.candidate_second,
            "outcome": verdict.outcome,
            "base_score": c.base_scores[i] if c.base_scores else None,
            "candidate_score": c.candidate_scores[i] if c.candidate_scores else None,
        })
    return rows


def save_jsonl(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """``rows`` as JSON lines, written atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_results(c: Comparison, path: str | os.PathLike) -> None:
    """The per-prompt JSONL of :func:`result_rows`."""
    save_jsonl(result_rows(c), path)
