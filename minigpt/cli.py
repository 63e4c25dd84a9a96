"""The ``minigpt`` command line: one sub-command per job.

Argparse only. A sub-command's options are the fields of its job's settings (a dataclass
in :mod:`minigpt.jobs`), whose defaults and help are written there and shown by
``--help``; each command parses, calls the job, and prints what it returns. The jobs
report through :mod:`logging`, which is shown here on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minigpt.files import ChecksumError
from minigpt.runtime import PRECISIONS, default_precision, select_device

COMMANDS = {  # name -> one-line help; each has _add_<name> (its options) and _cmd_<name> (its run)
    "info": "list the model presets with parameter counts and memory",
    "generate": "continue a prompt",
    "download": "download OpenAI's GPT-2 weights, verified by SHA-256",
    "pretrain": "pretrain a fresh model on a corpus (default: a tiny model on Tiny Shakespeare, ~3 minutes)",
    "eval": "loss and perplexity of a model on a corpus's validation split",
    "finetune": "fine-tune a GPT to classify texts, to follow instructions, or to prefer the answers people do",
}
TRAIN_HELP = {  # the training loop's settings (minigpt.training.TrainConfig), in the command line's words
    "max_steps": ("--steps", "optimizer steps"),
    "lr": ("--lr", "peak learning rate, reached after the warm-up"),
    "min_lr": ("--min-lr", "learning rate at the end of the cosine decay"),
    "warmup_steps": ("--warmup", "steps of linear warm-up"),
    "weight_decay": ("--weight-decay", "AdamW's pull of the weight matrices towards 0"),
    "betas": ("--betas", "AdamW's decay rates of the gradient's running mean and square"),
    "grad_clip": ("--grad-clip", "largest gradient norm"),
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


# ------------------------------------------------------- options from the settings dataclasses


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


def _add_settings(parser: argparse.ArgumentParser | Any, defaults: Any, flags: dict[str, str],
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
        flag, text = named[f.name][0], _in_user_words(named[f.name][1], {k: v[0] for k, v in named.items()})
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
            options.update(type=_parse(kind, optional), metavar=METAVARS[kind])
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


def _given(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The settings given on the command line: ``{field: value}``."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _default_precision(given: dict[str, Any], device: str | None) -> None:
    """No --precision: float32 on a CPU (bit for bit the same on every CPU), auto on CUDA."""
    if "precision" not in given:
        given["precision"] = default_precision(select_device(device))


def _in_user_words(message: str, flags: dict[str, str]) -> str:
    """A job's message with the names of its settings replaced by their options:
    ``TrainConfig.max_steps must be ...`` -> ``--steps must be ...``."""
    message = re.sub(r"\b[A-Z]\w*Config\.(\w+)", r"\1", message)
    names = sorted((name for name in flags if "_" in name or name in ("lr", "beta")), key=len, reverse=True)
    if not names:
        return message
    return re.sub(r"(?<![\w-])(" + "|".join(names) + r")\b", lambda m: flags[m.group(1)], message)


class _Stopped(Exception):
    """A run stopped by a signal after saving its checkpoint: exit with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code


def _interruptible(job: Callable[[], Any], resume_command: str) -> Any:
    from minigpt.training import TrainingInterrupted

    try:
        return job()
    except TrainingInterrupted as stop:
        print(f"stopped after step {stop.step}; the checkpoint is saved in {stop.run_dir}. "
              f"Continue with: {resume_command}", file=sys.stderr)
        raise _Stopped(stop.exit_code) from None


# ------------------------------------------------------------------------ the commands


def _add_info(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """No options."""


def _cmd_info(args: argparse.Namespace) -> int:
    from minigpt.jobs.info import preset_sizes

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'emb_dim':>7} {'context':>7} "
          f"{'params':>15} {'tied head':>15} {'float32':>10} {'bfloat16':>10}")
    for p in preset_sizes():
        n, cfg = p.parameters, p.cfg
        print(f"{p.name:<12} {cfg.n_layers:>6} {cfg.n_heads:>5} {cfg.emb_dim:>7} {cfg.context_length:>7} "
              f"{n:>15,} {p.tied_parameters:>15,} {n * 4 / 2**30:>8.2f}GB {n * 2 / 2**30:>8.2f}GB")
    print("'params' is the preset as configured; 'tied head' shares the output head with the "
          "token embedding, as OpenAI's GPT-2 checkpoints do.")
    return 0


