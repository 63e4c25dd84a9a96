"""Generation events in OpenAI's response shapes, for whole answers and for streams.

The one idea: one choice is built token by token, the same way whether it is streamed or
not. :class:`CompletionChoice` and :class:`ChatChoice` take the engine's events; each
returns the stream chunk's choice for an event (``piece``) and, at the end, the whole
choice (``result``), so a streamed answer joined equals the answer sent at once.

Shapes (OpenAI's): a completion's ``logprobs`` is ``{tokens, token_logprobs,
top_logprobs: [{token: logprob}], text_offset}``, with ``None`` for the first prompt
token under ``echo``; a chat answer's is ``{content: [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from minigpt.serving.engine import Engine, Finished, TokenEvent


def envelope(kind: str, model: str, prefix: str) -> dict[str, Any]:
    """The fields every response and chunk starts with."""
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionChoice:
    """One choice of ``/v1/completions``; ``logprobs`` None leaves log-probabilities out."""

    def __init__(self, engine: Engine, index: int, logprobs: int | None) -> None:
        self.engine = engine
        self.index = index
        self.top = logprobs
        self.text = ""
        self.tokens = 0
        self.reason = None
        self.logprobs: dict[str, list] | None = (
            None if logprobs is None else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})

    def echo(self, ids: Sequence[int]) -> dict[str, Any]:
        """The prompt as the answer's beginning: its text and, with ``logprobs``, each prompt
        token's log-probability (``None`` for the first, which nothing precedes)."""
        start = len(self.text)
        self.text += self.engine.tokenizer.decode(list(ids))
        piece = self.logprobs and self._empty_logprobs()
        if piece is not None:
            chosen, alternatives = self.engine.prompt_logprobs(ids, self.top or 0)
            self._add_logprobs(piece, ids, [None, *chosen], [None, *alternatives], start)
        return self._chunk(self.text[start:], piece)

    def piece(self, event: TokenEvent | Finished) -> dict[str, Any]:
        """The stream chunk's choice for one event, also added to the whole choice."""
        self.text += event.text
        if isinstance(event, Finished):
            self.reason = event.reason
            return self._chunk(event.text, None)
        self.tokens += 1
        piece = self.logprobs and self._empty_logprobs()
        if piece is not None:
            start = len(self.text) - len(event.text)
            self._add_logprobs(piece, [event.token_id], [event.logprob], [event.top], start)
        return self._chunk(event.text, piece)

    def result(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "logprobs": self.logprobs, "finish_reason": self.reason}

    def _chunk(self, text: str, logprobs: dict | None) -> dict[str, Any]:
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.reason}

    @staticmethod
    def _empty_logprobs() -> dict[str, list]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add_logprobs(self, piece: dict[str, list], ids: Sequence[int], logprobs: Sequence[float | None],
                      tops: Sequence[list[tuple[int, float]] | None], offset: int) -> None:
        for token_id, logprob, top in zip(ids, logprobs, tops, strict=True):
            token = self.engine.token_text(token_id)
            alternatives = None if top is None else {}
            for i, lp in top or ():  # best first: of two tokens that read the same ("\ufffd"), the likelier stays
                alternatives.setdefault(self.engine.token_text(i), lp)
            for part in (piece, self.logprobs):
                part["tokens"].append(token)
                part["token_logprobs"].append(logprob)
                part["top_logprobs"].append(alternatives)
                part["text_offset"].append(offset)
            offset += len(token)


class ChatChoice:
    """One choice of ``/v1/chat/completions``; ``logprobs`` False leaves them out."""

    def __init__(self, engine: Engine, index: int, logprobs: bool) -> None:
        self.engine = engine
        self.index = index
        self.text = ""
        self.tokens = 0
        self.reason = None
        self.content: list[dict[str, Any]] | None = [] if logprobs else None

    def first(self) -> dict[str, Any]:
        """The stream's first chunk of this choice: the role, no text yet."""
        return {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def piece(self, event: TokenEvent | Finished) -> dict[str, Any]:
        self.text += event.text
        if isinstance(event, Finished):
            self.reason = event.reason
            delta = {"content": event.text} if event.text else {}
            return {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": self.reason}
        self.tokens += 1
        entry = None
        if self.content is not None:
            entry = {**self._token(event.token_id, event.logprob),
                     "top_logprobs": [self._token(i, lp) for i, lp in event.top]}
            self.content.append(entry)
        return {"index": self.index, "delta": {"content": event.text},
                "logprobs": None if entry is None else {"content": [entry]}, "finish_reason": None}

    def result(self) -> dict[str, Any]:
        return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                "logprobs": None if self.content is None else {"content": self.content},
                "finish_reason": self.reason}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.engine.token_text(token_id), "logprob": logprob,
                "bytes": self.engine.token_bytes(token_id)}
