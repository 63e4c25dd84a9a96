"""The Llama family's numbers: :class:`LlamaConfig`, read from and written to a Hugging Face ``config.json``.

GPT-2's field names are kept where the idea is the same (``emb_dim``, ``n_heads``,
``context_length`` ...); :data:`PRESETS` are the published configs of the models minigpt
knows by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_weights=bool(c.get("tie_word_embeddings", False)),
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
