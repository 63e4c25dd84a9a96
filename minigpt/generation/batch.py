"""Many prompts at once: prompts of different lengths in one batch, with left padding and an
attention mask, so each row continues exactly as its prompt alone would; and the log-probability
a model gives each of a sequence's tokens (scoring, not sampling).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm  # plain text: no widget library needed in notebooks

from minigpt.generation.generate import EosIds, eos_list, stream_generate
from minigpt.generation.sampling import check_sampling
from minigpt.generation.text import truncate_prompt
from minigpt.models.base import CausalLM, check_token_ids, evaluating

logger = logging.getLogger(__name__)

BATCH_SIZE = 32  # prompts per batch in generate_batch: a batch's KV cache grows with its size


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ``ids (batch, longest)`` and ``attention_mask (batch, longest)``.

    Left padding: every row ends at its last prompt token, so the next token of every row is
    read from the same (last) column; the mask holds 1 for real tokens and 0 for ``pad_id``.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one list of token ids")
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token per prompt")
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = r
        mask[i, longest - len(r):] = 1
    return ids, mask


def generate_batch(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: EosIds = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue prompts of different lengths, ``batch_size`` at a time (``None``: :data:`BATCH_SIZE`).

    Returns the new ids of each prompt, in the order given, cut after its first ``eos_id`` (an
    id or several; the end id is kept). Greedy rows equal :func:`generate` on each prompt alone. Prompts are
    grouped by length, so a batch carries little padding; each is first cut to its last
    ``context_length`` tokens, with the same warning as :func:`generate`.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    eos = eos_list(eos_id)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (or unset, for {BATCH_SIZE}), got {batch_size}")
    limit = model.cfg.context_length
    windows = []
    for i, prompt in enumerate(prompts):
        window, dropped = truncate_prompt(prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt), limit)
        if dropped:
            logger.warning("prompt %d has %d tokens, more than the context of %d: its first %d tokens are dropped",
                           i, len(prompt), limit, dropped)
        windows.append(window)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    size = batch_size or BATCH_SIZE
    answers: list[list[int]] = [[] for _ in windows]
    with tqdm(total=len(order), desc="generating", unit="prompt", disable=not progress) as bar:
        for first in range(0, len(order), size):
            chunk = order[first:first + size]
            sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos or None, generator=generator)
            new = _generate_padded(model, [windows[i] for i in chunk], max_new_tokens, use_cache, sampling)
            for i, row in zip(chunk, new, strict=True):
                answers[i] = row[:next((t + 1 for t, token in enumerate(row) if token in eos), len(row))]
            bar.update(len(chunk))
    return answers


def _generate_padded(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, use_cache: bool,
                     sampling: dict[str, Any]) -> list[list[int]]:
    """One batch of prompts that fit the context -> the new ids of each row."""
    ids, mask = pad_prompts(prompts, pad_id=(sampling["eos_id"] or [0])[0])
    # Prompts of one length need no mask: the plain causal path is the faster one.
    mask = None if all(len(p) == len(prompts[0]) for p in prompts) else mask.to(model.device)
    new = list(stream_generate(model, ids.to(model.device), max_new_tokens, use_cache=use_cache,
                               attention_mask=mask, **sampling))
    return torch.cat(new, dim=1).tolist() if new else [[] for _ in prompts]


@torch.no_grad()
def token_logprobs(
    model: CausalLM, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, return_greedy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(batch, tokens)`` ids -> ``(batch, tokens - 1)``: ``log P(ids[t] | ids[:t])`` for ``t >= 1``.

    The model reads ``ids[:, :-1]`` only, so ``context_length + 1`` ids fit. Entries whose
    token or whose preceding token is padding (``attention_mask`` 0) are 0, so sums run over
    real tokens only. ``return_greedy=True`` also returns ``(batch, tokens - 1)`` bools: the
    token is the model's arg-max there (what "the greedy continuation" checks).
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must have shape (batch, tokens) with at least 2 tokens, got {tuple(ids.shape)}")
    check_token_ids(ids, model.cfg.vocab_size)
    ids = ids.to(model.device)
    attention_mask = None if attention_mask is None else attention_mask.to(model.device)
    inputs = ids[:, :-1]
    targets = ids[:, 1:]
    mask = None if attention_mask is None else attention_mask[:, :-1]
    with evaluating(model):
        logits = model(inputs, attention_mask=mask).float()  # (batch, tokens - 1, vocab)
    scores = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)
    greedy = logits.argmax(dim=-1) == targets
    if attention_mask is not None:
        scored = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
        scores, greedy = scores.masked_fill(~scored, 0.0), greedy & scored
    return (scores, greedy) if return_greedy else scores
