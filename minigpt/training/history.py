"""What a training run leaves behind besides its weights: the record of its curves, and
the exception that says it was stopped on purpose.

The one idea: a run is read afterwards through its :class:`History`, one list per
quantity, every list of the same kind indexed alike (per evaluation, or per optimizer
step), so it plots, saves as JSON and resumes without any conversion.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    """What :func:`minigpt.training.loop.train_model` records.

    Per evaluation: ``steps`` (optimizer steps done), ``tokens_seen`` (training tokens
    of all processes), ``train_losses``, ``val_losses``, ``samples``, and ``metrics``:
    the figures a loss function returns beside its loss, as ``"train/<name>"`` and
    ``"val/<name>"`` (e.g. ``"val/rewards/accuracies"`` for preference tuning; empty for a
    plain loss). Per optimizer step: ``lrs``, ``step_losses`` (mean over all processes and
    micro-batches) and ``grad_norms`` (before clipping); entry ``i`` belongs to step ``i + 1``.
    And the ``precision``.
    """

    steps: list[int] = field(default_factory=list)
    tokens_seen: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    precision: str | None = None
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict`; a history saved before a field existed gets its default."""
        return cls(**values)

    def record_metrics(self, split: str, metrics: dict[str, float]) -> None:
        """Append one evaluation's ``metrics`` of ``split`` ("train" or "val")."""
        for name, value in metrics.items():
            self.metrics.setdefault(f"{split}/{name}", []).append(value)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM, after finishing optimizer step ``step`` and
    saving a checkpoint to ``run_dir`` (when given): ``train_model(..., resume=True)``
    continues from there. ``exit_code``: 130 after SIGINT (Ctrl-C), 143 after SIGTERM;
    ``history``: the losses and samples up to the stop, for the figures of a stopped run."""

    def __init__(self, step: int, run_dir: str | os.PathLike | None, exit_code: int, signal_name: str = "",
                 history: History | None = None) -> None:
        self.step = step
        self.run_dir = run_dir
        self.exit_code = exit_code
        self.history = history
        saved = f"; its checkpoint is saved in {run_dir}" if run_dir is not None else "; nothing was saved"
        super().__init__(f"training stopped by {signal_name or 'a signal'} after step {step}{saved}")
