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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt.models.decoder import Decoder
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.layers import LayerNorm, TransformerBlock
from minigpt.runtime.linear import Linear


class GPTModel(Decoder):
    """GPT-2 with the book's module names (``tok_emb``, ``pos_emb``, ``trf_blocks``,
    ``final_norm``, ``out_head``), so the book's saved state dicts load unchanged.

    ``cfg`` may be a :class:`GPTConfig`, the book's config dict, or a preset name.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any] | str) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        # Learned absolute positions: one vector per position up to context_length, added to the
        # token's vector (Llama rotates queries and keys instead).
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # One matrix both maps ids to vectors and scores vectors against every id.
            # That saves vocab_size * emb_dim parameters: 38.6M of GPT-2 small's 163M untied.
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
            # GPT-2's std of 0.02 for every linear and embedding. With tied weights the shared matrix
            # is drawn twice (once as each module); the second draw stands.
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        in_idx: torch.Tensor,
        use_cache: bool = False,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        head: bool = True,
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
        ``head=False`` stops before the output head: ``(batch, tokens, emb_dim)``, the final
        norm's output, for a loss that applies the head itself (:mod:`minigpt.training.head_loss`).
        """
        # The KV-cache offset: a cached call continues at absolute position cache_pos.
        start = self.cache_pos if use_cache else 0
        self._check_ids(in_idx, start)
        positions, allowed = self._positions_and_mask(in_idx, start, use_cache, attention_mask)
        # positions is (tokens,), broadcast over the batch, or (batch, tokens) with left padding;
        # either way x is (batch, tokens, emb_dim).
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        for block in self.trf_blocks:
            if self.gradient_checkpointing and self.training and not use_cache:
                # Recompute the block's activations in backward instead of storing them.
                x = checkpoint(block, x, attn_mask=allowed, use_reentrant=False)
            else:
                x = block(x, use_cache=use_cache, attn_mask=allowed)
        return self._logits(x, in_idx.shape[1], use_cache, logits_to_keep, head)
