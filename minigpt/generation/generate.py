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

Sampling is :mod:`minigpt.generation.sampling`; text in and out, :mod:`minigpt.generation.text`;
many prompts at once, :mod:`minigpt.generation.batch`.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import torch

from minigpt.generation.sampling import check_sampling, sample_next_token
from minigpt.generation.text import truncate_prompt
from minigpt.models.base import CausalLM, check_token_ids, evaluating

logger = logging.getLogger(__name__)

Ids = TypeVar("Ids", Sequence[int], torch.Tensor)
EosIds = int | Iterable[int] | None  # one end id, or several (a Llama-3 config lists three)


@dataclass
class Step:
    """One generated token per row, with what the model thought of it.

    ``ids`` ``(batch, 1)``: the chosen tokens. ``logprobs`` ``(batch,)``: their log-probability
    under the model's own distribution (softmax of the raw logits, temperature 1, whatever the
    sampling settings). ``top_ids`` / ``top_logprobs`` ``(batch, k)``: the ``k`` most likely
    tokens and their log-probabilities, best first (``k = 0``: empty). The log-probabilities are
    computed when first read: plain generation, which reads only ``ids``, skips a softmax over
    the vocabulary at every token.
    """

    ids: torch.Tensor
    logits: torch.Tensor  # (batch, vocab) raw logits of the step
    top_k: int = 0

    @cached_property
    def _logp(self) -> torch.Tensor:
        return torch.log_softmax(self.logits.float(), dim=-1)  # (batch, vocab)

    @cached_property
    def _top(self) -> Any:
        return self._logp.topk(self.top_k, dim=-1)

    @property
    def logprobs(self) -> torch.Tensor:
        return self._logp.gather(-1, self.ids).squeeze(-1)

    @property
    def top_ids(self) -> torch.Tensor:
        return self._top.indices

    @property
    def top_logprobs(self) -> torch.Tensor:
        return self._top.values


def _checked_context(model: Any, idx: torch.Tensor, attention_mask: torch.Tensor | None,
                     context_size: int | None) -> int:
    """Validate the prompt once, where it enters (not at every token); return the window size."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        raise ValueError(f"idx must be a tensor of shape (batch, tokens), got {tuple(getattr(idx, 'shape', ()))}")
    if idx.shape[1] == 0:
        raise ValueError("idx is empty: give at least one prompt token")
    if attention_mask is not None and attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask must have the shape of idx {tuple(idx.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must mark padding on the left: the last token of every row must be "
                         "real (1); pad_prompts pads that way")
    check_token_ids(idx, model.cfg.vocab_size)
    limit = model.cfg.context_length
    context_size = limit if context_size is None else context_size
    if not 1 <= context_size <= limit:
        raise ValueError(f"context_size must be in [1, {limit}] (the model's context_length), got {context_size}")
    return context_size


def eos_list(eos_id: EosIds) -> list[int]:
    """``eos_id`` as a list of ids (empty for ``None``); the first one fills finished rows."""
    ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, numbers.Integral) else [int(i) for i in eos_id]
    if eos_id is not None and not ids:
        raise ValueError("eos_id is an empty collection: give an id, several ids, or None")
    return ids


@torch.no_grad()
def stream_steps(
    model: CausalLM, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, eos_id: EosIds = None,
    use_cache: bool = True, generator: torch.Generator | None = None, *,
    top_logprobs: int = 0, attention_mask: torch.Tensor | None = None,
) -> Iterator[Step]:
    """Yield a :class:`Step` per new token: the ``(batch, 1)`` ids and their log-probabilities.

    ``attention_mask`` ``(batch, tokens)`` marks left padding (see :func:`pad_prompts`): each
    row then continues exactly as its prompt alone would. Stops after ``max_new_tokens`` or
    once every row has produced ``eos_id`` (an id or several: any of them ends a row, which then
    keeps receiving the first one). A
    prompt longer than ``context_size`` is read from its last ``context_size`` tokens, with a
    logged warning; past the context every step recomputes the window, as the no-cache path.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if max_new_tokens == 0:
        return
    context_size = _checked_context(model, idx, attention_mask, context_size)
    if not 0 <= top_logprobs <= model.cfg.vocab_size:
        raise ValueError(f"top_logprobs must be in [0, {model.cfg.vocab_size}], got {top_logprobs}")
    seq, dropped = truncate_prompt(idx, context_size)  # the window: only the last context_size ids matter
    mask = None if attention_mask is None else attention_mask[:, dropped:].to(idx.device)
    if dropped:
        logger.warning("the prompt has %d tokens, more than the context of %d: its first %d tokens are dropped",
                       idx.shape[1], context_size, dropped)

    eos = eos_list(eos_id)
    stops = torch.tensor(eos, dtype=torch.long, device=idx.device)  # any of them ends a row
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    with evaluating(model):
        try:
            model.reset_kv_cache()
            logits = model(seq, use_cache=use_cache, attention_mask=mask, logits_to_keep=1)[:, -1]
            for step in range(max_new_tokens):
                next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
                if eos:
                    next_id = next_id.masked_fill(finished, eos[0])
                    finished |= torch.isin(next_id, stops)
                yield Step(next_id, logits, top_logprobs)
                if (eos and bool(finished.all())) or step == max_new_tokens - 1:
                    return
                seq = torch.cat([seq, next_id], dim=1)[:, -context_size:]
                if mask is not None:  # the new tokens are real
                    mask = torch.cat([mask, torch.ones_like(next_id, dtype=mask.dtype)], dim=1)[:, -context_size:]
                if use_cache and model.cache_pos < context_size:
                    logits = model(next_id, use_cache=True, attention_mask=mask, logits_to_keep=1)[:, -1]
                else:
                    # No cache, or the window slid: recompute the whole window.
                    model.reset_kv_cache()
                    logits = model(seq, use_cache=use_cache, attention_mask=mask, logits_to_keep=1)[:, -1]
        finally:
            model.reset_kv_cache()  # frees the cache memory


def stream_generate(
    model: CausalLM, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, eos_id: EosIds = None,
    use_cache: bool = True, generator: torch.Generator | None = None, *, attention_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each new ``(batch, 1)`` token as soon as it is chosen: the ids of :func:`stream_steps`."""
    for step in stream_steps(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id,
                             use_cache, generator, attention_mask=attention_mask):
        yield step.ids


def generate(
    model: CausalLM, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, eos_id: EosIds = None,
    use_cache: bool = True, generator: torch.Generator | None = None, *, attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(batch, tokens)`` prompt ids -> ``(batch, tokens + new)`` ids with the continuation.

    Greedy when ``temperature`` is 0; see :func:`sample_next_token` for the sampling
    options and :func:`stream_steps` for padding and the token-by-token version.
    """
    new = list(stream_generate(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id,
                               use_cache, generator, attention_mask=attention_mask))
    return torch.cat([idx, *new], dim=1)


