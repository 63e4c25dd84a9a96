"""Chat formats: how a list of chat messages becomes the one text a model continues.

The one idea: a chat model is still a text continuer; what makes it answer is that the
conversation is written the way its training examples were. Three formats:

- ``alpaca``: the instruction format of :mod:`minigpt.finetuning.instruction`, which instruction-tuned
  runs (``minigpt finetune instruct`` and ``dpo``) were trained on; each earlier turn is
  one finished example (prompt, response, ``<|endoftext|>``), the last one ends at the
  response header;
- ``plain``: a ``User:`` / ``Assistant:`` transcript, for a base model;
- ``template``: the model's own Jinja chat template (the Llama family ships one in its
  ``tokenizer_config.json``), rendered by :func:`minigpt.tokenizers.chat_template.render_chat`.

:func:`chat_format_of` reads which one a model directory states.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from minigpt.finetuning.instruction import RESPONSE_HEADER, format_input
from minigpt.jobs.dpo import DPOConfig
from minigpt.jobs.instruct import InstructConfig
from minigpt.tokenizers.gpt2 import ENDOFTEXT
from minigpt.training.checkpoint import SETTINGS_FILE

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

    def render(self, messages: Messages) -> str:
        return self.render_chat(self.template, list(messages), add_generation_prompt=True, **self.special_tokens)


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
