"""Text in and out of generation: ids from text, text from ids, prompts cut to the context, and
streamed text that never splits a character.

A byte-level tokenizer may split one character over several tokens (an emoji is often two or
three), so streamed text goes through :class:`IncrementalDecoder`, which holds bytes back until
they form whole characters.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch

Ids = TypeVar("Ids", Sequence[int], torch.Tensor)


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """``str -> (1, tokens)`` long tensor; special tokens in the text (GPT-2's ``<|endoftext|>``,
    a chat template's ``<|im_start|>``) are read as such."""
    ids = tokenizer.encode(text, allowed_special="all")
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """``(1, tokens)`` or ``(tokens,)`` ids -> text."""
    return tokenizer.decode(token_ids.reshape(-1).tolist())


def truncate_prompt(ids: Ids, context_length: int) -> tuple[Ids, int]:
    """Keep the last ``context_length`` prompt ids: ``(ids, tokens dropped from the front)``.

    ``ids`` is a list of ids or a ``(batch, tokens)`` / ``(tokens,)`` tensor; the model
    only ever sees ``context_length`` positions, so the oldest tokens go.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be at least 1, got {context_length}")
    length = ids.shape[-1] if isinstance(ids, torch.Tensor) else len(ids)
    dropped = max(0, length - context_length)
    return (ids[..., dropped:] if isinstance(ids, torch.Tensor) else ids[dropped:]), dropped


class IncrementalDecoder:
    """Token ids in, one at a time; text out as soon as it is whole.

    ``add(ids)`` returns the text completed by these ids and holds back the bytes of a
    character that the next token finishes; ``flush()`` returns whatever is left. The
    pieces joined equal ``tokenizer.decode(all_ids)``, and no piece shows a character
    broken across tokens as U+FFFD. Works with any tokenizer that has ``decode_bytes``
    (tiktoken); for one with only ``decode`` it re-decodes the ids seen so far and holds
    back a trailing U+FFFD.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._bytes = hasattr(tokenizer, "decode_bytes")
        # Invalid bytes become U+FFFD, as in tokenizer.decode; an unfinished character waits.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._sent = 0  # characters of decode(self._ids) already returned (decode fallback)

    def add(self, ids: int | Iterable[int] | torch.Tensor) -> str:
        """Feed one id or several (a tensor is flattened); return the text now complete."""
        new = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids
        new = [new] if isinstance(new, int) else list(new)
        if self._bytes:
            return self._utf8.decode(self.tokenizer.decode_bytes(new))
        self._ids += new
        text = self.tokenizer.decode(self._ids)
        ready = len(text.rstrip("\ufffd"))  # a trailing U+FFFD may be half a character
        piece = text[self._sent:ready]
        self._sent = max(self._sent, ready)
        return piece

    def flush(self) -> str:
        """The held-back rest (a character still unfinished shows as U+FFFD); start afresh."""
        if self._bytes:
            rest = self._utf8.decode(b"", final=True)
        else:
            rest = self.tokenizer.decode(self._ids)[self._sent:]
        self._ids = []
        self._sent = 0
        self._utf8.reset()
        return rest
