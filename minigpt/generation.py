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
"""

from __future__ import annotations

from typing import Iterator

import torch

from minigpt.model import GPTModel


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
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
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
    (a sequence that is done keeps receiving ``eos_id`` while others finish).
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return
    if idx.shape[1] == 0:
        raise ValueError("idx is empty: give at least one prompt token")
    limit = model.cfg.context_length
    context_size = limit if context_size is None else context_size
    if not 1 <= context_size <= limit:
        raise ValueError(f"context_size must be in [1, {limit}] (the model's context_length), got {context_size}")

    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    try:
        model.reset_kv_cache()
        seq = idx
        # The first step always processes the (last context_size tokens of the) prompt.
        logits = model(seq[:, -context_size:], use_cache=use_cache)[:, -1]
        for step in range(max_new_tokens):
            next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_id = next_id.masked_fill(finished, eos_id)
                finished |= next_id == eos_id
            yield next_id
            if (eos_id is not None and bool(finished.all())) or step == max_new_tokens - 1:
                return
            seq = torch.cat([seq, next_id], dim=1)
            if use_cache and model.cache_pos < context_size:
                logits = model(next_id, use_cache=True)[:, -1]
            else:
                # No cache, or the window slid: recompute the whole window.
                model.reset_kv_cache()
                logits = model(seq[:, -context_size:], use_cache=use_cache)[:, -1]
    finally:
        model.reset_kv_cache()  # frees the cache memory
        model.train(was_training)


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
