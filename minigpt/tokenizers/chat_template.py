"""Chat templates: turning a list of messages into the one text a chat model was trained on.

The one idea: a chat model reads a conversation as plain text with markers around each turn
(``<|im_start|>user ... <|im_end|>`` for ChatML models such as Qwen and SmolLM2,
``<|start_header_id|>user<|end_header_id|> ... <|eot_id|>`` for Llama 3). Each model ships
its format as a Jinja template in ``tokenizer_config.json`` (or ``chat_template.jinja``);
``render_chat`` runs it exactly as ``transformers``' ``apply_chat_template(tokenize=False)``
does: in Jinja's sandbox (templates come from the internet), with ``trim_blocks`` and
``lstrip_blocks``, and the helpers templates expect (``raise_exception``, ``strftime_now``,
a ``tojson`` that keeps non-ASCII text as it is).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from minigpt.tokenizers.tokenizer_json import TOKENIZER_CONFIG_FILE

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Names a message's reasoning goes by; templates (Qwen3's) read the first, gpt-oss's "thinking"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str) -> None:
    """Lets a template refuse a conversation it cannot format (roles out of order, ...)."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which a prompt must not contain
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """Today's date (Llama 3 templates print it in the system turn)."""
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text; rendering keeps it as it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

    def _keep(self, caller: Any) -> str:
        return caller()


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, where ``*`` and ``**`` may not build a value too large to write: one
    such operation runs in C, where no time limit can stop it (``"x" * 10**10``)."""

    intercepted_binops = frozenset({"*", "**"})
    LARGEST = 2**24  # characters or list items of a product; bits of a power

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
            too_large = len(left) * right > self.LARGEST
        else:
            too_large = operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                left.bit_length() * right > self.LARGEST
        if too_large:
            raise SecurityError(f"the chat template computes a value too large to write ({operator})")
        return super().call_binop(context, operator, left, right)


class RenderBudgetExceeded(jinja2.exceptions.TemplateError):
    """A render that ran longer, or wrote more, than it was allowed."""


def _render_within(template: jinja2.Template, variables: dict[str, Any], time_limit: float | None,
                   max_chars: int | None) -> str:
    """``template.render(**variables)``, stopped once it runs ``time_limit`` seconds or writes
    ``max_chars`` characters. Rendering runs the template's compiled Python code (its
    frames are named ``<template>``); a trace function called at each of its lines checks
    the clock, so a loop of loops stops too, and raising there ends the render."""
    deadline = time.monotonic() + (time_limit if time_limit is not None else float("inf"))

    def each_line(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise RenderBudgetExceeded(f"the chat template ran longer than {time_limit:g} s")
        return each_line

    def each_call(frame: Any, event: str, arg: Any) -> Any:
        return each_line if frame.f_code.co_filename == "<template>" else None

    before = sys.gettrace()
    sys.settrace(each_call if time_limit is not None else before)
    try:
        written = 0
        chunks = []
        for chunk in template.generate(**variables):
            written += len(chunk)
            if max_chars is not None and written > max_chars:
                raise RenderBudgetExceeded(f"the chat template wrote more than {max_chars:,} characters")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        sys.settrace(before)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    environment = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def _plain_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A copy without the fields that are None, and with its reasoning under every name templates use."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat(
    template: str, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
    time_limit: float | None = None, max_chars: int | None = None, **extra: Any
) -> str:
    """The text of ``messages`` (dicts with ``role`` and ``content``) in the model's chat format.

    ``add_generation_prompt`` ends the text with the header of an assistant turn, so that the
    model's continuation is its answer. ``extra`` reaches the template as variables: the
    special tokens it prints (``bos_token``, ``eos_token``: pass
    ``**tokenizer.special_token_names``), ``tools``, ``date_string``, ``enable_thinking``...
    A template that refuses the conversation raises ``jinja2.TemplateError`` with its reason;
    one that runs longer than ``time_limit`` seconds or writes more than ``max_chars``
    characters, :class:`RenderBudgetExceeded` (a ``TemplateError``).
    """
    variables = {"tools": None, "documents": None} | extra
    messages = [_plain_message(message) for message in messages]
    if not messages:
        raise ValueError("there are no messages to format: give at least one")
    variables |= {"messages": messages, "add_generation_prompt": add_generation_prompt}
    return _render_within(_compile(template), variables, time_limit, max_chars)


def load_chat_template(directory: str | os.PathLike, name: str = "default") -> str | None:
    """The chat template of a model directory, or None when it has none.

    ``chat_template.jinja`` comes first, as in ``transformers``; then ``tokenizer_config.json``'s
    ``chat_template``, which is either one template or a list of named ones (``name`` picks one).
    """
    directory = Path(directory)
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config_file = directory / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry["name"]: entry["template"] for entry in template}
        if name not in named:
            raise ValueError(f"{config_file} has no chat template named {name!r}; it has {sorted(named)}")
        return named[name]
    return template