def _add_generate(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.jobs.generate import GenerateConfig

    source = p.add_mutually_exclusive_group()
    _add_settings(source, GenerateConfig(), flags, skip=[f.name for f in dataclasses.fields(GenerateConfig)
                                                          if f.name not in ("model", "checkpoint", "preset")])
    _add_settings(p, GenerateConfig(), flags, skip=("model", "checkpoint", "preset"))


def _cmd_generate(args: argparse.Namespace) -> int:
    from minigpt.jobs.generate import GenerateConfig, generate_text

    generation = generate_text(GenerateConfig(**_given(args, GenerateConfig)))
    print(generation.prompt, end="", flush=True)
    for piece in generation.pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def _add_download(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.hub import GPT2_REPOS, default_weights_dir

    p.add_argument("name", choices=list(GPT2_REPOS))
    p.add_argument("--weights-dir", help=f"where to keep them (default: {default_weights_dir()})")


def _cmd_download(args: argparse.Namespace) -> int:
    from minigpt.hub import download_gpt2

    print(f"{args.name} is in {download_gpt2(args.name, args.weights_dir)}")
    return 0


def _add_pretrain(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.jobs.pretrain import PretrainConfig

    p.description = ("Pretrain a fresh model into runs/<name>/: checkpoint, loss.png, lr.png, samples.txt. "
                     "With --resume, options left out keep the run's own settings. Under 'torchrun "
                     "--nproc_per_node=N -m minigpt pretrain' each process trains on its share of every batch.")
    defaults = PretrainConfig()
    _add_settings(p.add_argument_group("data and model"), defaults, flags)
    _add_settings(p.add_argument_group("training loop"), defaults.train, flags, TRAIN_HELP)
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default="runs", help="parent of the run directory (default: %(default)s)")
    run.add_argument("--name", help="run directory name (default: <corpus>-<preset>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its settings")
    run.add_argument("--overwrite", action="store_true", help="start afresh in an existing run directory")
    run.add_argument("--device", help="cpu, cuda, mps (default: the best available)")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from minigpt.jobs.pretrain import PretrainConfig, new_run_dir, pretrain
    from minigpt.training import TrainConfig

    given = _given(args, PretrainConfig, TrainConfig)
    if args.resume:
        run_dir = Path(args.resume)
        settings = PretrainConfig.load(run_dir).replace(**given)
    else:
        _default_precision(given, args.device)
        settings = PretrainConfig().replace(**given)
        run_dir = new_run_dir(settings, args.out_dir, args.name, args.overwrite)
    device = f" --device {args.device}" if args.device else ""
    result = _interruptible(lambda: pretrain(settings, run_dir, resume=bool(args.resume), device=args.device),
                            f"minigpt pretrain --resume {run_dir}{device}")
    if int(os.environ.get("RANK", "0")) == 0:
        h = result.history
        print(f"done in {result.seconds:.0f} s: {h.steps[-1]:,} steps, {h.tokens_seen[-1]:,} tokens seen")
        for i, when in ((0, "first"), (-1, "last")):
            print(f"{when} sample (step {h.steps[i]}, word pairs found in the corpus: {result.pair_shares[i]:.0%}): "
                  f"{h.samples[i]}".replace("\n", " "))
        print(f"validation loss {result.val_loss:.4f} over the whole validation split ({result.val_windows:,} "
              f"windows, {result.val_tokens:,} tokens), perplexity {result.val_perplexity:,.1f}")
        print(f"run directory: {run_dir}  (try: minigpt generate --checkpoint {run_dir})")
    return 0


def _add_eval(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.jobs.evaluate import EvalConfig

    _add_settings(p, EvalConfig(checkpoint=""), flags)


def _cmd_eval(args: argparse.Namespace) -> int:
    from minigpt.jobs.evaluate import EvalConfig, evaluate

    r = evaluate(EvalConfig(**_given(args, EvalConfig)))
    scope = "whole split" if r.whole_split else f"an estimate over its first {r.windows:,} windows"
    print(f"{r.corpus} ({r.part}, {scope}: {r.windows:,} windows of {r.context_length} tokens): "
          f"loss {r.loss:.4f}, perplexity {r.perplexity:,.2f}")
    return 0


FINETUNE = {  # task -> (its settings class and job function in minigpt.jobs.<task>, one-line help)
    "classify": ("ClassifyConfig", "finetune_classifier", "train a text classifier (book ch. 6), e.g. a spam filter"),
    "instruct": ("InstructConfig", "finetune_instructions",
                 "instruction fine-tuning (book ch. 7) with answers and their scores"),
    "dpo": ("DPOConfig", "finetune_dpo", "preference tuning with DPO: an instruction-tuned model learns which of "
                                         "two answers people prefer"),
}


def _finetune_job(task: str) -> tuple[type, Callable[..., dict[str, Any]]]:
    module = importlib.import_module(f"minigpt.jobs.{task}")
    return getattr(module, FINETUNE[task][0]), getattr(module, FINETUNE[task][1])


def _add_finetune(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    tasks = p.add_subparsers(dest="task", required=True)
    for name, (_, _, help) in FINETUNE.items():
        task = tasks.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        _add_settings(task, _finetune_job(name)[0](), flags)
        task.add_argument("--resume", metavar="OUTPUT", help="continue the interrupted run in OUTPUT")


def _cmd_finetune(args: argparse.Namespace) -> int:
    cls, job = _finetune_job(args.task)
    given = _given(args, cls)
    if args.resume:  # options given replace the run's own settings
        settings = dataclasses.replace(cls.load(args.resume), **{**given, "output": args.resume})
    else:
        _default_precision(given, given.get("device"))
        settings = cls(**given)
    if args.task == "instruct" and not (settings.judge_model or settings.judge_url):
        print("no judge given (--judge-model or --judge-url): reporting the test loss and perplexity only")
    m = _interruptible(lambda: job(settings, resume=bool(args.resume)),
                       f"minigpt finetune {args.task} --resume {settings.output}")
    if args.task == "classify":
        before, after = m["accuracy_before"], m["accuracy"]
        print(f"accuracy: train {after['train']:.1%}, validation {after['val']:.1%}, test {after['test']:.1%} "
              f"(test before fine-tuning: {before['test']:.1%})")
        saved = "the classifier, loss.png, accuracy.png"
    elif args.task == "instruct":
        print(f"test loss {m['test_loss']:.3f}, perplexity {m['test_perplexity']:,.1f}")
        if m["judge_score"] is not None:
            print(f"judge score {m['judge_score']:.1f} / 100 over {m['judged']} of {m['responses']} responses")
        saved = "the model, loss.png, responses.json"
    else:
        before, val, test = m["val_before"], m["val"], m["test"]
        print(f"validation: reward accuracy {before['rewards/accuracies']:.1%} -> {val['rewards/accuracies']:.1%}, "
              f"reward margin {before['rewards/margins']:.3f} -> {val['rewards/margins']:.3f}; test: reward accuracy "
              f"{test['rewards/accuracies']:.1%}, reward margin {test['rewards/margins']:.3f}")
        saved = f"the model{', its adapter' if settings.lora_rank else ''}, loss.png, preference.png, ab_samples.json"
    print(f"saved {saved} and metrics.json in {settings.output}")
    return 0


# ------------------------------------------------------------------------------ main


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that sub-command gets its options (so that
    ``minigpt generate`` does not import the training code to list pretraining's)."""
    parser = argparse.ArgumentParser(prog="minigpt", description="minigpt: a GPT-2 from scratch, one command per job.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        flags: dict[str, str] = {}
        if command in (None, name):
            globals()[f"_add_{name}"](p, flags)
        p.set_defaults(func=globals()[f"_cmd_{name}"], flags=flags)
    return parser


class _LogHandler(logging.Handler):
    """The jobs' log lines on stderr, written past a progress bar without breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            prefix = "warning: " if record.levelno >= logging.WARNING else ""
            tqdm.write(prefix + self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never end the run
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Show the log lines of minigpt's modules (once, however often it is called)."""
    logger = logging.getLogger("minigpt")
    logger.setLevel(level)
    if not any(isinstance(handler, _LogHandler) for handler in logger.handlers):
        logger.addHandler(_LogHandler())


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    configure_logging()
    try:
        return args.func(args)
    except _Stopped as stop:
        return stop.code
    except BrokenPipeError:  # the reader of the output went away (`minigpt info | head`)
        sys.stdout = open(os.devnull, "w")  # nothing more may reach the closed pipe
        return 141
    except KeyboardInterrupt:
        print(f"minigpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ConnectionError, KeyError, ChecksumError) as err:
        # Bad input is the user's to fix: show the message, not a traceback.
        print(f"minigpt {args.command}: error: {_in_user_words(str(err), args.flags)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
