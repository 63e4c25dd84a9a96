"""Rollouts: a batch of prompts answered by the model being trained, ready to be scored.

The one idea: reinforcement learning on a language model alternates two phases. First the
policy *acts*: it samples an answer to each prompt (a rollout). Then each answer is scored
and the policy is nudged towards the better ones. Both phases need the same thing of an
answer, the log-probability the model gave each of its tokens::

    logp[t] = log pi(ids[t + 1] | ids[: t + 1])      for every answer token ids[t + 1]

:func:`sample_rollouts` runs the first phase on the ragged-batch generation of
:mod:`minigpt.generation` (left-padded prompts, KV cache) and lays the result out as one
padded tensor::

    [pad pad P P P P | A A A <eot> pad]      prompt left-padded to the longest prompt,
    [  P P P P P P P | A A A A A A  A ]      answer right-padded to the longest answer

so every answer starts at the same column and ``logp[:, P - 1:]`` covers the answers.
:func:`answer_logprobs` gives the per-token log-probabilities (with gradients), the one
implementation that PPO, GRPO and DPO's summed log-probabilities all use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.generation.batch import generate_batch
from minigpt.generation.generate import EosIds, eos_list
from minigpt.generation.sampling import check_sampling
from minigpt.models.decoder import Decoder


@dataclass
class RolloutSettings:
    """How answers are sampled. ``temperature`` 1 samples from the model's own distribution,
    the one whose log-probabilities :func:`answer_logprobs` returns (PPO's ratio assumes that)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: EosIds = None        # end-of-text id(s); an answer stops there (None: never)
    batch_size: int | None = None  # prompts generated at once (None: generation's default)
    pad_id: int = 0              # fills the padded places; never read (the masks exclude it)

    def __post_init__(self) -> None:
        # Other settings (temperature != 1, top_k, top_p) sample from another distribution than the one
        # answer_logprobs scores: allowed, but the rollout is then slightly off-policy.
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 to sample an answer, got {self.max_new_tokens}")


@dataclass
class Rollout:
    """A batch of ``b`` prompts with their sampled answers, padded to ``T = P + A`` columns.

    ``ids`` ``(b, T)``: prompt ids left-padded to ``P`` columns, then answer ids right-padded
    to ``A`` columns. ``attention_mask`` ``(b, T)``: 1 on real tokens. ``answer_mask``
    ``(b, T)``: 1 on answer tokens only (the end-of-text included). ``prompt_lengths`` ``(b,)``:
    real prompt tokens. ``ended`` ``(b,)`` bool: the answer stopped at an end-of-text id
    (False: it ran out of ``max_new_tokens``). ``prompt_width``: ``P``, the column where every
    answer starts.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    ended: torch.Tensor
    prompt_width: int

    @property
    def last_index(self) -> torch.Tensor:
        """``(b,)``: the column of each row's last real token (its answer's last token), where a
        reward model reads its score."""
        # The largest column index where attention_mask is set: the answers are right-padded, so it is
        # the answer's last token (or the prompt's last, for an empty answer).
        columns = torch.arange(self.ids.shape[1], device=self.ids.device)
        return (self.attention_mask.bool() * columns).amax(dim=1)

    def answers(self) -> list[list[int]]:
        """Each row's answer ids, padding removed."""
        # answer_mask selects the answer's tokens, its end-of-text included.
        return [row[mask.bool()].tolist() for row, mask in zip(self.ids, self.answer_mask, strict=True)]

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(self.ids.to(device), self.attention_mask.to(device), self.answer_mask.to(device),
                       self.prompt_lengths.to(device), self.ended.to(device), self.prompt_width)


def check_prompt_lengths(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, context_length: int) -> None:
    """Raise ``ValueError`` naming the first prompt that leaves no room for its answer: a
    rollout is scored in one forward pass, so prompt and answer must fit the context together."""
    if len(prompt_ids) == 0:
        raise ValueError("no prompts given: pass at least one list of token ids")
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token per prompt")
        # Generation alone could slide its window, but scoring needs prompt and answer in one context.
        if len(prompt) + max_new_tokens > context_length:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it needs "
                             f"{len(prompt) + max_new_tokens} positions but the model's context is {context_length}: "
                             "shorten the prompt (or leave it out) or lower max_new_tokens")


