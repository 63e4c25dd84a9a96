"""The job behind ``minigpt eval --tasks``: published benchmarks, run by lm-evaluation-harness.

The one idea: the harness owns the benchmarks (their data, prompts, few-shot examples and
metrics) and asks a model only for log-likelihoods and continuations; minigpt answers
them (:class:`minigpt.evaluation.harness.MiniGPTLM`). This job loads the model, checks the task
names before any time is spent, and hands both to ``lm_eval.simple_evaluate``.

The harness is optional (``pip install "minigpt[eval]"``): it is imported only when the
job runs, so that the rest of the command line starts without it. Real benchmarks
download their data sets from the Hugging Face hub the first time; tasks of one's own
(YAML files in ``include_path``) may read local files.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from minigpt.io.files import write_text
from minigpt.quantization.schemes import SCHEMES, check_scheme

logger = logging.getLogger(__name__)


@dataclass
class HarnessConfig:
    """Settings of :func:`run_tasks`."""

    checkpoint: str = field(metadata={"help": "a run directory, a weights directory or a GPT-2 name"})
    tasks: str | None = field(default=None, metadata={
        "help": "lm-evaluation-harness tasks, separated by commas (e.g. hellaswag,arc_easy; "
                "'lm-eval ls tasks' lists them)", "none": "no benchmark"})
    include_path: str | None = field(default=None, metadata={
        "help": "a folder of task YAML files of your own, next to the harness's", "none": "the harness's tasks"})
    num_fewshot: int | None = field(default=None, metadata={
        "help": "solved examples shown before each question", "none": "each task's own"})
    limit: float | None = field(default=None, metadata={
        "help": "only the first N examples of each task (below 1: that fraction); a quick look, "
                "not a score to report", "none": "all"})
    batch_size: int = field(default=8, metadata={"help": "requests scored at once"})
    max_gen_toks: int = field(default=256, metadata={
        "help": "tokens a generation may add when its task sets no limit"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, mps", "none": "the best available"})
    quantize: str | None = field(default=None, metadata={
        "help": "load the weights quantized: nf4, nf4-dq or int8", "none": "full precision", "choices": SCHEMES})
    output: str | None = field(default=None, metadata={
        "help": "write the harness's whole results to this JSON file", "none": "not written"})

    def __post_init__(self) -> None:
        if self.tasks is not None and not self.task_names():
            raise ValueError("tasks is empty: name at least one task, e.g. hellaswag")
        for name in ("batch_size", "max_gen_toks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be 0 or more, got {self.num_fewshot}")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"limit must be more than 0, got {self.limit}")
        if self.quantize is not None:
            check_scheme(self.quantize)
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise FileNotFoundError(f"include_path {self.include_path} is not a folder of task YAML files")

    def task_names(self) -> list[str]:
        return [name.strip() for name in (self.tasks or "").split(",") if name.strip()]


def run_tasks(settings: HarnessConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (when given; else ``settings.checkpoint`` loaded) on the tasks.

    Returns the dict of ``lm_eval.simple_evaluate``: ``results[task]["acc,none"]`` and the
    like, ``versions``, ``n-shot``, ``config``; :func:`results_table` shows it.
    """
    # Imported here: the harness is an optional dependency (see the module docstring).
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from minigpt.evaluation.harness import MiniGPTLM

    if not settings.task_names():
        raise ValueError("no tasks given: name at least one, e.g. hellaswag")
    manager = TaskManager(include_path=settings.include_path)
    _check_task_names(settings.task_names(), manager.all_tasks)
    lm = MiniGPTLM(model if model is not None else settings.checkpoint, device=settings.device,
                   batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks,
                   quantize=None if model is not None else settings.quantize)
    results = simple_evaluate(model=lm, tasks=settings.task_names(), num_fewshot=settings.num_fewshot,
                              limit=settings.limit, task_manager=manager, log_samples=False)
    if settings.output:
        write_text(settings.output, json.dumps(results, indent=2, default=handle_non_serializable))
        logger.info("wrote the results to %s", settings.output)
    return results


def _check_task_names(names: list[str], known: list[str]) -> None:
    """Fail before loading the model: name the unknown tasks and the closest known ones."""
    for name in names:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; 'lm-eval ls tasks' lists them"
            raise ValueError(f"unknown task {name!r}{hint}")


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of the scores (and of the groups, when there are)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
