"""The job behind ``minigpt compare``: did fine-tuning make the model better, and did it forget?

The one idea: two numbers answer a learner who fine-tuned. The **win rate** of the
fine-tuned candidate against its base on a golden set, judged blindly in both orders
(:mod:`minigpt.evaluation.comparison`, :mod:`minigpt.evaluation.pairwise`): above 0.5, with an interval
clear of it, the candidate got better. And both models' **perplexity** on a general
text neither trained on (WikiText-2's test split): a clear rise means the candidate
forgot some of what pretraining taught it.

The output directory receives ``answers.jsonl`` (both answers side by side, written
before any judging), ``comparison.jsonl`` (per prompt: both answers and every verdict),
``report.md``, ``win_rate.png`` and ``report.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from minigpt.evaluation.comparison import (
    Comparison,
    Decoding,
    answer_prompts,
    degenerate_share,
    forgetting_line,
    golden_from_instructions,
    judge_pairs,
    plot_win_rate,
    read_golden_set,
    report_table,
    save_jsonl,
    save_results,
    score_answers,
)
from minigpt.evaluation.judges import ModelJudge
from minigpt.evaluation.pairwise import ChatPairJudge, ModelPairJudge, OverlapJudge
from minigpt.evaluation.perplexity import sliding_window_perplexity
from minigpt.io.files import write_json, write_text
from minigpt.jobs.evaluate import WIKITEXT2, text_token_ids
from minigpt.jobs.finetune import choose_prompt_format
from minigpt.lora.adapters import merge_lora
from minigpt.lora.files import load_lora
from minigpt.models.loader import check_spec, load, load_tokenizer
from minigpt.runtime.runtime import select_device

logger = logging.getLogger(__name__)

JUDGE_KINDS = ("overlap", "minigpt:PATH", "openai:URL", "ollama:URL")
MODEL_JUDGE_LIMITS = ("a language model compares the answers blindly, in both orders; it sees what its own training "
                      "lets it see, and may prefer longer answers or its own style")


@dataclass
class CompareConfig:
    """Settings of :func:`compare`."""

    base: str = field(metadata={"help": "the model before fine-tuning: a GPT-2 name, a weights/run directory "
                                        "or a preset"})
    candidate: str | None = field(default=None, metadata={
        "help": "the fine-tuned model: a run or weights directory", "none": "the base with --adapter"})
    adapter: str | None = field(default=None, metadata={
        "help": "a LoRA adapter file (save_lora) loaded onto the candidate", "none": "no adapter"})
    golden: str | None = field(default=None, metadata={
        "help": "a JSONL golden set: {prompt, reference} or {instruction, input, output} per line",
        "none": "the test split of the book's instruction data"})
    judge: str = field(default="overlap", metadata={
        "help": "overlap (ROUGE-L against the reference, offline), minigpt:PATH (a model's P(A) vs P(B)), "
                "openai:URL (an OpenAI-compatible server, e.g. http://localhost:8000/v1) or "
                "ollama:URL (e.g. http://localhost:11434)"})
    judge_model: str = field(default="llama3", metadata={"help": "the model name sent to an openai or ollama judge"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding the judge's API key (sent only when set)"})
    margin: float = field(default=0.02, metadata={"help": "overlap judge: ROUGE-L F1 differences up to this tie"})
    score: bool = field(default=False, metadata={
        "help": "also rate every answer 0-100 with the judge (overlap: ROUGE-L F1 x 100)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N golden examples", "none": "all"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest answer in tokens"})
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy answers, else sampling"})
    top_k: int | None = field(default=None, metadata={"help": "sample from the k best tokens", "none": "all"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling threshold", "none": "off"})
    seed: int = field(default=123, metadata={"help": "the sampling seed, the same for both models"})
    batch_size: int = field(default=8, metadata={"help": "prompts answered at once"})
    perplexity_text: str = field(default=WIKITEXT2, metadata={
        "help": f"the general text of the forgetting check: {WIKITEXT2} (WikiText-2's test split), a corpus "
                "name or a text file"})
    perplexity: bool = field(default=True, metadata={
        "help": "the forgetting check: both models' perplexity on perplexity_text"})
    perplexity_tokens: int | None = field(default=None, metadata={
        "help": "score only the first N tokens of that text (faster)", "none": "all"})
    stride: int | None = field(default=None, metadata={
        "help": "perplexity: tokens between window starts", "none": "half the context"})
    output: str = field(default="runs/compare", metadata={"help": "directory for the answers and the report"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, mps", "none": "the best available"})

    def __post_init__(self) -> None:
        for name in ("limit", "perplexity_tokens", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be at least 0 and below 1, got {self.margin}")
        self.decoding()  # checks the sampling settings now, before any model loads
        judge_backend(self.judge)

    def decoding(self) -> Decoding:
        return Decoding(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed, self.batch_size)


@dataclass
class CompareResult:
    """What :func:`compare` measured, the Markdown report, and where the files are."""

    comparison: Comparison
    report: str
    output: Path


def judge_backend(spec: str) -> tuple[str, str]:
    """``(kind, target)`` of a judge setting such as ``openai:http://localhost:8000/v1``."""
    kind, _, target = spec.partition(":")
    if spec == "overlap" or (kind in ("minigpt", "openai", "ollama") and target):
        return kind, target
    raise ValueError(f"unknown judge {spec!r}: use one of {', '.join(JUDGE_KINDS)}")


