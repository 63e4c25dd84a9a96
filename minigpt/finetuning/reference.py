"""The reference model of preference tuning and RL: the log-probabilities it gives, and three ways to hold it.

The one idea: DPO, PPO and GRPO all keep the policy near where it started by comparing its
log-probabilities with a reference's. The reference can be a frozen copy (memory: a second model),
the same model with its LoRA adapters switched off (no copy at all), or its log-probabilities
computed once before training and cached on disk (DPO's data never changes).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minigpt.finetuning.neftune import neftune_lengths
from minigpt.finetuning.preference import PreferenceDataset, preference_dataloader
from minigpt.finetuning.rollout import token_logprobs_of
from minigpt.io.files import atomic_write
from minigpt.lora.adapters import lora_disabled
from minigpt.models.base import evaluating
from minigpt.training.losses import to_device

logger = logging.getLogger(__name__)


_CACHE_FORMAT = "minigpt-reference-logps-1"  # part of every cache key: a new format never reads an old file


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """``log p(ids[:, t] | ids[:, :t])`` summed over the tokens ``t`` that ``mask`` selects:
    ``(batch, tokens)`` ids and mask (bool or 0/1) -> ``(batch,)`` float32.

    The logits at position ``t - 1`` score token ``t``, so the first token has no
    log-probability (``mask[:, 0]`` is ignored). With ``average`` the sum is divided by
    the number of selected tokens (0 where none is selected).
    """
    # The one per-token implementation (minigpt.finetuning.rollout), summed over each row.
    # Summed, not averaged: DPO's log pi(y | x) is the whole answer's log-probability, the sum
    # over its tokens (IPO asks for the average, below).
    total = token_logprobs_of(model, ids, mask).sum(dim=1)
    # mask[:, 1:] lines up with the (batch, tokens - 1) log-probs: column t scores token t + 1.
    scored = mask[:, 1:].bool()
    return total / scored.sum(dim=1).clamp(min=1) if average else total


def pair_logprobs(
    model: nn.Module, batch: Mapping[str, Any], average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` log-probabilities, each ``(batch,)``, of a preference batch
    (see :func:`minigpt.finetuning.preference.collate_preferences`), in ONE forward pass over both.

    NEFTune (:mod:`minigpt.finetuning.neftune`), when on and the model is training, gets each
    sequence's own length: up to its answer's end-of-text, padding excluded."""
    ids = [batch["chosen_ids"], batch["rejected_ids"]]
    masks = [batch["chosen_mask"], batch["rejected_mask"]]
    # Chosen and rejected go through the model as one batch of 2 * pairs rows: one forward pass
    # (and one set of activations) instead of two.
    width = max(ids[0].shape[1], ids[1].shape[1])
    # Padding at the end changes nothing before it (causal attention) and is never scored.
    ids = torch.cat([F.pad(x, (0, width - x.shape[1])) for x in ids])
    # The padded columns are never scored (mask False).
    mask = torch.cat([F.pad(m.bool(), (0, width - m.shape[1]), value=False) for m in masks])
    with neftune_lengths(model, _lengths(mask)):
        logps = sequence_logprobs(model, ids, mask, average)
    # The first half of the rows are the chosen answers, the second the rejected ones.
    return logps[: len(batch["chosen_ids"])], logps[len(batch["chosen_ids"]):]


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """``(batch,)``: each sequence's length without padding, i.e. up to its last scored token
    (the answer's end-of-text); the full width where the cut left nothing scored."""
    # 1-based positions: the largest one where the mask is set is the length up to and including
    # the last scored token; a row with nothing scored gives 0.
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = (mask * positions).amax(dim=1)
    # A row with nothing scored (its answer cut away) counts as the full width.
    return torch.where(last > 0, last, mask.shape[1])


