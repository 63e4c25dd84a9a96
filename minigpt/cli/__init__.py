"""The ``minigpt`` command line: one sub-command per job, one module per sub-command.

Argparse only. A sub-command's options are the fields of its job's settings (a dataclass
in :mod:`minigpt.jobs`), whose defaults and help are written there and shown by
``--help`` (see :mod:`minigpt.cli.options`); each command module (``minigpt.cli.<name>``)
has ``HELP``, ``add(parser, flags)`` and ``run(args) -> exit code``: it parses, calls the
job, and prints what it returns. The jobs report through :mod:`logging`, which is shown
here on stderr.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from minigpt.cli.options import Stopped, in_user_words
from minigpt.io.files import ChecksumError

# The sub-commands in the order --help lists them; each is the module minigpt.cli.<name>
# (importing one is cheap: it imports its job only when the command runs).
COMMANDS = ("info", "generate", "chat", "download", "pretrain", "eval", "compare", "finetune", "score", "serve")


def _command(name: str) -> ModuleType:
    return importlib.import_module(f"minigpt.cli.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that sub-command gets its options (so that
    ``minigpt generate`` does not import the training code to list pretraining's)."""
    parser = argparse.ArgumentParser(prog="minigpt", description="minigpt: a GPT from scratch, one command per job.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = _command(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP[0].upper() + module.HELP[1:] + ".")
        flags: dict[str, str] = {}
        if command in (None, name):
            module.add(p, flags)
        p.set_defaults(func=module.run, flags=flags, parser=p)  # a nested parser (finetune's tasks) sets its own
    return parser


def unrecognized(extras: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """The error for arguments ``parser`` does not know, with the closest option of that
    sub-command for each mistyped one: ``--temprature`` -> ``--temperature``."""
    options = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for extra in extras:
        close = difflib.get_close_matches(extra.split("=")[0], options, n=1) if extra.startswith("--") else []
        if close:
            hints.append(f"did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(extras)}" + (f" ({' '.join(hints)})" if hints else "")


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
    args, extras = build_parser(command if command in COMMANDS else None).parse_known_args(argv)
    if extras:  # shown with the sub-command's usage, not the top level's
        args.parser.error(unrecognized(extras, args.parser))
    configure_logging()
    try:
        return args.func(args)
    except Stopped as stop:
        return stop.code
    except BrokenPipeError:  # the reader of the output went away (`minigpt info | head`)
        sys.stdout = open(os.devnull, "w")  # nothing more may reach the closed pipe
        return 141
    except KeyboardInterrupt:
        print(f"minigpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, KeyError, ChecksumError,
            ImportError) as err:
        # Bad input (or a missing optional extra) is the user's to fix: show the message, not a traceback.
        print(f"minigpt {args.command}: error: {in_user_words(str(err), args.flags)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
