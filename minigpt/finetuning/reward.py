"""A reward model: a GPT that reads a prompt and an answer and returns one number, how good
the answer is, learnt from pairs of answers where people preferred one (RLHF's first stage).

The one idea: a reward model is a classifier with a single output (:mod:`minigpt.finetuning.classification`):
the vocabulary head becomes ``Linear(emb_dim, 1)``, read at the sequence's **last real token**,
the one position that has seen the whole text. It is never told how good an answer is, only
which of two is better, so it learns scores whose *differences* match the preferences
(Bradley and Terry 1952; Ouyang et al. 2022, eq. 1)::

    P(chosen beats rejected) = sigmoid(r(chosen) - r(rejected))
    loss = -log sigmoid(r(chosen) - r(rejected) - margin) + c * mean((r(chosen) + r(rejected))^2)

``margin`` (optional, per pair) asks for a wider gap where a pair is more clearly decided
(Llama 2); ``c``, the centering coefficient (Eisenstein et al. 2023), keeps the scores near 0,
since adding a constant to every score changes no preference. Both as in TRL's
``RewardTrainer.compute_loss`` (trl/trainer/reward_trainer.py, v0.9 to v0.19).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.finetuning.heads import last_token_logits, load_with_head, replace_head, save_with_head, set_trainable
from minigpt.io.files import write_json
from minigpt.models.base import CausalLM, evaluating
from minigpt.training.losses import NUM_SCORED

REWARD_FILE = "reward_model.json"  # marks a directory as a reward model's
METRIC_NAMES = ("accuracy", "margin")


def make_reward_model(model: CausalLM, trainable: list[str] | Literal["all"] = "all") -> CausalLM:
    """Turn ``model`` (in place) into a reward model: ``(b, T) -> (b, T, 1)`` scores, one per
    position, of which :func:`reward_scores` reads the last real one. The new head is always
    trained; ``trainable`` names the other submodules that train (default: all)."""
    # The vocabulary head (emb_dim x vocab_size) becomes Linear(emb_dim, 1): one score per position.
    replace_head(model, 1)
    # The fresh head must always train: its random weights mean nothing yet.
    set_trainable(model, trainable if trainable == "all" else [*trainable, "out_head"])
    return model


def reward_scores(model: nn.Module, ids: torch.Tensor, last_index: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(b, T)`` ids -> ``(b,)`` float32 scores, read at column ``last_index`` ``(b,)`` of each
    row, its last real token. ``attention_mask`` marks left padding (rollouts); right padding
    needs none, since no earlier token attends it."""
    # Every position gets a score, but only the last real token has seen the whole prompt and
    # answer through causal attention: that one is read.
    scores = model(ids, attention_mask=attention_mask)  # (b, T, 1)
    # last_token_logits takes lengths (it reads length - 1), hence the + 1 on the column index.
    return last_token_logits(scores, last_index + 1).squeeze(-1).float()


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_coefficient: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Bradley-Terry loss of ``(b,)`` scores of the chosen and the rejected answers (the
    module docstring's formula, averaged over pairs), and its metrics: ``accuracy``, the share
    of pairs whose chosen answer scores strictly higher, and ``margin``, the mean score gap."""
    # Bradley-Terry: P(chosen > rejected) = sigmoid(r_chosen - r_rejected); the loss is its
    # negative log-likelihood. Only differences matter, so the scores' offset is free.
    gap = chosen - rejected
    # logsigmoid, not log(sigmoid): exact for large negative gaps, where sigmoid rounds to 0.
    loss = -F.logsigmoid(gap if margin is None else gap - margin).mean()
    if center_coefficient:
        # Centering pins that free offset: it pulls the scores' sum towards 0, which changes no
        # preference but keeps the scores comparable across runs (and PPO's rewards near 0).
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    gap = gap.detach()
    return loss, {"accuracy": (gap > 0).float().mean(), "margin": gap.mean()}


def answer_ends(mask: torch.Tensor) -> torch.Tensor:
    """``(b, T)`` answer masks -> ``(b,)``: the column of each answer's last token (its
    end-of-text), where the score is read; the last column where the cut left no answer."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    # The answer masks are True on the answer and its end-of-text; the largest such column is the
    # last answer token, where the whole pair has been read.
    last = (mask.bool() * columns).amax(dim=1)
    return torch.where(mask.bool().any(dim=1), last, mask.shape[1] - 1)


class RewardLoss:
    """The reward model's loss for :func:`minigpt.training.loop.train_model`: ``loss_fn(model, batch)
    -> (loss, metrics)`` on batches of :func:`minigpt.finetuning.preference.collate_preferences` (a
    ``margin`` ``(b,)`` in the batch is used). Both answers go through the model in one pass."""

    def __init__(self, center_coefficient: float | None = None) -> None:
        if center_coefficient is not None and not center_coefficient >= 0:
            raise ValueError(f"center_coefficient must be 0 or more (TRL suggests 0.01), got {center_coefficient}")
        self.center_coefficient = center_coefficient

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Chosen rows first, then rejected: one forward pass for both sides. Right padding needs no
        # attention mask, since no real token attends a later pad.
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # one common width already
        ends = torch.cat([answer_ends(batch["chosen_mask"]), answer_ends(batch["rejected_mask"])])
        scores = reward_scores(model, ids, ends)
        pairs = batch[NUM_SCORED]
        # The first `pairs` scores are the chosen answers', the rest the rejected ones'.
        return reward_loss(scores[:pairs], scores[pairs:], batch.get("margin"), self.center_coefficient)


@torch.no_grad()
def score_texts(model: nn.Module, prompt_ids: list[list[int]], answer_ids: list[list[int]],
                pad_id: int = 0) -> torch.Tensor:
    """The reward model's ``(n,)`` scores of ``n`` prompt + answer id lists, in eval mode."""
    texts = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
    if not texts or not all(texts):
        raise ValueError("each prompt and answer together need at least one token to score")
    limit = model.cfg.context_length
    for i, text in enumerate(texts):
        if len(text) > limit:
            raise ValueError(f"text {i} has {len(text)} tokens, more than the reward model's context of {limit}: "
                             "shorten the prompt or the answer")
    width = max(len(t) for t in texts)
    # Right padding: each text's score is read at its own last token, len(text) - 1.
    ids = torch.tensor([t + [pad_id] * (width - len(t)) for t in texts], device=_device_of(model))
    with evaluating(model):
        return reward_scores(model, ids, torch.tensor([len(t) - 1 for t in texts], device=ids.device))


def save_reward_model(model: CausalLM, directory: str | os.PathLike) -> None:
    """Write the model as ``save_pretrained`` does, plus ``reward_model.json``, which marks it."""
    if model.out_head.out_features != 1:
        raise ValueError(f"a reward model has a head with one output, this one has {model.out_head.out_features}")
    # The head has one row, so the directory is read back by load_reward_model, not by load().
    save_with_head(model, directory)
    write_json(Path(directory) / REWARD_FILE, {"head": "scalar, read at the last real token"})


def load_reward_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> CausalLM:
    """A reward model written by :func:`save_reward_model` (``minigpt finetune reward``), in eval mode."""
    directory = Path(directory)
    if not (directory / REWARD_FILE).is_file():
        raise FileNotFoundError(f"{directory} has no {REWARD_FILE}: give the output directory of "
                                "'minigpt finetune reward'")
    # Eval mode: a reward model only scores, without dropout noise, during PPO too.
    return load_with_head(directory, 1, "a reward model").to(device).eval()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