class FrozenReference:
    """The reference as a separate model, run in eval mode without gradients.

    ``copy=True`` (default): a frozen deep copy of ``model`` as it is now, so ``model`` can
    be trained as the policy. ``copy=False``: ``model`` itself, untouched (e.g. a reference
    loaded separately, or the model before training when precomputing). It follows the
    batch to its device on first use.
    """

    def __init__(self, model: nn.Module, *, copy: bool = True) -> None:
        if copy:
            # A deep copy *now*: training the policy afterwards must not move the reference.
            model = _deepcopy(model).requires_grad_(False).eval()
        self.model = model

    def logps(self, batch: Mapping[str, Any], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` log-probabilities ``(batch,)`` under the reference."""
        device = batch["chosen_ids"].device
        if _device_of(self.model) != device:
            # Moved once, lazily: the copy is made before the training loop moves the policy.
            self.model.to(device)
        with torch.no_grad(), evaluating(self.model):
            return pair_logprobs(self.model, batch, average)

    def fingerprint(self) -> str:
        """SHA-256 of the reference's configuration and weights."""
        return weights_fingerprint(self.model)


class AdaptersOffReference:
    """The reference as the LoRA policy itself with its adapters switched off
    (:func:`minigpt.lora.adapters.lora_disabled`): the frozen base model, with no second copy in
    memory. Run in eval mode without gradients; ``model`` is the unwrapped policy."""

    def __init__(self, model: nn.Module) -> None:
        # Checked at construction, so a wrong reference fails before training starts.
        with lora_disabled(model):  # a model without LoRA layers raises here, saying so
            pass
        self.model = model

    def logps(self, batch: Mapping[str, Any], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` log-probabilities ``(batch,)`` under the base model."""
        with torch.no_grad(), evaluating(self.model), lora_disabled(self.model):
            return pair_logprobs(self.model, batch, average)

    def fingerprint(self) -> str:
        """SHA-256 of the base model's configuration and weights (the adapters left out)."""
        return weights_fingerprint(self.model, skip=".lora.")


Reference = FrozenReference | AdaptersOffReference


def weights_fingerprint(model: nn.Module, skip: str | None = None) -> str:
    """SHA-256 of ``model``'s configuration and every tensor of its state dict (names,
    dtypes, shapes, bytes), leaving out the names that contain ``skip``."""
    # The config first: two models with equal tensors but different shapes (heads) must differ.
    digest = hashlib.sha256(repr(getattr(model, "cfg", type(model).__name__)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if skip is not None and skip in name:
            continue
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tensor.numel()}|".encode())
        # The raw bytes, so a bfloat16 tensor (which numpy cannot hold) hashes too.
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def precompute_reference(
    reference: Reference | nn.Module,
    dataset: PreferenceDataset,
    *,
    allowed_max_length: int | None = 1024,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path | None:
    """Compute the reference's summed log-probabilities of every pair of ``dataset`` once
    and store them in it (:meth:`PreferenceDataset.set_reference`): its batches then
    carry them, and :class:`DPOLoss` needs no reference model while training.

    ``reference``: a reference, or a model used as it is (``FrozenReference(model,
    copy=False)``). ``allowed_max_length`` must be the cut of the training batches.
    ``device``: where to run it (default: where the reference's weights are).

    With ``cache_dir`` (the run's folder) the values are read from, or written
    atomically to, ``reference-logps-<key>.safetensors`` there, where the key hashes the
    reference's weights, the dataset's token ids and the cut: another model or other data
    never reuses the file. Returns its path (None without ``cache_dir``).
    """
    if isinstance(reference, nn.Module):
        # A bare model is used as it is: nothing trains while precomputing, so no copy is needed.
        reference = FrozenReference(reference, copy=False)
    # Old values must not ride along in the batches while the reference computes new ones.
    dataset.clear_reference()
    key = path = None
    if cache_dir is not None:
        # The key covers everything the values depend on: the reference's weights, the token ids and
        # the cut (a shorter cut scores fewer answer tokens).
        key = hashlib.sha256(f"{_CACHE_FORMAT}|{reference.fingerprint()}|{dataset.fingerprint()}|"
                             f"{allowed_max_length}".encode()).hexdigest()
        path = Path(cache_dir) / f"reference-logps-{key[:16]}.safetensors"
        cached = _read_cache(path, key, len(dataset))
        if cached is not None:
            logger.info("reference log-probabilities of %d pairs read from %s", len(dataset), path)
            dataset.set_reference(cached, allowed_max_length)
            return path
    device = torch.device(device) if device is not None else _device_of(reference.model)
    rows = []
    for batch in preference_dataloader(dataset, batch_size=batch_size, allowed_max_length=allowed_max_length):
        # Sums, always: for IPO they are divided by the token counts when a batch is used
        # (DPOLoss.reference_logps), and the counts depend only on the masks.
        chosen, rejected = reference.logps(to_device(batch, device), average=False)
        # (batch, 2) rows in dataset order: this loader does not shuffle.
        rows.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    logps = torch.cat(rows)
    dataset.set_reference(logps, allowed_max_length)
    if path is not None:
        metadata = {"format": "pt", "key": key, "pairs": str(len(dataset)),
                    "allowed_max_length": str(allowed_max_length)}
        # Atomic: an interrupted run leaves no half-written cache that a later run would trust.
        atomic_write(path, lambda tmp: save_file({"logps": logps.contiguous()}, tmp, metadata=metadata))
        logger.info("reference log-probabilities of %d pairs written to %s", len(dataset), path)
    return path


def _read_cache(path: Path, key: str, pairs: int) -> torch.Tensor | None:
    """The cached ``(pairs, 2)`` values at ``path`` if they are there, complete and for ``key``."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            logps = f.get_tensor("logps")
    except Exception as err:  # safetensors raises its own error types for damaged files
        logger.warning("ignoring unreadable reference cache %s (%s); computing it again", path, err)
        return None
    # The file name holds only 16 hex digits of the key; the full key in the metadata decides.
    if metadata.get("key") != key or tuple(logps.shape) != (pairs, 2):
        logger.warning("ignoring reference cache %s: it was computed for another model or data", path)
        return None
    return logps


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability of ``model`` to 0 (``nn.Dropout`` layers, LoRA's
    included, and attention's fused ``dropout_p``), for good: DPO compares log-probabilities
    of the policy with the reference's, and dropout noise would swamp the difference.
    The mode is left alone, so training-only behaviour such as NEFTune stays on.
    The configuration (``model.cfg.drop_rate``) is unchanged. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            # Dropout makes the policy's log-probabilities noisy, while the reference runs in eval
            # mode: the noise would leak into h and into every implicit reward.
            module.p = 0.0
        if isinstance(getattr(module, "dropout_p", None), float):
            # Attention's SDPA path reads its own dropout_p, not an nn.Dropout.
            module.dropout_p = 0.0
    return model


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _deepcopy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, of the module itself when it is wrapped (several processes, compiled)."""
    # DistributedDataParallel keeps the model as .module, torch.compile as ._orig_mod; copying the
    # wrapper would copy process groups or compiled graphs.
    return copy.deepcopy(getattr(model, "module", getattr(model, "_orig_mod", model)))
