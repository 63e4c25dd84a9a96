"""The GPT-2 model (book ch. 4): token ids in, next-token logits out.

    ids (batch, tokens)
      -> token embedding + position embedding        (batch, tokens, emb_dim)
      -> dropout -> n_layers x TransformerBlock       (batch, tokens, emb_dim)
      -> final LayerNorm -> linear output head        (batch, tokens, vocab_size)

Row ``t`` of the logits scores every vocabulary entry as the token that follows
position ``t``; the causal mask in each block guarantees it saw only ids ``0..t``.
A batch of prompts of different lengths is left-padded and comes with an
``attention_mask``: positions then count each row's real tokens only, and no token
attends padding, so every row gets the logits it would get alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt.models.attention import MultiHeadAttention, padded_causal_mask
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.layers import LayerNorm, TransformerBlock
from minigpt.runtime.linear import Linear


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the first id outside ``[0, vocab_size)``.

    Call it where ids enter (a prompt, a training batch): it reads the values, which on a
    GPU means waiting for the device, so the model's forward does it only on the CPU.
    """
    if ids.numel():
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
                "was the text encoded with a different tokenizer?"
            )


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Run the ``with`` body in eval mode (no dropout), then restore the mode the module had.

    Evaluation and generation in the middle of training must not leave the model in eval
    mode, and must not switch a model that was already in eval mode to training; the
    previous mode comes back also when the body raises.
    """
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class GPTModel(nn.Module):
    """GPT-2 with the book's module names (``tok_emb``, ``pos_emb``, ``trf_blocks``,
    ``final_norm``, ``out_head``), so the book's saved state dicts load unchanged.

    ``cfg`` may be a :class:`GPTConfig`, the book's config dict, or a preset name.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any] | str) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # One matrix both maps ids to vectors and scores vectors against every id.
            self.out_head.weight = self.tok_emb.weight
        self.gradient_checkpointing = False
        self.cache_pos = 0  # absolute position of the next token fed with use_cache=True
        self._past_mask: torch.Tensor | None = None  # (batch, cache_pos) real tokens, once padding was seen
        if not self.tok_emb.weight.is_meta:  # a meta model only describes shapes
            self._init_parameters()

    def _init_parameters(self) -> None:
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            # GPT-2 scales the layers that write into the residual stream by 1/sqrt(2 * n_layers),
            # so the stream's variance does not grow with depth.
            if name.endswith(("out_proj.weight", "layers.2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        in_idx: torch.Tensor,
        use_cache: bool = False,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """``(batch, tokens)`` integer ids -> ``(batch, tokens, vocab_size)`` logits.

        With ``use_cache=True`` the ids continue the sequence fed by earlier cached
        calls (positions start at ``cache_pos``); call ``reset_kv_cache()`` first.

        ``attention_mask`` marks left padding, as in transformers: ``(batch, past + tokens)``
        (or just ``(batch, tokens)`` after a cached call, which remembers the past part),
        1 for a real token, 0 for padding. Each row's positions count its real tokens only
        and no query attends a padded key, so a padded row gives the logits it would alone.
        ``logits_to_keep=n`` returns only the last ``n`` positions' logits (0: all);
        generation needs just the last one, which spares the widest matrix product.
        """
        start = self.cache_pos if use_cache else 0
        self._check_ids(in_idx, start)
        positions, allowed = self._positions_and_mask(in_idx, start, use_cache, attention_mask)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        for block in self.trf_blocks:
            if self.gradient_checkpointing and self.training and not use_cache:
                # Recompute the block's activations in backward instead of storing them.
                x = checkpoint(block, x, attn_mask=allowed, use_reentrant=False)
            else:
                x = block(x, use_cache=use_cache, attn_mask=allowed)
        if use_cache:
            self.cache_pos += in_idx.shape[1]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.out_head(self.final_norm(x))

    def _positions_and_mask(
        self, in_idx: torch.Tensor, start: int, use_cache: bool, attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions ``(tokens,)`` or ``(batch, tokens)`` and the allowed query-key pairs
        ``(batch, 1, tokens, start + tokens)`` (``None``: no padding, plain causal attention)."""
        batch, num_tokens = in_idx.shape
        past = self._past_mask if use_cache and start else None
        if attention_mask is None and past is None:
            return torch.arange(start, start + num_tokens, device=in_idx.device), None
        real = self._full_mask(attention_mask, past, batch, start, num_tokens, in_idx.device)
        if use_cache:
            self._past_mask = real
        # A row's first real token gets position 0 however many pads precede it.
        positions = (real.cumsum(-1) - 1).clamp(min=0)[:, start:]
        return positions, padded_causal_mask(real, num_tokens)

    def _full_mask(
        self, attention_mask: torch.Tensor | None, past: torch.Tensor | None,
        batch: int, start: int, num_tokens: int, device: torch.device,
    ) -> torch.Tensor:
        """The ``(batch, start + tokens)`` bool mask of real tokens, the past part taken
        from ``attention_mask`` when it covers it, else from the cache (or all real)."""
        if attention_mask is None:
            attention_mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (
                num_tokens, start + num_tokens):
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new tokens) = ({batch}, {start + num_tokens})"
                f"{f' or ({batch}, {num_tokens})' if start else ''}, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=device, dtype=torch.bool)
        if mask.shape[1] == start + num_tokens:
            return mask
        if past is None:
            past = torch.ones(batch, start, dtype=torch.bool, device=device)
        return torch.cat([past, mask], dim=1)

    def _check_ids(self, in_idx: torch.Tensor, start: int) -> None:
        if not isinstance(in_idx, torch.Tensor):
            raise TypeError(f"GPTModel expects a tensor of token ids, got {type(in_idx).__name__}")
        if in_idx.dtype.is_floating_point or in_idx.dtype.is_complex or in_idx.dtype == torch.bool:
            raise TypeError(
                f"GPTModel expects integer token ids (torch.long), got dtype {in_idx.dtype}; "
                "convert with ids.long() if these really are ids"
            )
        if in_idx.dim() != 2:
            raise ValueError(
                f"GPTModel expects ids of shape (batch, tokens), got shape {tuple(in_idx.shape)}; "
                "add a batch dimension with ids.unsqueeze(0)"
            )
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

    def reset_kv_cache(self) -> None:
        """Empty every block's KV cache; the next cached call starts at position 0."""
        self.cache_pos = 0
        self._past_mask: torch.Tensor | None = None  # (batch, cache_pos) real tokens, once padding was seen
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.reset_cache()

    def set_attention_impl(self, use_sdpa: bool) -> None:
        """Switch every block between the fused (SDPA) and the explicit attention path."""
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.use_sdpa = use_sdpa

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied output head is counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    # The one declared upward import of the package: minigpt.models.gpt2.weights builds on this module,
    # so these two methods import it when called, not when minigpt.models.gpt2.model is imported.
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors``, each atomically (see :mod:`minigpt.models.gpt2.weights`)."""
        from minigpt.models.gpt2.weights import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> GPTModel:
        """Load a minigpt directory, a Hugging Face GPT-2 directory, a book ``.pth`` (with
        ``cfg=``), or a GPT-2 name (``gpt2-small`` ... ``gpt2-xl``, found or downloaded by
        :mod:`minigpt.io.hub`); parameters are views of the memory-mapped file (see :mod:`minigpt.models.gpt2.weights`)."""
        from minigpt.models.gpt2.weights import load_pretrained

        return load_pretrained(name_or_path, **kwargs)
