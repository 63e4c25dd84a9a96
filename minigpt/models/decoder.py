"""What every decoder here shares around its blocks: checking ids, positions, padding, counting.

The one idea: left padding is handled once, for every family. A batch of prompts of different
lengths is left-padded and comes with an ``attention_mask`` (1 real, 0 padding); each row's
positions then count its real tokens only, and no query attends a padded key, so every row gets
the logits it would get alone. With the KV cache the mask of the tokens already fed is kept
(``_past_mask``), so a cached step may pass the mask of its new tokens only.
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt.models.base import check_token_ids
from minigpt.models.kv_cache import padded_causal_mask


class Decoder(nn.Module):
    """Base class of :class:`~minigpt.models.gpt2.model.GPTModel` and
    :class:`~minigpt.models.llama.model.LlamaModel`: a subclass sets ``cfg``, ``tok_emb``,
    ``trf_blocks`` (each block's ``att`` holding a KV cache), ``final_norm`` and ``out_head``,
    calls :meth:`_check_ids` and :meth:`_positions_and_mask` at the start of its forward and
    ends it with :meth:`_logits`."""

    cache_pos: int = 0  # absolute position of the next token fed with use_cache=True
    _past_mask: torch.Tensor | None = None  # (batch, cache_pos) real tokens, once padding was seen

    def _positions_and_mask(
        self, in_idx: torch.Tensor, start: int, use_cache: bool, attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions ``(tokens,)`` or ``(batch, tokens)`` and the allowed query-key pairs
        ``(batch, 1, tokens, start + tokens)`` (``None``: no padding, plain causal attention)."""
        batch, num_tokens = in_idx.shape
        # The real-token mask of what the cache holds; it only matters when continuing (start > 0).
        past = self._past_mask if use_cache and start else None
        # No padding anywhere: positions continue from the cache offset (start = cache_pos), the same
        # for every row, and attention stays plain causal (each attention module builds that mask).
        if attention_mask is None and past is None:
            return torch.arange(start, start + num_tokens, device=in_idx.device), None
        # real: (batch, start + tokens) bool, which of all the keys so far are real tokens.
        real = self._full_mask(attention_mask, past, batch, start, num_tokens, in_idx.device)
        if use_cache:
            # Kept, so that the next cached step may pass the mask of its new tokens only.
            self._past_mask = real
        # A row's first real token gets position 0 however many pads precede it.
        # cumsum counts a row's real tokens up to each column, so a real token's position is its
        # index among the real ones: [pad pad A B] -> [0 0 0 1]. A pad's position is clamped to 0
        # (never read by a real query); [:, start:] keeps the new tokens' columns, (batch, tokens).
        positions = (real.cumsum(-1) - 1).clamp(min=0)[:, start:]
        return positions, padded_causal_mask(real, num_tokens)

    def _full_mask(
        self, attention_mask: torch.Tensor | None, past: torch.Tensor | None,
        batch: int, start: int, num_tokens: int, device: torch.device,
    ) -> torch.Tensor:
        """The ``(batch, start + tokens)`` bool mask of real tokens, the past part taken
        from ``attention_mask`` when it covers it, else from the cache (or all real)."""
        if attention_mask is None:
            # Only reached with a cached padding mask: the new tokens of this step are all real.
            attention_mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (
                num_tokens, start + num_tokens):
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new tokens) = ({batch}, {start + num_tokens})"
                f"{f' or ({batch}, {num_tokens})' if start else ''}, got {tuple(attention_mask.shape)}"
            )
        # 0/1 integers (transformers' convention) or bools alike.
        mask = attention_mask.to(device=device, dtype=torch.bool)
        # The caller gave the whole (past + new) mask: it wins over the cached one.
        if mask.shape[1] == start + num_tokens:
            return mask
        if past is None:
            # No padding was seen while the cache filled: those tokens were all real.
            past = torch.ones(batch, start, dtype=torch.bool, device=device)
        return torch.cat([past, mask], dim=1)

    def _check_ids(self, in_idx: torch.Tensor, start: int) -> None:
        if not isinstance(in_idx, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor of token ids, got {type(in_idx).__name__}")
        # Catch float and bool "ids" here, where the message can say what to do; the embedding
        # lookup would fail later with a less helpful one.
        if in_idx.dtype.is_floating_point or in_idx.dtype.is_complex or in_idx.dtype == torch.bool:
            raise TypeError(
                f"{type(self).__name__} expects integer token ids (torch.long), got dtype {in_idx.dtype}; "
                "convert with ids.long() if these really are ids"
            )
        if in_idx.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} expects ids of shape (batch, tokens), got shape {tuple(in_idx.shape)}; "
                "add a batch dimension with ids.unsqueeze(0)"
            )
        # Positions past context_length have no learned embedding (GPT-2) and no RoPE table row (Llama).
        limit = self.cfg.context_length
        if start + in_idx.shape[1] > limit:
            raise ValueError(
                f"{in_idx.shape[1]} tokens (after {start} cached) exceed context_length={limit}; "
                f"keep only the last {limit - start} tokens, e.g. ids[:, -{limit - start}:]"
            )
        # On a GPU reading the ids' values waits for the device (and breaks a torch.compile
        # graph), so there the entry points (a prompt, a batch) call check_token_ids once.
        if in_idx.device.type == "cpu" and not torch.compiler.is_compiling():
            check_token_ids(in_idx, self.cfg.vocab_size)

    def _logits(
        self, x: torch.Tensor, new_tokens: int, use_cache: bool, logits_to_keep: int, head: bool = True,
    ) -> torch.Tensor:
        """The end of a forward: ``(batch, tokens, emb_dim)`` out of the last block ->
        ``(batch, tokens or logits_to_keep, vocab_size)`` logits; with ``head=False`` the
        final norm's output ``(batch, tokens or logits_to_keep, emb_dim)``, what the head scores."""
        if use_cache:
            # Moved on once every block has appended its keys, so all blocks saw the same offset.
            self.cache_pos += new_tokens
        if logits_to_keep:
            # Cut before the head: it is the widest product (emb_dim x vocab_size per position).
            x = x[:, -logits_to_keep:]
        # A last norm: pre-norm blocks leave the residual stream itself un-normalised.
        x = self.final_norm(x)
        return self.out_head(x) if head else x

    def reset_kv_cache(self) -> None:
        """Empty every block's KV cache; the next cached call starts at position 0."""
        self.cache_pos = 0
        self._past_mask = None
        for block in self.trf_blocks:
            block.att.reset_cache()

    def reserve_kv_cache(self, new_tokens: int) -> None:
        """Grow every block's KV cache, where it exists, to hold ``new_tokens`` more tokens."""
        for block in self.trf_blocks:
            block.att.kv_cache.reserve(new_tokens)

    def set_attention_impl(self, use_sdpa: bool) -> None:
        """Switch every block between the fused (SDPA) and the explicit attention path."""
        for block in self.trf_blocks:
            block.att.use_sdpa = use_sdpa

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied output head is counted once."""
        # parameters() yields a shared tensor once, so a tied head is not counted twice.
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device
