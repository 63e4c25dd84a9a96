"""``minigpt serve``: an OpenAI-compatible HTTP API and a page, for one model, on this machine."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from minigpt.cli.options import add_settings, given_settings

HELP = "serve a model: an OpenAI-compatible API and a page to talk to it"
EXTRA = "needs FastAPI and uvicorn: pip install 'minigpt[serve]'"


def missing_extra() -> list[str]:
    """The packages of the serve extra that are not installed."""
    return [name for name in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(name) is None]


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.serving.settings import ServeConfig  # the settings need none of the serve extra

    if missing_extra():
        p.description = f"{p.description} It {EXTRA}."
    add_settings(p, ServeConfig(), flags)


def run(args: argparse.Namespace) -> int:
    from minigpt.serving.server import bind, serve
    from minigpt.serving.settings import ServeConfig, load_engine

    if missing_extra():
        raise ValueError(f"minigpt serve {EXTRA} ({', '.join(missing_extra())} missing)")
    settings = ServeConfig(**given_settings(args, ServeConfig))
    engine = load_engine(settings)
    sock = bind(settings)  # a busy port fails before "serving at" is said
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"serving {engine.name} at http://{host}:{settings.port}/ (the page) and http://{host}:{settings.port}/v1 "
          "(the API); Ctrl-C stops", file=sys.stderr)
    serve(settings, engine, sock)
    return 0