@torch.no_grad()
def sample_rollouts(model: nn.Module, prompt_ids: Sequence[Sequence[int]], settings: RolloutSettings) -> Rollout:
    """Sample one answer per prompt with :func:`minigpt.generation.batch.generate_batch` (batched,
    KV-cached, sampled from the global random generator) and pad them into a :class:`Rollout`.

    A prompt that does not fit the context with ``max_new_tokens`` answer tokens raises
    ``ValueError`` naming it (see :func:`check_prompt_lengths`). For ``G`` answers per prompt
    (GRPO), repeat each prompt ``G`` times.
    """
    # Plain ints: prompts may come as tensors or numpy arrays.
    prompts = [list(map(int, p)) for p in prompt_ids]
    check_prompt_lengths(prompts, settings.max_new_tokens, model.cfg.context_length)
    # Batched, KV-cached generation: generate_batch groups prompts by length and left-pads each
    # batch, so every row's next token is read at the same (last) column.
    answers = generate_batch(model, prompts, settings.max_new_tokens, temperature=settings.temperature,
                             top_k=settings.top_k, top_p=settings.top_p, eos_id=settings.eos_id,
                             batch_size=settings.batch_size)
    eos = set(eos_list(settings.eos_id))
    # P and A: at least one answer column, so the layout holds even if every answer is empty.
    width = max(len(p) for p in prompts)
    answer_width = max(1, max(len(a) for a in answers))
    b = len(prompts)
    T = width + answer_width
    ids = torch.full((b, T), settings.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(b, T, dtype=torch.long)
    answer_mask = torch.zeros(b, T, dtype=torch.long)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        # Left-pad the prompt so that it ends at column P, where every answer then starts.
        ids[i, width - len(prompt):width] = torch.tensor(prompt)
        # Right-pad the answer: its tokens keep the positions they had while being sampled.
        ids[i, width:width + len(answer)] = torch.tensor(answer, dtype=torch.long)
        attention_mask[i, width - len(prompt):width + len(answer)] = 1
        answer_mask[i, width:width + len(answer)] = 1
    # An answer cut by max_new_tokens did not end (the PPO job can penalise its score).
    ended = torch.tensor([bool(a) and a[-1] in eos for a in answers])
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    return Rollout(ids, attention_mask, answer_mask, prompt_lengths, ended, width).to(_device_of(model))


def token_logprobs_of(model: nn.Module, ids: torch.Tensor, scored: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(b, T)`` ids -> ``(b, T - 1)`` float32: entry ``t`` is ``log p(ids[t + 1] | ids[: t + 1])``
    where ``scored[:, t + 1]`` is set, exactly 0 elsewhere. Gradients flow (run it under
    ``torch.no_grad()`` for a reference). ``attention_mask`` marks padding (left or right).

    One forward pass; the log-softmax is one cross-entropy over the scored positions only, in
    float32 even under autocast (its sums lose digits in 16 bits).
    """
    if ids.dim() != 2 or ids.shape != scored.shape:
        raise ValueError(f"ids and scored must have the same (batch, tokens) shape, got {tuple(ids.shape)} "
                         f"and {tuple(scored.shape)}")
    # Column t predicts ids[t + 1]: the targets are the ids shifted left by one, and the last column,
    # which predicts past the end, scores nothing.
    wanted = scored[:, 1:].bool()  # (b, T - 1)
    # The whole sequence goes in: a training-time hook that reads the sequence's length, such as
    # NEFTune's, sees the sequence as it is.
    if isinstance(model, Decoder):
        # Only the scored columns reach the head (emb_dim x vocab_size per position, the widest product):
        # a prompt's and padding's logits would be computed to be thrown away.
        hidden = model(ids, attention_mask=attention_mask, head=False)[:, :-1]  # (b, T - 1, emb_dim)
        logits = model.out_head(hidden[wanted])  # (scored, vocab)
    else:
        logits = model(ids, attention_mask=attention_mask)[:, :-1][wanted]
    # cross_entropy is -log_softmax read at the target, in one call; float32 because a log-sum-exp
    # over 50k+ vocabulary entries loses digits in 16 bits.
    logps = -F.cross_entropy(logits.float(), ids[:, 1:][wanted], reduction="none")  # (scored,)
    # Back in place, (b, T - 1); the unscored entries are exactly 0.
    return torch.zeros(wanted.shape, dtype=logps.dtype, device=logps.device).masked_scatter(wanted, logps)


def answer_logprobs(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """``(b, T - 1)``: the log-probability ``model`` gives each sampled answer token, at the
    column before it (entry ``t`` scores ``rollout.ids[:, t + 1]``); 0 on prompt and padding.
    Row sums are the answers' log-probabilities. Gradients flow."""
    return token_logprobs_of(model, rollout.ids, rollout.answer_mask, rollout.attention_mask)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
