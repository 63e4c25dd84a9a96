"""``minigpt chat``: talk to a model in the terminal, the answer printed as it is written."""

from __future__ import annotations

import argparse

from minigpt.cli.options import add_settings, given_settings

HELP = "chat with a model in the terminal"
# The settings of `minigpt serve` that choose the model; the rest is about HTTP.
MODEL_FIELDS = ("model", "preset", "adapter", "quantize", "chat_format", "device", "seed")


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.serving.chat import ChatConfig  # the terminal chat needs none of the serve extra
    from minigpt.serving.settings import ServeConfig

    add_settings(p, ServeConfig(), flags, skip=[name for name in vars(ServeConfig()) if name not in MODEL_FIELDS])
    add_settings(p, ChatConfig(), flags)


def run(args: argparse.Namespace) -> int:
    from minigpt.serving.chat import ChatConfig, ChatSession
    from minigpt.serving.settings import ServeConfig, load_engine

    model = {k: v for k, v in given_settings(args, ServeConfig).items() if k in MODEL_FIELDS}
    chat = ChatConfig(**given_settings(args, ChatConfig))
    engine = load_engine(ServeConfig(**model))
    session = ChatSession(engine, chat, seed=model.get("seed"))
    print(f"chatting with {engine.name} ({engine.chat_format.name} format); /help lists the commands, "
          "Ctrl-C stops an answer, Ctrl-D leaves")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not the end
            print()
            continue
        if line:
            _turn(session, line)


def _turn(session, line: str) -> None:
    """One line: a command's reply, or the model's answer streamed."""
    try:
        reply = session.command(line)
        answer = session.ask(line) if reply is None else None
    except ValueError as err:
        print(f"error: {err}")
        return
    if answer is None:
        print(reply)
        return
    if answer.dropped:
        print(f"(the {answer.dropped} oldest exchange{'s' if answer.dropped > 1 else ''} left the conversation "
              "to make room in the model's context)")
    pieces = iter(answer)
    print("model> ", end="", flush=True)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        pieces.close()  # the partial answer stays in the conversation
        print(" [stopped]")
        return
    print()
