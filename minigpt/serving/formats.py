"""Chat formats: how a list of chat messages becomes the one text a model continues.

The one idea: a chat model is still a text continuer; what makes it answer is that the
conversation is written the way its training examples were. Three formats:

- ``alpaca``: the instruction format of :mod:`minigpt.instruction`, which instruction-tuned
  runs (``minigpt finetune instruct`` and ``dpo``) were trained on; each earlier turn is
  one finished example (prompt, response, ``<|endoftext|>``), the last one ends at the
  response header;
- ``plain``: a ``User:`` / ``Assistant:`` transcript, for a base model;
- ``template``: the model's own Jinja chat template (the Llama family ships one in its
  ``tokenizer_config.json``), rendered by :func:`minigpt.chat_template.render_chat`.

:func:`chat_format_of` reads which one a model directory states.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jinja2

from minigpt.checkpoint import SETTINGS_FILE
from minigpt.instruction import RESPONSE_HEADER, format_input
from minigpt.jobs.dpo import DPOConfig
from minigpt.jobs.instruct import InstructConfig
from minigpt.tokenizer import ENDOFTEXT

FORMATS = ("alpaca", "plain", "template")

Messages = Sequence[dict[str, str]]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]


class ChatFormat(Protocol):
    """Renders messages into the prompt; ``stop`` ends an answer that starts the next turn."""

    name: str
    stop: tuple[str, ...]

    def render(self, messages: Messages) -> str: ...


def _system(messages: Messages) -> str:
    return "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))


def _turns(messages: Messages) -> list[dict[str, str]]:
    return [m for m in messages if m["role"] in ("user", "assistant")]


@dataclass(frozen=True)
class AlpacaFormat:
    """The instruction format, one example per exchange; a system message goes first."""

    name: str = "alpaca"
    stop: tuple[str, ...] = ("### Instruction:",)

    def render(self, messages: Messages) -> str:
        parts, system = [], _system(messages)
        if system:
            parts.append(system + "\n\n")
        for m in _turns(messages):
            if m["role"] == "user":
                parts.append(format_input({"instruction": m["content"]}) + RESPONSE_HEADER)
            else:
                parts.append(m["content"] + ENDOFTEXT)
        return "".join(parts)


@dataclass(frozen=True)
class PlainFormat:
    """``User: ...`` / ``Assistant: ...`` lines, ending with ``Assistant:`` for the answer."""

    name: str = "plain"
    stop: tuple[str, ...] = ("\nUser:",)

    def render(self, messages: Messages) -> str:
        system = _system(messages)
        lines = [system] if system else []
        lines += [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in _turns(messages)]
        return "\n".join(lines + ["Assistant:"])


@dataclass(frozen=True)
class TemplateFormat:
    """A model's own Jinja template; ``render_chat(template, messages)`` renders it."""

    template: str
    render_chat: Callable[..., str]
    special_tokens: dict[str, str] = field(default_factory=dict)
    name: str = "template"
    stop: tuple[str, ...] = ()

    time_limit: float = 1.0  # seconds a render may take (a template's loops can run for hours)
    max_chars: int = 16 * 2**20  # characters a render may write

    def render(self, messages: Messages) -> str:
        """The rendered prompt; a template that refuses the messages (its ``raise_exception``,
        a syntax error, the sandbox) or runs over its budget is a ``ValueError`` with its reason."""
        try:
            return self.render_chat(self.template, list(messages), add_generation_prompt=True,
                                    time_limit=self.time_limit, max_chars=self.max_chars, **self.special_tokens)
        except jinja2.TemplateError as err:
            raise ValueError(err.message or type(err).__name__) from err


# A private-use character around a message's index stands in for its content (see content_spans)
_STAND_IN = re.compile("\ue000(\\d+)\ue001")


def content_spans(chat_format: ChatFormat, messages: Messages) -> tuple[str, list[tuple[int, int]] | None]:
    """The rendered prompt and the ``(start, end)`` of each piece of it that is message content.

    The one idea: render twice, once with each content replaced by a stand-in, and walk
    both texts together; the markup between stand-ins is the format's own, what replaces
    a stand-in is the user's (as written, or trimmed by the template). Only the format's
    markup may then be read as special tokens. None for the spans when the template does
    more to a content than trim it (the walk then fails).
    """
    text = chat_format.render(messages)
    marked = chat_format.render([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)])
    parts = _STAND_IN.split(marked)  # [markup, index, markup, index, ..., markup]
    spans, position = [], 0
    for k, part in enumerate(parts):
        if k % 2 == 0:
            if not text.startswith(part, position):
                return text, None
            position += len(part)
            continue
        after, content = parts[k + 1], messages[int(part)]["content"]
        fits = [c for c in (content, content.strip()) if text.startswith(c, position)
                and text.startswith(after, position + len(c))]
        if not fits:
            return text, None
        spans.append((position, position + len(fits[0])))
        position += len(fits[0])
    return text, spans if position == len(text) else None


def chat_format_of(directory: str | Path | None) -> str:
    """The format a model directory states: ``chat_format`` in its ``settings.json``, or
    ``"alpaca"`` for the output of ``minigpt finetune instruct`` or ``dpo`` (their
    ``settings.json``), else ``"plain"``."""
    settings = Path(directory) / SETTINGS_FILE if directory else None
    if settings is None or not settings.is_file():
        return "plain"
    try:
        values = json.loads(settings.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return "plain"
    stated = values.get("chat_format")
    if stated in FORMATS:
        return stated
    # Instruction and preference tuning both train on prompts in the instruction format;
    # their settings.json holds every field of their settings.
    tuned = any(set(values) >= {f.name for f in dataclasses.fields(job)} for job in (InstructConfig, DPOConfig))
    return "alpaca" if tuned else "plain"
