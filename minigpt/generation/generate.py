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

Prompts of different lengths go in one batch with left padding and an attention mask
(:func:`pad_prompts`): each row's positions count its real tokens only and no token
attends padding, so every row continues exactly as its prompt alone would.

A byte-level tokenizer may split one character over several tokens (an emoji is
often two or three), so streamed text goes through :class:`IncrementalDecoder`,
which holds bytes back until they form whole characters.
"""

from __future__ import annotations

import codecs
import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm import tqdm  # plain text: no widget library needed in notebooks

from minigpt.models.base import CausalLM, check_token_ids, evaluating

logger = logging.getLogger(__name__)

Ids = TypeVar("Ids", Sequence[int], torch.Tensor)
EosIds = int | Iterable[int] | None  # one end id, or several (a Llama-3 config lists three)
BATCH_SIZE = 32  # prompts per batch in generate_batch: a batch's KV cache grows with its size


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """``str -> (1, tokens)`` long tensor; special tokens in the text (GPT-2's ``<|endoftext|>``,
    a chat template's ``<|im_start|>``) are read as such."""
    ids = tokenizer.encode(text, allowed_special="all")
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


@dataclass
class Step:
    """One generated token per row, with what the model thought of it.

    ``ids`` ``(batch, 1)``: the chosen tokens. ``logprobs`` ``(batch,)``: their log-probability
    under the model's own distribution (softmax of the raw logits, temperature 1, whatever the
    sampling settings). ``top_ids`` / ``top_logprobs`` ``(batch, k)``: the ``k`` most likely
    tokens and their log-probabilities, best first (``k = 0``: empty).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


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


def _eos_list(eos_id: EosIds) -> list[int]:
    """``eos_id`` as a list of ids (empty for ``None``); the first one fills finished rows."""
    ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, numbers.Integral) else [int(i) for i in eos_id]
    if eos_id is not None and not ids:
        raise ValueError("eos_id is an empty collection: give an id, several ids, or None")
    return ids


def _step(logits: torch.Tensor, next_id: torch.Tensor, top_logprobs: int) -> Step:
    """``(batch, vocab)`` raw logits and the chosen ``(batch, 1)`` ids -> a :class:`Step`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(top_logprobs, dim=-1)
    return Step(next_id, logp.gather(-1, next_id).squeeze(-1), top.indices, top.values)


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

    eos = _eos_list(eos_id)
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
                yield _step(logits, next_id, top_logprobs)
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
    eos = _eos_list(eos_id)
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
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = None if attention_mask is None else attention_mask[:, :-1]
    with evaluating(model):
        logits = model(inputs, attention_mask=mask).float()  # (batch, tokens - 1, vocab)
    scores = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)
    greedy = logits.argmax(dim=-1) == targets
    if attention_mask is not None:
        scored = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
        scores, greedy = scores.masked_fill(~scored, 0.0), greedy & scored
    return (scores, greedy) if return_greedy else scores
