"""Choosing the next token from the logits of the last position.

Greedy (``temperature=0``) takes the arg-max; sampling divides the logits by the temperature
(below 1 sharpens, above 1 flattens the distribution), optionally keeps only the ``top_k`` best
or the smallest set whose probability reaches ``top_p``, and draws from the softmax.
"""

from __future__ import annotations

import numbers

import torch


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(batch, vocab_size)`` logits of the last position -> ``(batch, 1)`` next ids."""
    check_sampling(temperature, top_k, top_p)
    # A temperature this close to 0 is greedy: below float32's smallest normal number,
    # dividing by it would overflow the logits to inf (and softmax would give NaN).
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1, keepdim=True)

    # Subtracting the best logit first changes no probability, and keeps the division by a
    # tiny temperature finite: the best token gets 0, the others at worst -inf.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best
        # token always survives.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[:, 0] = False  # even when top_p rounds to 0 in float32 (1e-50 does)
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