def chat_endpoint(kind: str, url: str) -> str:
    """The chat endpoint of a server: Ollama's ``/api/chat``; an OpenAI-compatible
    ``/chat/completions`` under the ``/v1`` base (both added unless already there)."""
    url = url.rstrip("/")
    if kind == "ollama":
        return url if url.endswith("/api/chat") else f"{url}/api/chat"
    if url.endswith("/chat/completions"):
        return url
    return f"{url}/chat/completions" if url.endswith("/v1") else f"{url}/v1/chat/completions"


def make_judges(settings: CompareConfig, device: Any) -> tuple[Any, Any, str, str | None]:
    """``(pairwise judge, single-answer 0..100 scorer, a name for the report, what it cannot see)``.
    A judge behind a URL is asked once now, so that an unreachable one fails before any model answers."""
    kind, target = judge_backend(settings.judge)
    if kind == "overlap":
        judge = OverlapJudge(settings.margin)
        return judge, judge.score, f"ROUGE-L overlap (margin {settings.margin:g})", OverlapJudge.LIMITS
    if kind == "minigpt":
        model = load(target).to(device).eval()  # the judge reads its own tokens
        own = load_tokenizer(target)
        return ModelPairJudge(model, own), ModelJudge(model, own), f"minigpt {target}", MODEL_JUDGE_LIMITS
    url = chat_endpoint(kind, target)
    judge = ChatPairJudge(url, settings.judge_model, api_key=os.environ.get(settings.api_key_env))
    judge.score.chat("Reply with the single word: ready.")  # reachable, and it answers
    return judge, judge.score, f"{settings.judge_model} at {url}", MODEL_JUDGE_LIMITS


def load_candidate(settings: CompareConfig) -> nn.Module:
    """The candidate model, its LoRA adapter loaded and merged when one is given."""
    model = load(settings.candidate or settings.base)
    if settings.adapter:
        load_lora(model, settings.adapter)
        merge_lora(model)  # answers and perplexity then run at the base model's speed
    return model


def check_models(settings: CompareConfig) -> None:
    """The base, the candidate and the adapter exist, before any of them loads."""
    s = settings
    if s.candidate is None and s.adapter is None:
        raise ValueError("give the fine-tuned model: candidate (a run directory) or adapter (a LoRA file), or both")
    for name in filter(None, (s.base, s.candidate)):
        check_spec(name)
    if s.adapter and not Path(s.adapter).is_file():
        raise FileNotFoundError(f"adapter {s.adapter} not found: give a LoRA file written by save_lora")


