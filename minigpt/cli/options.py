"""Shared by the command modules: options made from the jobs' settings dataclasses.

``add_settings`` turns each field of a settings dataclass into one ``--option`` whose help
and default are read from the field, so a default is written once, in the job. Errors the
jobs raise name their settings; ``in_user_words`` rewrites those names into the options
the user typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from minigpt.runtime.runtime import PRECISIONS, SEED_MAX, SEED_MIN, default_precision, select_device

TRAIN_HELP = {  # the training loop's settings (minigpt.training.config.TrainConfig), in the command line's words
    "max_steps": ("--steps", "optimizer steps"),
    "lr": ("--lr", "peak learning rate, reached after the warm-up"),
    "min_lr": ("--min-lr", "learning rate at the end of the cosine decay"),
    "warmup_steps": ("--warmup", "steps of linear warm-up"),
    "weight_decay": ("--weight-decay", "AdamW's pull of the weight matrices towards 0"),
    "betas": ("--betas", "AdamW's decay rates of the gradient's running mean and square"),
    "grad_clip": ("--grad-clip", "largest gradient norm (0: no clipping)"),
    "grad_accum": ("--grad-accum", "micro-batches per optimizer step"),
    "eval_every": ("--eval-every", "steps between evaluations, samples and checkpoints"),
    "eval_iter": ("--eval-iter", "batches of each split per evaluation"),
    "precision": ("--precision", "float32, or mixed precision: auto (bfloat16 where the hardware has it), "
                                 "bfloat16, float16 (CUDA)"),
    "compile": ("--compile", "torch.compile the model"),
    "gradient_checkpointing": ("--gradient-checkpointing", "recompute activations in backward: less memory"),
    "sample_prompt": ("--prompt", "prompt of the samples shown at each evaluation"),
    "sample_tokens": ("--sample-tokens", "tokens per sample"),
    "sample_temperature": ("--sample-temperature", "temperature of the samples (0: greedy)"),
    "sample_top_k": ("--sample-top-k", "the samples draw among this many likeliest tokens"),
    "sample_seed": ("--sample-seed", "seed of the samples (their own generator: training is unaffected)"),
}
TRAIN_NONE = {"grad_clip": "none: no clipping", "eval_iter": "none: all", "sample_top_k": "none: all",
              "sample_prompt": "the first words of the validation split"}  # what None means
PRECISION_DEFAULT = "float32 on CPU, auto on CUDA"
METAVARS = {int: "N", float: "X", str: "TEXT"}




def _option_type(hint: Any) -> tuple[Any, bool]:
    """``(base type, may be None)`` of a field's type hint: ``int | None`` -> ``(int, True)``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        base = [a for a in args if a is not type(None)]
        return (base[0] if len(base) == 1 else str), len(base) < len(args)
    return hint, False


def _parse(kind: Callable[[str], Any], optional: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if optional and text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def _seed(text: str) -> int:
    """A seed torch.manual_seed accepts (out of range, it would fail deep inside the job)."""
    value = int(text) if re.fullmatch(r"\s*[-+]?\d+\s*", text) else None
    if value is None or not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be a whole number from -2**63 to 2**64 - 1, got {text!r}")
    return value


def add_settings(parser: argparse.ArgumentParser | Any, defaults: Any, flags: dict[str, str],
                  helps: dict[str, tuple[str, str]] | None = None, skip: Sequence[str] = ()) -> None:
    """One ``--option`` per field of the dataclass instance ``defaults``, with its help and
    "(default: X)" read from there. Left out, an option is absent from the parsed namespace
    (``argparse.SUPPRESS``), so the settings keep their own value; ``flags`` collects
    ``{field: --option}`` for messages."""
    hints = typing.get_type_hints(type(defaults))
    named = {f.name: (helps or {}).get(f.name, ("--" + f.name.replace("_", "-"), f.metadata.get("help", "")))
             for f in dataclasses.fields(defaults)}
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if f.name in skip or dataclasses.is_dataclass(value):
            continue
        flag = named[f.name][0]
        text = in_user_words(named[f.name][1], {k: v[0] for k, v in named.items()})
        kind, optional = _option_type(hints[f.name])
        shown = _shown(f, value)
        if optional and value is not None and f.name in TRAIN_NONE:
            shown = f"{shown}; {TRAIN_NONE[f.name]}"
        options: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                   "help": f"{text} (default: {shown})".replace("%", "%%")}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            items = typing.get_args(kind)
            options.update(nargs="+" if Ellipsis in items else len(items), type=items[0],
                           metavar=METAVARS.get(items[0]))
        elif kind in (int, float, str):
            options.update(type=_parse(_seed if f.name.endswith("seed") else kind, optional), metavar=METAVARS[kind])
        else:
            continue  # not a command-line value
        if "choices" in f.metadata or f.name == "precision":
            options.update(choices=f.metadata.get("choices") or PRECISIONS, metavar=None)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            options.update(required=True, help=text.replace("%", "%%"))
        parser.add_argument(flag, **options)
        flags[f.name] = flag


def _shown(f: dataclasses.Field, value: Any) -> str:
    """How ``--help`` shows a default: None by its meaning, tuples as lists, booleans as on/off."""
    if f.name == "precision":
        return PRECISION_DEFAULT
    if value is None:
        return f.metadata.get("none") or TRAIN_NONE.get(f.name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def given_settings(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The settings given on the command line: ``{field: value}``."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def fill_default_precision(given: dict[str, Any], device: str | None) -> None:
    """No --precision: float32 on a CPU (bit for bit the same on every CPU), auto on CUDA."""
    if "precision" not in given:
        given["precision"] = default_precision(select_device(device))


def in_user_words(message: str, flags: dict[str, str]) -> str:
    """A job's message with the names of its settings replaced by their options:
    ``TrainConfig.max_steps must be ...`` -> ``--steps must be ...``."""
    message = re.sub(r"\b[A-Z]\w*Config\.(\w+)", r"\1", message)
    names = sorted((name for name in flags if "_" in name or name in ("lr", "beta")), key=len, reverse=True)
    if not names:
        return message
    return re.sub(r"(?<![\w-])(" + "|".join(names) + r")\b", lambda m: flags[m.group(1)], message)


class Stopped(Exception):
    """A run stopped by a signal after saving its checkpoint: exit with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code


def interruptible(job: Callable[[], Any], resume_command: str) -> Any:
    from minigpt.training.loop import TrainingInterrupted

    try:
        return job()
    except TrainingInterrupted as stop:
        print(f"stopped after step {stop.step}; the checkpoint is saved in {stop.run_dir}. "
              f"Continue with: {resume_command}", file=sys.stderr)
        raise Stopped(stop.exit_code) from None
