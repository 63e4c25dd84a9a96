"""The Llama family (Llama 3.x, SmolLM2, Qwen3): GPT-2 with four changes, one model class.

    ids (batch, tokens)
      -> token embedding (no position embedding: RoPE rotates queries and keys) (batch, tokens, emb_dim)
      -> n_layers x [x + GQA(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]           (batch, tokens, emb_dim)
      -> final RMSNorm -> linear output head (often tied to the embedding)  (batch, tokens, vocab_size)

:class:`LlamaConfig` holds the numbers with GPT-2's field names where the idea is the
same (``emb_dim``, ``n_heads``, ``context_length`` ...) and reads/writes a Hugging Face
``config.json`` (``from_hf`` / ``to_hf``); :data:`PRESETS` are the published configs of
the models minigpt knows by name. :class:`LlamaModel` offers the same interface as
:class:`minigpt.models.gpt2.model.GPTModel` (module names ``tok_emb``, ``trf_blocks``, ``final_norm``,
``out_head``; ``nn.Linear`` projections; a KV cache; left padding with ``attention_mask``),
so generation, LoRA, quantization, DPO and evaluation work on it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt.models.decoder import Decoder
from minigpt.models.llama.config import LlamaConfig
from minigpt.models.llama.layers import GroupedQueryAttention, RMSNorm, SwiGLU
from minigpt.models.llama.rope import RoPE
from minigpt.runtime.linear import Linear


class LlamaBlock(nn.Module):
    """Pre-norm block: ``x + att(norm1(x))`` then ``x + ff(norm2(x))``; ``(b, tokens, emb) -> same``."""

    def __init__(self, cfg: LlamaConfig, rope: RoPE) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.att = GroupedQueryAttention(cfg.emb_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, rope,
                                         qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.ff = SwiGLU(cfg.emb_dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, use_cache: bool = False,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # GPT-2's pre-norm residual layout, with RMSNorm and no dropout.
        x = x + self.att(self.norm1(x), positions, use_cache=use_cache, attn_mask=attn_mask)
        return x + self.ff(self.norm2(x))


class LlamaModel(Decoder):
    """A Llama-family language model; ``cfg`` is a :class:`LlamaConfig`, a Hugging Face
    ``config.json`` dict, or a preset name."""

    def __init__(self, cfg: LlamaConfig | Mapping[str, Any] | str) -> None:
        super().__init__()
        if isinstance(cfg, str):
            cfg = LlamaConfig.from_preset(cfg)
        elif isinstance(cfg, Mapping):
            cfg = LlamaConfig.from_hf(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        # One RoPE, and one pair of cos/sin tables, for every block: the angles depend on position only.
        self.rope = RoPE(cfg.head_dim, cfg.context_length, cfg.rope_theta, cfg.rope_scaling)
        self.trf_blocks = nn.ModuleList(LlamaBlock(cfg, self.rope) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # Tied: the head scores against the embedding rows (every preset here ties).
            self.out_head.weight = self.tok_emb.weight
        self.gradient_checkpointing = False
        self.cache_pos = 0  # tokens fed with use_cache=True since the last reset
        self._past_mask: torch.Tensor | None = None  # (batch, cache_pos) real tokens, once padding was seen
        if not self.tok_emb.weight.is_meta:  # a meta model only describes shapes
            self._init_parameters()

    def _init_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # Random weights only: a loaded model is built on meta and skips this method.
                nn.init.normal_(module.weight, mean=0.0, std=0.02)  # Hugging Face's initializer_range
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():  # as GPT-2: writes into the residual stream scaled down
            if name.endswith(("out_proj.weight", "ff.fc3.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, in_idx: torch.Tensor, use_cache: bool = False, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, head: bool = True) -> torch.Tensor:
        """``(batch, tokens)`` ids -> ``(batch, tokens, vocab_size)`` logits, exactly as
        :meth:`GPTModel.forward <minigpt.models.gpt2.model.GPTModel.forward>`: ``use_cache=True`` continues the
        sequence of earlier cached calls; ``attention_mask`` (1 real, 0 left padding) hides padding
        and makes each row's positions count its real tokens; ``logits_to_keep=n`` keeps the last n;
        ``head=False`` returns the final norm's output ``(batch, tokens, emb_dim)`` instead of logits.
        """
        start = self.cache_pos if use_cache else 0
        self._check_ids(in_idx, start)
        positions, allowed = self._positions_and_mask(in_idx, start, use_cache, attention_mask)
        # No position embedding: positions enter inside attention, as RoPE rotations.
        x = self.tok_emb(in_idx)
        for block in self.trf_blocks:
            if self.gradient_checkpointing and self.training and not use_cache:
                # Recompute the block's activations in backward instead of storing them.
                x = checkpoint(block, x, positions, attn_mask=allowed, use_reentrant=False)
            else:
                x = block(x, positions, use_cache=use_cache, attn_mask=allowed)
        return self._logits(x, in_idx.shape[1], use_cache, logits_to_keep, head)

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes the KV cache holds per token of one sequence: keys and values of every layer."""
        itemsize = self.tok_emb.weight.element_size()
        # 2: keys and values. GQA's saving shows here: n_kv_heads, not n_heads.
        return 2 * self.cfg.n_layers * self.cfg.n_kv_heads * self.cfg.head_dim * itemsize