def compare(settings: CompareConfig, progress: bool = True) -> CompareResult:
    """Check every input, answer the golden set with both models, judge every pair in both
    orders, measure both perplexities, and write the report (see the module docstring).

    Every input (models, golden set, perplexity text, judge) is read or reached before any
    model answers; a step that fails later leaves a report of what was done."""
    s = settings
    check_models(s)
    device = select_device(s.device)
    output = Path(s.output)
    # Both models read the base's tokenizer (a fine-tune keeps it); the Llama family answers in its chat template.
    tokenizer = load_tokenizer(s.base)
    prompt_format = choose_prompt_format("auto", s.candidate or s.base, tokenizer)
    entries = (read_golden_set(s.golden) if s.golden else golden_from_instructions())[:s.limit]
    text_ids = text_token_ids(s.perplexity_text, tokenizer, s.perplexity_tokens) if s.perplexity else None
    judge, scorer, judge_name, limits = make_judges(s, device)

    models = {"base": load(s.base).to(device).eval(), "candidate": load_candidate(s).to(device).eval()}
    logger.info("%d golden prompts | base %s | candidate %s | judge %s", len(entries), s.base,
                s.candidate or f"{s.base} + {s.adapter}", judge_name)
    answers = {role: answer_prompts(model, entries, tokenizer, s.decoding(), progress, prompt_format)
               for role, model in models.items()}
    save_jsonl([{"prompt": e["instruction"], "input": e.get("input", ""), "reference": e["output"],
                 "base_answer": b, "candidate_answer": c}
                for e, b, c in zip(entries, answers["base"], answers["candidate"], strict=True)],
               output / "answers.jsonl")
    with _noted(output, "judging", "Both models' answers are in answers.jsonl."):
        verdicts = judge_pairs(judge, entries, answers["candidate"], answers["base"], progress)
        scores = {role: score_answers(scorer, entries, answers[role], progress) if s.score else None
                  for role in models}
    comparison = Comparison(s.base, s.candidate or f"{s.base} + {s.adapter}", judge_name, entries, answers["base"],
                            answers["candidate"], verdicts, scores["base"], scores["candidate"], judge_limits=limits)
    report = _write_report(comparison, s, output)  # the win rate is saved before the slower perplexity
    if text_ids is not None:
        with _noted(output, "measuring perplexity", report):
            comparison.perplexity = {"text": s.perplexity_text, "tokens": len(text_ids)}
            for role, model in models.items():
                measured = sliding_window_perplexity(model, text_ids, stride=s.stride, progress=progress)
                comparison.perplexity |= {role: measured.perplexity, "stride": measured.stride}
        report = _write_report(comparison, s, output)
    return CompareResult(comparison, report, output)


@contextmanager
def _noted(output: Path, step: str, done: str) -> Iterator[None]:
    """Run a step; if it fails (or is interrupted), ``report.md`` says so after what was already done."""
    try:
        yield
    except BaseException as err:
        write_text(output / "report.md", f"{done}\n\ncompare stopped while {step}: {err!r}\n")
        raise


def _write_report(comparison: Comparison, settings: CompareConfig, output: Path) -> str:
    """``report.md``, ``comparison.jsonl``, ``win_rate.png`` and ``report.json``; returns the report's text."""
    c = comparison
    report = report_table(c) + (f"\n{forgetting_line(c.perplexity)}\n" if c.perplexity else "")
    save_results(c, output / "comparison.jsonl")
    write_text(output / "report.md", report)
    plot_win_rate(c, output / "win_rate.png")
    write_json(output / "report.json", {"settings": asdict(settings), "win_rate": asdict(c.win),
                                        "degenerate": {role: degenerate_share(c.entries, answers) for role, answers
                                                       in (("base", c.base_answers),
                                                           ("candidate", c.candidate_answers))},
                                        "perplexity": c.perplexity})
    return report
