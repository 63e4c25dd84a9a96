"""``minigpt serve``: an OpenAI-compatible HTTP API and a page, for one model, on this machine."""

from __future__ import annotations

import argparse
import sys

from minigpt.cli.options import add_settings, given_settings

HELP = "serve a model: an OpenAI-compatible API and a page to talk to it"
EXTRA = "minigpt serve needs FastAPI and uvicorn: pip install 'minigpt[serve]'"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    try:
        from minigpt.serving.server import ServeConfig
    except ModuleNotFoundError:
        p.description = f"{p.description} ({EXTRA})"
        return
    add_settings(p, ServeConfig(), flags)


def run(args: argparse.Namespace) -> int:
    try:
        from minigpt.serving.server import ServeConfig, load_engine, serve
    except ModuleNotFoundError as err:
        raise ValueError(f"{EXTRA} ({err.name} is missing)") from err

    settings = ServeConfig(**given_settings(args, ServeConfig))
    engine = load_engine(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"serving {engine.name} at http://{host}:{settings.port}/ (the page) and http://{host}:{settings.port}/v1 "
          "(the API); Ctrl-C stops", file=sys.stderr)
    serve(settings, engine)
    return 0
