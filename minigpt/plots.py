"""Plots of a training run: the loss curves and the learning-rate schedule.

The one idea: read the two loss curves together. Both falling means the model is
learning; training loss falling while validation loss rises means it is memorising
the training text (overfitting).

The figures are built with matplotlib's object-oriented API on its Agg (PNG) canvas,
without pyplot: nothing depends on a display or on global plotting state, so this
works the same in a script, a test or a server; a notebook shows the returned figure.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minigpt.download import atomic_write


class PlotFigure(Figure):
    """A matplotlib ``Figure`` that shows itself as a PNG when a notebook displays it
    (a figure made without pyplot is not known to the notebook's plotting backend)."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()


def _as_dict(history: Any) -> Mapping[str, list]:
    """A :class:`minigpt.training.History` or its ``to_dict()``."""
    return history.to_dict() if hasattr(history, "to_dict") else history


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    FigureCanvasAgg(fig)  # gives the figure a PNG canvas
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


def plot_losses(history: Any, path: str | os.PathLike | None = None) -> Figure:
    """Training and validation loss against optimizer steps, with the number of training
    tokens seen on a second x-axis at the top; saved as a PNG at ``path`` if given."""
    h = _as_dict(history)
    fig = PlotFigure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    if h.get("step_losses"):
        steps = range(1, len(h["step_losses"]) + 1)
        ax.plot(steps, h["step_losses"], color="tab:blue", alpha=0.25, linewidth=0.8,
                label="training loss (each step)")
    ax.plot(h["steps"], h["train_losses"], "o-", color="tab:blue", markersize=3, label="training loss")
    ax.plot(h["steps"], h["val_losses"], "o--", color="tab:orange", markersize=3, label="validation loss")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("loss (cross-entropy)")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    if h["steps"] and h["steps"][-1] > 0 and h["tokens_seen"][-1] > 0:
        # Every step sees the same number of tokens, so tokens = steps * tokens_per_step.
        tokens_per_step = h["tokens_seen"][-1] / h["steps"][-1]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step,
                                                   lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    return _save(fig, path)


def plot_lr(history: Any, path: str | os.PathLike | None = None) -> Figure:
    """The learning rate of every optimizer step; saved as a PNG at ``path`` if given."""
    lrs = _as_dict(history)["lrs"]
    fig = PlotFigure(figsize=(7, 3), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(1, len(lrs) + 1), lrs, color="tab:green")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    return _save(fig, path)
