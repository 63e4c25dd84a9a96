"""`GPTConfig`: every number that shapes a GPT model, in one validated dataclass.

The field names are the book's (``vocab_size, context_length, emb_dim, n_heads,
n_layers, drop_rate, qkv_bias``), so the book's config dicts convert one-to-one
with ``GPTConfig.from_dict``. The four GPT-2 sizes differ only in width and depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# qkv_bias=False is the book's choice for training from scratch; OpenAI's checkpoints have
# query/key/value biases, and reading them sets qkv_bias=True (hf_layout.config_from_hf).
_GPT2_BASE = dict(vocab_size=50257, context_length=1024, drop_rate=0.1, qkv_bias=False)

PRESETS: dict[str, dict[str, Any]] = {
    # Every OpenAI size keeps head_dim = emb_dim / n_heads = 64; only width and depth grow.
    "gpt2-small": dict(_GPT2_BASE, emb_dim=768, n_layers=12, n_heads=12),    # 124M
    "gpt2-medium": dict(_GPT2_BASE, emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(_GPT2_BASE, emb_dim=1280, n_layers=36, n_heads=20),   # 774M
    "gpt2-xl": dict(_GPT2_BASE, emb_dim=1600, n_layers=48, n_heads=25),      # 1558M
    # Small enough to train on a laptop CPU in minutes; same GPT-2 vocabulary.
    "tiny": dict(vocab_size=50257, context_length=128, emb_dim=128, n_layers=4,
                 n_heads=4, drop_rate=0.0, qkv_bias=False, tie_weights=True),
}


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT-2-style model.

    ``tie_weights`` shares the token-embedding matrix with the output head, as
    OpenAI's GPT-2 does (off by default, as in the book).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            # bool is a subclass of int, so True would pass as 1 without the explicit check.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig: emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                f"each head gets emb_dim // n_heads dimensions, so pick n_heads among the "
                f"divisors of {self.emb_dim}"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (``gpt2-small``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``tiny``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GPTConfig:
        """Build from the book's dict (``{"vocab_size": 50257, "emb_dim": 768, ...}``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, cfg: GPTConfig | Mapping[str, Any] | str) -> GPTConfig:
        """Accept a GPTConfig, a book-style dict, or a preset name."""
        if isinstance(cfg, GPTConfig):
            return cfg
        if isinstance(cfg, str):
            return cls.from_preset(cfg)
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        raise TypeError(f"expected a GPTConfig, a dict or a preset name, got {type(cfg).__name__}")
