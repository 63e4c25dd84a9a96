"""The training loop's settings, written once: steps, evaluation, checkpoints, precision, gradient clipping.

Every job builds one from its own settings; the loop (:mod:`minigpt.training.loop`) reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from minigpt.generation.sampling import check_sampling
from minigpt.runtime.runtime import (
    PRECISIONS,
)


@dataclass
class TrainConfig:
    """Settings of :func:`train_model` (the loop); the data and the model are arguments."""

    # General defaults; each job sets its own (minigpt.jobs).
    max_steps: int = 120
    lr: float = 3e-3               # peak learning rate, reached after the warm-up
    min_lr: float = 3e-4           # floor of the cosine decay
    warmup_steps: int = 12
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0  # largest gradient norm; None or 0: no clipping
    grad_accum: int = 1            # micro-batches per optimizer step
    eval_every: int = 30           # steps between evaluations (and checkpoints)
    eval_iter: int | None = 5      # batches per evaluation; None: the whole loaders
    precision: str = "float32"     # or "bfloat16", "float16" (CUDA), "auto" (bfloat16 where native)
    compile: bool = False          # torch.compile the training steps (eager, with a warning, if it fails)
    gradient_checkpointing: bool = False
    sample_prompt: str | None = None  # continued at every evaluation (needs a tokenizer)
    sample_tokens: int = 50
    sample_temperature: float = 0.8   # 0: greedy; else sampled, with the same seed at every evaluation
    sample_top_k: int | None = 40     # sample among the 40 likeliest tokens (None: all)
    sample_seed: int = 123

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list back
        for name in ("max_steps", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr <= lr, got warmup_steps="
                             f"{self.warmup_steps}, min_lr={self.min_lr}, lr={self.lr}")
        if self.grad_clip is not None and not self.grad_clip >= 0:  # also catches NaN
            # clip_grad_norm_ scales by max_norm / norm: a negative bound would flip every gradient
            raise ValueError(f"grad_clip must be 0 or more (0 or None: no clipping), got {self.grad_clip}")
        if self.eval_iter is not None and self.eval_iter < 1:
            raise ValueError(f"eval_iter must be at least 1, or None for the whole loaders, got {self.eval_iter}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be 0 or more, got {self.sample_tokens}")
        try:
            check_sampling(self.sample_temperature, self.sample_top_k)
        except ValueError as err:  # "temperature must be ...": name the field
            raise ValueError(f"sample_{err}") from None
