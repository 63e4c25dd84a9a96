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

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt.models.decoder import Decoder
from minigpt.models.llama.layers import GroupedQueryAttention, RMSNorm, SwiGLU
from minigpt.models.llama.rope import RoPE
from minigpt.runtime.linear import Linear

_SMOLLM2 = dict(model_type="llama", vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
# The published config.json of each named model (the fields that shape it).
PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M: 9 query heads share 3 kv heads, head_dim 576 / 9 = 64.
    "smollm2-135m": dict(_SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3),
    "smollm2-360m": dict(_SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       bos_token_id=151643, eos_token_id=151645),
    # Llama 3.2 trained at 8,192 tokens; the llama3 rope_scaling stretches it to 131,072.
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
                         rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         bos_token_id=128000, eos_token_id=128001),
}
MODEL_TYPES = ("llama", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama-family model (defaults: SmolLM2-135M).

    ``n_kv_heads`` key/value heads serve ``n_heads`` query heads; ``head_dim`` defaults to
    ``emb_dim // n_heads`` (Qwen3 sets it apart); ``hidden_dim`` is SwiGLU's width;
    ``rope_scaling`` is Hugging Face's dict (``None`` or ``{"rope_type": "llama3", ...}``);
    ``qk_norm`` is Qwen3's per-head RMSNorm on queries and keys; ``qkv_bias`` adds biases
    to the four attention projections (Hugging Face's ``attention_bias``).
    """

    vocab_size: int = 49152
    context_length: int = 8192
    emb_dim: int = 576
    hidden_dim: int = 1536
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int | None = None
    rope_theta: float = 100000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_weights: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        # Qwen3 sets head_dim apart from emb_dim / n_heads (128 vs 64 for 0.6B); the others derive it.
        if self.head_dim is None:
            if self.emb_dim % self.n_heads:
                raise ValueError(f"LlamaConfig: emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                                 "pick n_heads among its divisors or set head_dim")
            self.head_dim = self.emb_dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling and "rope_theta" in self.rope_scaling:
            # transformers-5 files nest rope_theta with the scaling; it is one field here (the
            # top-level one), else an exported config.json would carry two that can disagree
            self.rope_scaling = {k: v for k, v in self.rope_scaling.items() if k != "rope_theta"}
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")

    @property
    def drop_rate(self) -> float:
        """Llama-family models train without dropout (kept for code written for GPT-2's config)."""
        return 0.0

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named model's shape (``smollm2-135m``, ``smollm2-360m``, ``qwen3-0.6b``, ``llama-3.2-1b``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown Llama-family preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(cls.from_hf(PRESETS[name], source=name), **overrides)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config") -> LlamaConfig:
        """A Hugging Face ``config.json`` dict (``LlamaForCausalLM`` or ``Qwen3ForCausalLM``);
        refuses the variants this model does not compute (naming each field)."""
        c = dict(config)
        model_type = c.get("model_type", "llama")
        rope = c.get("rope_parameters") or {}  # newer files keep rope_theta and the scaling together
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        unsupported = [f"{field}={c.get(field)!r}" for field, ok in (
            ("model_type", model_type in MODEL_TYPES),
            ("hidden_act", c.get("hidden_act", "silu") == "silu"),
            ("mlp_bias", not c.get("mlp_bias", False)),
            ("use_sliding_window", not c.get("use_sliding_window", False)),
            ("rope_interleaved", not c.get("rope_interleaved", False)),  # pairs (x[2i], x[2i+1]): not ours
            ("rope_scaling", rope_type in (None, "default", "llama3")),
        ) if not ok]
        if unsupported:
            raise ValueError(f"{source} describes a model minigpt's LlamaModel does not implement: "
                             f"{', '.join(unsupported)}")
        try:
            return cls(
                vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"], emb_dim=c["hidden_size"],
                hidden_dim=c["intermediate_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], head_dim=c.get("head_dim"),
                rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=dict(scaling) if scaling else None,
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_weights=bool(c.get("tie_word_embeddings", True)),
                qkv_bias=bool(c.get("attention_bias", False)), qk_norm=model_type == "qwen3", model_type=model_type,
                bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
            )
        except KeyError as err:
            raise ValueError(f"{source} lacks the field {err.args[0]!r} that a Llama-family config needs") from err

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` that ``transformers``' ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` reads."""
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError("Hugging Face has no Llama with query/key norms nor a Qwen3 without: "
                             f"qk_norm={self.qk_norm} with model_type={self.model_type!r}")
        return {
            "model_type": self.model_type, "architectures": [_ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size, "max_position_embeddings": self.context_length,
            "hidden_size": self.emb_dim, "intermediate_size": self.hidden_dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "tie_word_embeddings": self.tie_weights,
            "attention_bias": self.qkv_bias, "mlp_bias": False, "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
                logits_to_keep: int = 0) -> torch.Tensor:
        """``(batch, tokens)`` ids -> ``(batch, tokens, vocab_size)`` logits, exactly as
        :meth:`GPTModel.forward <minigpt.models.gpt2.model.GPTModel.forward>`: ``use_cache=True`` continues the
        sequence of earlier cached calls; ``attention_mask`` (1 real, 0 left padding) hides padding
        and makes each row's positions count its real tokens; ``logits_to_keep=n`` keeps the last n.
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
        if use_cache:
            self.cache_pos += in_idx.shape[1]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.out_head(self.final_norm(x))

    def reset_kv_cache(self) -> None:
        """Empty every block's KV cache; the next cached call starts at position 0."""
        self.cache_pos = 0
        self._past_mask: torch.Tensor | None = None  # (batch, cache_pos) real tokens, once padding was seen
        for block in self.trf_blocks:
            block.att.reset_cache()

    def set_attention_impl(self, use_sdpa: bool) -> None:
        """Switch every block between the fused (SDPA) and the explicit attention path."""
        for block in self.trf_blocks:
            block.att.use_sdpa = use_sdpa

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes the KV cache holds per token of one sequence: keys and values of every layer."""
        itemsize = self.tok_emb.weight.element_size()
        # 2: keys and values. GQA's saving shows here: n_kv_heads, not n_heads.
        return 2 * self.cfg.n_layers * self.cfg.n_kv_heads * self.cfg.head_dim * itemsize
