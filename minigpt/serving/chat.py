"""A chat session: the conversation so far, kept within the model's context, and its commands.

The one idea: a model remembers nothing between answers; a chat "remembers" because the
whole conversation is the prompt each time (rendered in the engine's chat format). The
context is finite, so when the next prompt would not leave room for an answer, the
oldest exchanges are dropped, and the caller is told how many. Commands (``/reset``,
``/temperature 0.7``, ...) change the session instead of being sent. This module only
keeps state and produces text; the terminal loop lives in the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from minigpt.generation.sampling import check_sampling
from minigpt.serving.engine import Engine, Finished, Sampling, request_generator

HELP = """commands:
  /reset            forget the conversation
  /temperature X    0: always the likeliest token; higher: more varied
  /top_k N          sample among the N likeliest tokens (/top_k off: all)
  /top_p X          sample among the likeliest tokens reaching probability X (/top_p off: all)
  /max_tokens N     longest answer in tokens
  /help             this list
Ctrl-C stops an answer, Ctrl-D leaves."""
_EXAMPLES = {"temperature": "0.7", "top_k": "40", "top_p": "0.9", "max_tokens": "200"}


@dataclass
class ChatConfig:
    """How a chat session answers."""

    temperature: float = field(default=0.7, metadata={"help": "0: greedy; higher: more varied answers"})
    top_k: int | None = field(default=50, metadata={
        "help": "sample among the k likeliest tokens", "none": "no limit"})
    top_p: float | None = field(default=None, metadata={
        "help": "sample among the likeliest tokens that together reach this probability", "none": "no limit"})
    max_tokens: int = field(default=256, metadata={"help": "longest answer in tokens"})
    system: str | None = field(default=None, metadata={
        "help": "a system message that opens the conversation", "none": "none"})

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


class Answer:
    """One answer, streamed: iterate for the text pieces. Whatever was said (all of it,
    or the part before the caller stopped reading) joins the conversation when the
    iteration ends or is closed. ``dropped``: exchanges dropped to make room."""

    def __init__(self, session: ChatSession, ids: list[int], dropped: int) -> None:
        self.session = session
        self.ids = ids
        self.dropped = dropped
        self.text = ""
        self.finish_reason = "interrupted"

    def __iter__(self) -> Iterator[str]:
        s = self.session.settings
        room = self.session.engine.context_length - len(self.ids)
        sampling = Sampling(max_tokens=max(1, min(s.max_tokens, room)), temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, stop=self.session.engine.chat_format.stop)
        events = self.session.engine.generate(self.ids, sampling, self.session.generator)
        try:
            for event in events:
                self.text += event.text
                if isinstance(event, Finished):
                    self.finish_reason = event.reason
                if event.text:
                    yield event.text
        finally:
            events.close()
            self.session.messages.append({"role": "assistant", "content": self.text.strip()})


class ChatSession:
    """The conversation with ``engine``; ``messages`` are OpenAI-style ``{role, content}``."""

    def __init__(self, engine: Engine, settings: ChatConfig | None = None, seed: int | None = None) -> None:
        self.engine = engine
        self.settings = settings or ChatConfig()
        self.generator = request_generator(seed, engine.model.device)  # one stream of samples per session
        self.messages: list[dict[str, str]] = []

    def ask(self, text: str) -> Answer:
        """Add the user's message and start the answer (iterate it for the text). Oldest
        exchanges are dropped while the prompt leaves too little room for an answer (half the
        context, or ``max_tokens`` if less); a message that alone is too long is refused."""
        self.messages.append({"role": "user", "content": text})
        context = self.engine.context_length
        room = min(self.settings.max_tokens, context // 2)
        dropped = 0
        while True:
            ids = self.engine.encode_chat(self._with_system())
            if len(ids) + room <= context:
                return Answer(self, ids, dropped)
            if len(self.messages) == 1:
                self.messages.clear()
                raise ValueError(f"this message makes a prompt of {len(ids)} tokens; the model reads {context} "
                                 f"and needs room for an answer: write at most about {context - room} tokens")
            del self.messages[:2]  # the oldest exchange: a user message and its answer
            dropped += 1

    def command(self, line: str) -> str | None:
        """Carry out a ``/command``; return what to tell the user, or None if ``line`` is a
        message (not a command). A wrong value raises ``ValueError``, and changes nothing."""
        if not line.startswith("/"):
            return None
        name, _, value = line[1:].strip().partition(" ")
        value = value.strip()
        if name == "reset":
            self.messages.clear()
            return "conversation forgotten"
        if name == "help":
            return HELP
        if name in ("temperature", "top_k", "top_p", "max_tokens"):
            self.settings = dataclasses.replace(self.settings, **{name: self._number(name, value)})
            return f"{name} {getattr(self.settings, name)}"
        raise ValueError(f"unknown command /{name}; /help lists the commands")

    @staticmethod
    def _number(name: str, value: str) -> int | float | None:
        if value == "off" and name in ("top_k", "top_p"):
            return None
        whole = name in ("top_k", "max_tokens")
        try:
            return int(value) if whole else float(value)
        except ValueError:
            raise ValueError(f"/{name} needs {'a whole number' if whole else 'a number'}, "
                             f"such as /{name} {_EXAMPLES[name]}") from None

    def _with_system(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return system + self.messages
