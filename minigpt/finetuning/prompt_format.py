"""Prompt formats: how an instruction, or a whole conversation, becomes the one text a model reads.

The one idea: a chat model is still a text continuer; what makes it answer is that the request
is written the way its training examples were. One format serves instruction tuning, DPO,
``compare``, ``chat`` and the server, so a model is always prompted as it was trained:

- ``alpaca``: the book's instruction template (chapter 7) — an introduction, ``### Instruction:``,
  an optional ``### Input:``, then ``### Response:``; the answer ends with ``<|endoftext|>``;
- ``chat``: the model's own Jinja chat template (the Llama family ships one), which writes its own
  turn markers and end-of-turn;
- ``plain``: a ``User:`` / ``Assistant:`` transcript, for a base model that was never tuned.

Each has ``prompt(entry)`` / ``answer(entry)`` for a training entry ``{instruction, input,
output}`` and ``render(messages)`` for a conversation ``[{"role", "content"}, ...]``; ``stop``
ends an answer that starts writing the next turn. A run records its format by name
(``prompt_format`` in its ``settings.json``): :func:`recorded_format` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import jinja2

from minigpt.data.windows import tokenize
from minigpt.tokenizers.chat_template import load_chat_template, render_chat
from minigpt.tokenizers.gpt2 import ENDOFTEXT
from minigpt.training.checkpoint import SETTINGS_FILE

PROMPT_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
# Opens every training answer, so the model learns to write it after a prompt;
# extract_response strips it from generated text.
RESPONSE_HEADER = "\n\n### Response:\n"
PROMPT_FORMATS: tuple[str, ...] = ("alpaca", "chat", "plain")

# An entry: {"instruction": str, "input": str (may be empty or absent), "output": str}.
Entry = dict[str, str]
# A conversation: [{"role": "system" | "user" | "assistant", "content": str}, ...].
Messages = Sequence[Mapping[str, str]]


class PromptFormat(Protocol):
    """What every format offers (see the module docstring)."""

    name: str
    header: str  # written between prompt and answer (the model learns to write it)
    end_of_text: bool  # whether training texts get the tokenizer's end-of-text appended
    stop: tuple[str, ...]

    def prompt(self, entry: Entry) -> str: ...

    def answer(self, entry: Entry, response: str | None = None) -> str: ...

    def render(self, messages: Messages) -> str: ...

    def encode(self, text: str, tokenizer: Any) -> list[int]: ...


def format_input(entry: Entry) -> str:
    """The Alpaca prompt: the introduction, the instruction and, when not empty, the input."""
    # The exact characters matter: the model was tuned on this text, and a changed space changes tokens.
    text = f"{PROMPT_INTRO}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_response(entry: Entry) -> str:
    """What follows the Alpaca prompt in a training text: the response header and the output."""
    return f"{RESPONSE_HEADER}{entry['output']}"


def extract_response(continuation: str, header: str = RESPONSE_HEADER) -> str:
    """The answer in what a model wrote after the prompt, without the response header."""
    # The model writes the header first (it opened every training answer): strip it.
    return continuation.strip().removeprefix(header.strip()).strip()


def user_message(entry: Entry) -> dict[str, str]:
    """An entry as the user's turn of a conversation: the instruction, a blank line, the input."""
    # Instruction, a blank line, input: the chat version of Alpaca's two sections.
    content = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
    return {"role": "user", "content": content}


def _system(messages: Messages) -> str:
    # Several system (or "developer") messages are joined into one system prompt.
    return "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))


def _turns(messages: Messages) -> list[Mapping[str, str]]:
    return [m for m in messages if m["role"] in ("user", "assistant")]


@dataclass(frozen=True)
class AlpacaFormat:
    """The book's format. In a conversation each earlier exchange is one finished example
    (prompt, response, ``<|endoftext|>``) and the last ends at the response header; a system
    message goes first. Only ``<|endoftext|>`` is read as a special token."""

    name: ClassVar[str] = "alpaca"
    header: ClassVar[str] = RESPONSE_HEADER
    end_of_text: ClassVar[bool] = True
    stop: ClassVar[tuple[str, ...]] = ("### Instruction:",)

    def prompt(self, entry: Entry) -> str:
        return format_input(entry)

    def answer(self, entry: Entry, response: str | None = None) -> str:
        """The header and ``response`` (default: the entry's ``output``)."""
        return format_response(entry if response is None else {**entry, "output": response})

    def render(self, messages: Messages) -> str:
        system = _system(messages)
        parts = [system + "\n\n"] if system else []
        for m in _turns(messages):
            if m["role"] == "user":
                # Every user turn becomes a whole Alpaca prompt, as each training example was one.
                parts.append(format_input({"instruction": m["content"]}) + RESPONSE_HEADER)
            else:
                parts.append(m["content"] + ENDOFTEXT)  # a finished exchange, as in training
        return "".join(parts)

    def encode(self, text: str, tokenizer: Any = None) -> list[int]:
        return tokenize(text, tokenizer)


