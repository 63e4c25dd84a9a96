"""Verifiable rewards: tasks whose answers a few lines of Python can check exactly.

The one idea: reinforcement learning needs a score for every sampled answer, and for some
tasks the score needs no model at all. A reward function is a plain callable::

    reward(prompt: str, answer: str) -> float

that reads the question from the prompt and checks the answer: 1.0 for ``"7 + 12 = "``
answered ``"19"``, 0.0 for anything else. GRPO (:mod:`minigpt.finetuning.grpo`) then raises the
probability of answers that scored above their group's mean.

:func:`arithmetic_task` is such a task, generated offline from a seed: every sum (or
larger of two, ``max``) of two operands in a range, split once into training prompts and
held-out prompts (no pair is in both). Its rewards are :func:`correct_answer` (exact match)
and :func:`answer_format` (the answer is a bare integer and nothing else), weighted 1 and
0.1: the small format reward gives a signal even to groups that get no answer right.
:func:`load_reward` loads any other reward function the user names as ``module:function``;
:func:`reward_table` runs the functions on a batch of answers and says which one failed, where.
"""

from __future__ import annotations

import functools
import importlib
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

RewardFn = Callable[[str, str], float]
_PROBLEM = re.compile(r"^(?:(\d+) \+ (\d+)|max\((\d+), (\d+)\)) = $")  # the prompts of arithmetic_task
_INTEGER = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class Problem:
    """One prompt and the answer a checker accepts (``answer`` is for supervised warm-up
    and for reading results; rewards compute the truth from the prompt themselves)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class RewardTask:
    """A task: its ``train`` and held-out ``test`` problems, and its weighted reward
    functions ``{name: (function, weight)}``; ``accuracy_reward`` names the one whose mean
    is the task's exact-match accuracy."""

    name: str
    train: list[Problem]
    test: list[Problem]
    rewards: dict[str, tuple[RewardFn, float]]
    accuracy_reward: str


def correct_answer(prompt: str, answer: str) -> float:
    """1.0 when ``answer`` (spaces around it ignored) is exactly the number the prompt asks
    for, ``"a + b = "`` (the sum) or ``"max(a, b) = "`` (the larger), else 0.0. Raises
    ``ValueError`` for a prompt of another form."""
    match = _PROBLEM.match(prompt)
    if match is None:
        raise ValueError(f"correct_answer checks prompts of the form 'a + b = ' or 'max(a, b) = ', not {prompt!r}")
    a, b = (int(match[1]), int(match[2])) if match[1] is not None else (int(match[3]), int(match[4]))
    return float(answer.strip() == str(a + b if match[1] is not None else max(a, b)))


def answer_format(prompt: str, answer: str) -> float:
    """1.0 when ``answer`` is one integer and nothing else (spaces around it ignored):
    the model stopped right after its number, else 0.0. The prompt is not read."""
    return float(_INTEGER.match(answer.strip()) is not None)


OPERATIONS: dict[str, tuple[str, Callable[[int, int], int]]] = {  # name -> (prompt template, result)
    "add": ("{} + {} = ", lambda a, b: a + b),
    "max": ("max({}, {}) = ", max),
}


def arithmetic_task(operation: str = "add", max_operand: int = 19, test_share: float = 0.2,
                    seed: int = 0) -> RewardTask:
    """Every problem ``a + b = `` (``operation="add"``) or ``max(a, b) = `` (``"max"``) with
    ``0 <= a, b <= max_operand``, shuffled with ``seed`` and split: the first ``test_share``
    of the pairs are held out (``test``), the rest train. The same arguments give the same
    split on every machine (Python's ``random`` with a fixed seed)."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; choose one of {', '.join(OPERATIONS)}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be at least 1, got {max_operand}")
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be between 0 and 1, got {test_share}")
    template, result = OPERATIONS[operation]
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    problems = [Problem(template.format(a, b), str(result(a, b))) for a, b in pairs]
    held_out = max(1, round(test_share * len(problems)))
    return RewardTask(f"{operation} up to {max_operand}", train=problems[held_out:], test=problems[:held_out],
                      rewards={"correct": (correct_answer, 1.0), "format": (answer_format, 0.1)},
                      accuracy_reward="correct")


# The tasks by name: one-token operands and answers in GPT-2's vocabulary, small enough for the tiny preset on a
# CPU. Each holds out 20% of its 400 pairs (80 prompts).
TASKS: dict[str, Callable[[], RewardTask]] = {
    "arithmetic": functools.partial(arithmetic_task, "add", 19),
    "larger": functools.partial(arithmetic_task, "max", 19),
}


def load_task(name: str) -> RewardTask:
    """The task ``name`` (one of :data:`TASKS`), with its default settings."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


def load_reward(spec: str) -> RewardFn:
    """The reward function ``spec`` names as ``module:function`` (``mypackage.rewards:exact``),
    importable from the current environment. Each failure says which part was wrong."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward {spec!r} is not of the form module:function (e.g. "
                         "minigpt.finetuning.reward_tasks:correct_answer)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH, "
                         "or installed?") from err
    function = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise ValueError(f"reward {spec!r}: {module_name} has no attribute {attribute!r}")
        function = getattr(function, part)
    if not callable(function):
        raise ValueError(f"reward {spec!r}: {attribute} is a {type(function).__name__}, not a function "
                         "(prompt, answer) -> float")
    return function


def _checked(value: object, name: str, index: int, answer: str) -> float:
    """``value`` as a float if a reward function may return it: a number (bools, numpy and
    0-d torch scalars included). NaN is passed on, for the caller to skip the answer's group;
    anything else, infinity included, is an error that names the function and the answer."""
    try:
        number = float(value) if not isinstance(value, (str, bytes)) else None  # float("1") would pass a string
    except (TypeError, ValueError):
        number = None
    if number is None or math.isinf(number):
        raise ValueError(f"reward function {name} returned {value!r} (a {type(value).__name__}) for answer {index} "
                         f"({answer!r}); it must return a finite number (NaN skips the answer's group)")
    return number


def reward_table(rewards: Mapping[str, tuple[RewardFn, float]], prompts: Sequence[str],
                 answers: Sequence[str]) -> torch.Tensor:
    """``(answers, functions)`` float32: every reward function on every ``(prompt, answer)``
    pair, in the order of ``rewards``. A function that raises, or returns something other
    than a number, stops with an error naming it and the answer; NaN is kept (see
    :func:`minigpt.finetuning.grpo.total_rewards`)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers: give one prompt per answer")
    table = []
    for name, (function, _) in rewards.items():
        column = []
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            try:
                value = function(prompt, answer)
            except Exception as err:  # the user's function: say which one failed, and on what
                raise ValueError(f"reward function {name} raised {type(err).__name__}: {err} on answer {i} "
                                 f"({answer!r}) to prompt {prompt!r}") from err
            column.append(_checked(value, name, i, answer))
        table.append(column)
    return torch.tensor(table, dtype=torch.float32).T.reshape(len(answers), len(rewards))
