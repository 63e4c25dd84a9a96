"""The perplexity of one long text, longer than the model's context (the held-out check of
"did fine-tuning make it forget?").

The one idea: slide windows of ``context_length`` tokens over the text every ``stride`` tokens and
score only each window's *new* tokens, those no earlier window scored: every token counts once,
with as much left context as a window allows. ``stride == context_length`` scores each window
afresh (fast, less context); a smaller stride gives each token more context (the reference
recipe of ``transformers``' perplexity guide).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from minigpt.generation.batch import token_logprobs
from minigpt.models.base import evaluating
from minigpt.training.losses import perplexity


@dataclass
class PerplexityResult:
    """The mean loss over ``tokens`` predictions (every token of the text but the first,
    and with ``stride == context_length`` but the first of each window), scored in
    ``windows`` windows of at most ``context_length`` tokens moved by ``stride``."""

    loss: float
    perplexity: float
    tokens: int
    windows: int
    context_length: int
    stride: int


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, new)`` for each window ``ids[begin:end]``: windows start every ``stride``
    tokens, and only the ``new`` tokens at each window's end, those no earlier window
    scored, count. The last window ends at the text's end."""
    windows = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        windows.append((begin, end, end - previous_end))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def _batches(windows: Sequence[tuple[int, int, int]], batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows of one length, at most ``batch_size`` at a time (only the last
    window of a text may be shorter, so this costs at most one extra batch)."""
    batch: list[tuple[int, int, int]] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window[1] - window[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


@torch.no_grad()
def sliding_window_perplexity(model: nn.Module, ids: Sequence[int] | torch.Tensor, context_length: int | None = None,
                              stride: int | None = None, batch_size: int = 4,
                              progress: bool = False) -> PerplexityResult:
    """The perplexity of the token ids ``ids`` (``(tokens,)``), a text of any length.

    The method ``transformers`` documents: windows of ``context_length`` tokens (default:
    the model's) start every ``stride`` tokens (default: half the context); each window
    scores only its tokens that no earlier window scored, so every token but the first is
    predicted exactly once, with ``context_length - stride`` tokens of left context at
    least (``stride = 1``: the most context, one window per token; ``stride =
    context_length``: separate windows, faster and more pessimistic, whose first tokens
    go unscored, as nothing in their window precedes them). Windows are run
    ``batch_size`` at a time, in eval mode.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = context_length or model.cfg.context_length
    stride = stride or max(1, n // 2)
    if not 2 <= n <= model.cfg.context_length:
        raise ValueError(f"context_length must be in [2, {model.cfg.context_length}] (the model's), got {n}")
    if not 1 <= stride <= n:
        raise ValueError(f"stride must be in [1, {n}] (the context length), else tokens between windows go unscored; "
                         f"got {stride}")
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): perplexity needs two at least")
    # A one-token window (a text of k * stride + 1 tokens) has nothing to predict its token
    # with: it scores nothing, as in transformers' recipe, so it is not run at all.
    windows = [w for w in sliding_windows(len(ids), n, stride) if w[1] - w[0] >= 2]
    total = 0.0
    count = 0
    with evaluating(model):
        for batch in tqdm(list(_batches(windows, batch_size)), desc="perplexity", disable=not progress):
            x = torch.stack([ids[begin:end] for begin, end, _ in batch]).to(model.device)  # (batch, tokens)
            nll = -token_logprobs(model, x)  # (batch, tokens - 1): the surprise of tokens 1..
            for row, (begin, end, new) in zip(nll, batch, strict=True):
                scored = min(new, end - begin - 1)  # a text's first token has nothing to predict it
                total += row[-scored:].sum().item()
                count += scored
    loss = total / count
    return PerplexityResult(loss, perplexity(loss), count, len(windows), n, stride)