@dataclass(frozen=True)
class ChatTemplateFormat:
    """A chat model's own format, rendered with its Jinja ``template`` (``special_tokens``: the
    tokenizer's ``special_token_names``, which templates print). The prompt is the user turn and
    the assistant turn's opening (``add_generation_prompt``); the answer is the rest of the whole
    conversation, ending with the template's end-of-turn: nothing is appended."""

    template: str
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    time_limit: float = 1.0  # seconds a render may take (a template's loops can run for hours)
    max_chars: int = 16 * 2**20  # characters a render may write
    name: ClassVar[str] = "chat"
    header: ClassVar[str] = ""
    end_of_text: ClassVar[bool] = False
    stop: ClassVar[tuple[str, ...]] = ()  # the template's end-of-turn token stops generation

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, tokenizer: Any) -> ChatTemplateFormat:
        """The chat template of a model directory, with ``tokenizer``'s special tokens."""
        template = load_chat_template(directory)
        return prompt_format("chat", template, getattr(tokenizer, "special_token_names", {}), source=str(directory))

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        """The rendered text; a template that refuses the messages (its ``raise_exception``, a
        syntax error, the sandbox) or runs over its budget is a ``ValueError`` with its reason."""
        try:
            return render_chat(self.template, [dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               time_limit=self.time_limit, max_chars=self.max_chars, **self.special_tokens)
        except jinja2.TemplateError as err:
            # One error type for every caller, whatever went wrong inside the template.
            raise ValueError(err.message or type(err).__name__) from err

    def prompt(self, entry: Entry) -> str:
        return self._render([user_message(entry)], add_generation_prompt=True)

    def answer(self, entry: Entry, response: str | None = None) -> str:
        """The whole conversation rendered, without its first part, :meth:`prompt`."""
        reply = {"role": "assistant", "content": entry["output"] if response is None else response}
        # The answer is the whole conversation minus its prompt, so it carries exactly the markers the
        # template writes around an assistant turn (and its end-of-turn).
        whole = self._render([user_message(entry), reply], add_generation_prompt=False)
        prompt = self.prompt(entry)
        # Some templates render a turn differently once a reply follows it; the prompt is then no
        # prefix of the conversation, and cutting it off would give a wrong answer text.
        if not whole.startswith(prompt):
            raise ValueError("this chat template does not write a conversation as its prompt (add_generation_prompt) "
                             f"followed by the answer: the prompt {prompt!r} does not begin {whole!r}; "
                             "use the Alpaca format, or a template whose turns follow one another")
        return whole[len(prompt):]

    def render(self, messages: Messages) -> str:
        return self._render(messages, add_generation_prompt=True)

    def encode(self, text: str, tokenizer: Any) -> list[int]:
        if tokenizer is None:
            raise ValueError("a chat template's texts need the model's own tokenizer: load_hf_tokenizer(directory)")
        # Without allowed_special a tiktoken-style encoder would refuse (or split) the template's markers.
        return tokenizer.encode(text, allowed_special="all")  # the template writes its special tokens on purpose


@dataclass(frozen=True)
class PlainFormat:
    """``User: ...`` / ``Assistant: ...`` lines ending with ``Assistant:``, for an untuned model."""

    name: ClassVar[str] = "plain"
    header: ClassVar[str] = ""
    end_of_text: ClassVar[bool] = True
    stop: ClassVar[tuple[str, ...]] = ("\nUser:",)

    def prompt(self, entry: Entry) -> str:
        return self.render([user_message(entry)])

    def answer(self, entry: Entry, response: str | None = None) -> str:
        # The prompt ends with "Assistant:", so the answer starts with the space a transcript has there.
        return " " + (entry["output"] if response is None else response)

    def render(self, messages: Messages) -> str:
        system = _system(messages)
        lines = [system] if system else []
        # Roles other than user and assistant went into the system line above.
        lines += [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in _turns(messages)]
        return "\n".join(lines + ["Assistant:"])

    def encode(self, text: str, tokenizer: Any = None) -> list[int]:
        return tokenize(text, tokenizer)


ALPACA = AlpacaFormat()
PLAIN = PlainFormat()


def prompt_format(name: str, template: str | None = None, special_tokens: Mapping[str, str] | None = None,
                  source: str = "the model") -> PromptFormat:
    """The format called ``name`` (:data:`PROMPT_FORMATS`); ``chat`` needs the model's ``template``."""
    if name == "alpaca":
        return ALPACA
    if name == "plain":
        return PLAIN
    # chat needs the model's own template; the other two formats are fixed texts.
    if name == "chat":
        if template is None:
            raise ValueError(f"{source} has no chat template (tokenizer_config.json's chat_template or "
                             "chat_template.jinja): use the alpaca or plain prompt format for this model")
        return ChatTemplateFormat(template, dict(special_tokens or {}))
    raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {name!r}")


def recorded_format(run_dir: str | os.PathLike) -> str | None:
    """The prompt format a run directory records (``prompt_format`` in its ``settings.json``), or None."""
    settings = Path(run_dir) / SETTINGS_FILE
    if not settings.is_file():
        return None
    try:
        # A damaged settings.json (or one that is not an object) means no record, not an error.
        name = json.loads(settings.read_text(encoding="utf-8")).get("prompt_format")
    except (json.JSONDecodeError, AttributeError):
        return None
    # An unknown name (a newer minigpt's format) reads as no record, not as an error.
    return name if name in PROMPT_FORMATS else None
