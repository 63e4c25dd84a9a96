"""Text generation: turn next-token logits into a continuation, one token at a time.

Each step looks at the logits of the last position only and picks a token:
greedy (``temperature=0``) takes the arg-max; sampling divides the logits by the
temperature (below 1 sharpens, above 1 flattens the distribution), optionally
keeps only the ``top_k`` best or the smallest set whose probability reaches
``top_p``, and draws from the softmax.

With ``use_cache=True`` the model keeps every block's keys and values, so each
step feeds one token instead of the whole sequence. Once the sequence is longer
than the context, GPT-2's absolute position embeddings shift for every token in
the window, so cached keys go stale: from then on each step recomputes the last
``context_size`` tokens, which gives exactly the tokens of the no-cache path.

A byte-level tokenizer may split one character over several tokens (an emoji is
often two or three), so streamed text goes through :class:`IncrementalDecoder`,
which holds bytes back until they form whole characters.
"""

from __future__ import annotations

import codecs
import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from minigpt.model import GPTModel, evaluating

logger = logging.getLogger(__name__)

Ids = TypeVar("Ids", Sequence[int], torch.Tensor)


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """``str -> (1, tokens)`` long tensor; ``<|endoftext|>`` is allowed as a special token."""
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """``(1, tokens)`` or ``(tokens,)`` ids -> text."""
    return tokenizer.decode(token_ids.reshape(-1).tolist())


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(batch, vocab_size)`` logits of the last position -> ``(batch, 1)`` next ids."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)

    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best
        # token always survives.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def check_sampling(
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the first sampling option that is out of range.

    Written once, used by :func:`sample_next_token` and :func:`stream_generate`, and by
    the command line before it spends time loading a model.
    """
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be 0 (greedy decoding) or more, got {temperature}")
    if top_k is not None and not (isinstance(top_k, numbers.Integral) and top_k >= 1):
        raise ValueError(f"top_k must be a whole number of at least 1 (or unset, for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be more than 0 and at most 1 (1 keeps every token), got {top_p}")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")


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
        self._ids, self._sent = [], 0
        self._utf8.reset()
        return rest


@torch.no_grad()
def stream_generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each new ``(batch, 1)`` token as soon as it is chosen.

    Stops after ``max_new_tokens`` or once every sequence has produced ``eos_id``
    (a sequence that is done keeps receiving ``eos_id`` while others finish). A prompt
    longer than ``context_size`` is read from its last ``context_size`` tokens, with a
    logged warning saying how many were dropped.
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if max_new_tokens == 0:
        return
    if idx.shape[1] == 0:
        raise ValueError("idx is empty: give at least one prompt token")
    limit = model.cfg.context_length
    context_size = limit if context_size is None else context_size
    if not 1 <= context_size <= limit:
        raise ValueError(f"context_size must be in [1, {limit}] (the model's context_length), got {context_size}")
    window, dropped = truncate_prompt(idx, context_size)
    if dropped:
        logger.warning("the prompt has %d tokens, more than the context of %d: its first %d tokens are dropped",
                       idx.shape[1], context_size, dropped)

    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    with evaluating(model):
        try:
            model.reset_kv_cache()
            seq = window  # the sequence seen so far; only its last context_size tokens matter
            logits = model(seq, use_cache=use_cache)[:, -1]
            for step in range(max_new_tokens):
                next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished, eos_id)
                    finished |= next_id == eos_id
                yield next_id
                if (eos_id is not None and bool(finished.all())) or step == max_new_tokens - 1:
                    return
                seq = torch.cat([seq, next_id], dim=1)[:, -context_size:]
                if use_cache and model.cache_pos < context_size:
                    logits = model(next_id, use_cache=True)[:, -1]
                else:
                    # No cache, or the window slid: recompute the whole window.
                    model.reset_kv_cache()
                    logits = model(seq, use_cache=use_cache)[:, -1]
        finally:
            model.reset_kv_cache()  # frees the cache memory


def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(batch, tokens)`` prompt ids -> ``(batch, tokens + new)`` ids with the continuation.

    Greedy when ``temperature`` is 0; see :func:`sample_next_token` for the sampling
    options and :func:`stream_generate` for the token-by-token version.
    """
    new = list(stream_generate(model, idx, max_new_tokens, context_size, temperature,
                               top_k, top_p, eos_id, use_cache, generator))
    return torch.cat([idx, *new], dim=1)
