"""Plots of a training run: the loss curves, the learning-rate schedule, and accuracy.

The one idea: read the two loss curves together. Both falling means the model is
learning; training loss falling while validation loss rises means it is memorising
the training text (overfitting).

Every figure has one style (:func:`new_figure`: the same width, grid and PNG
resolution) and is saved one way (:func:`save_figure`: atomically, so a crash never leaves
half a PNG). The figures are built with matplotlib's object-oriented API on its Agg
(PNG) canvas, without pyplot: nothing depends on a display or on global plotting
state, so this works the same in a script, a test or a server; a notebook shows the
returned figure.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minigpt.io.files import atomic_write

WIDTH = 7.0  # inches; every figure has this width, so figures line up in a report
DPI = 120  # saved PNGs are WIDTH * DPI = 840 pixels wide
TRAIN_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"
LR_COLOR = "tab:green"
BEFORE_COLOR = "tab:gray"


class PlotFigure(Figure):
    """A matplotlib ``Figure`` that shows itself as a PNG when a notebook displays it
    (a figure made without pyplot is not known to the notebook's plotting backend)."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()


def new_figure(height: float) -> tuple[PlotFigure, Axes]:
    """The one figure style: a :class:`PlotFigure` of width ``WIDTH`` on a PNG canvas,
    with one set of axes and a light grid."""
    fig = PlotFigure(figsize=(WIDTH, height), layout="constrained")
    FigureCanvasAgg(fig)  # gives the figure a PNG canvas
    ax = fig.add_subplot()
    ax.grid(alpha=0.3)
    return fig, ax


def save_figure(fig: Figure, path: str | os.PathLike | None) -> Figure:
    """Write ``fig`` as a PNG at ``path`` (atomically) if a path is given; return it."""
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return fig


def _as_dict(history: Any) -> Mapping[str, list]:
    """A :class:`minigpt.training.loop.History` or its ``to_dict()``."""
    return history.to_dict() if hasattr(history, "to_dict") else history


def plot_losses(history: Any, path: str | os.PathLike | None = None) -> Figure:
    """Training and validation loss against optimizer steps, with the number of training
    tokens seen on a second x-axis at the top; saved as a PNG at ``path`` if given."""
    h = _as_dict(history)
    fig, ax = new_figure(height=4)
    if h.get("step_losses"):
        steps = range(1, len(h["step_losses"]) + 1)
        ax.plot(steps, h["step_losses"], color=TRAIN_COLOR, alpha=0.25, linewidth=0.8,
                label="training loss (each step)")
    ax.plot(h["steps"], h["train_losses"], "o-", color=TRAIN_COLOR, markersize=3, label="training loss")
    ax.plot(h["steps"], h["val_losses"], "o--", color=VAL_COLOR, markersize=3, label="validation loss")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("loss (cross-entropy)")
    ax.legend(loc="upper right")
    if h["steps"] and h["steps"][-1] > 0 and h["tokens_seen"][-1] > 0:
        # Every step sees the same number of tokens, so tokens = steps * tokens_per_step.
        tokens_per_step = h["tokens_seen"][-1] / h["steps"][-1]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step,
                                                   lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    return save_figure(fig, path)


def plot_lr(history: Any, path: str | os.PathLike | None = None) -> Figure:
    """The learning rate of every optimizer step; saved as a PNG at ``path`` if given."""
    lrs = _as_dict(history)["lrs"]
    fig, ax = new_figure(height=3)
    ax.plot(range(1, len(lrs) + 1), lrs, color=LR_COLOR)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return save_figure(fig, path)


def plot_accuracy(
    before: Mapping[str, float], after: Mapping[str, float], path: str | os.PathLike | None = None
) -> Figure:
    """Accuracy of each split (``{"train": 0.93, ...}``) before and after fine-tuning, as
    pairs of bars, the value after written above its bar; a PNG at ``path`` if given.
    A split missing from ``before`` shows as 0."""
    splits = list(after)
    x = range(len(splits))
    fig, ax = new_figure(height=3.5)
    ax.bar([i - 0.2 for i in x], [before.get(s, 0.0) for s in splits], width=0.4, label="before",
           color=BEFORE_COLOR)
    ax.bar([i + 0.2 for i in x], [after[s] for s in splits], width=0.4, label="after", color=TRAIN_COLOR)
    for i, split in enumerate(splits):
        ax.annotate(f"{after[split]:.1%}", (i + 0.2, after[split]), ha="center", va="bottom")
    ax.set_xticks(list(x), splits)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    # Bars reach the top of the axes, so the legend sits above them, outside the axes.
    fig.legend(loc="outside upper center", ncols=2, title="fine-tuning")
    return save_figure(fig, path)


def plot_metrics(history: Any, labels: Mapping[str, str], path: str | os.PathLike | None = None, *,
                 recorded_by: str = "a loss that returns them") -> Figure:
    """The loss and each metric of ``labels`` (``{"rewards/margins": "reward margin"}``), training
    and validation against optimizer steps, one panel each (the loss on top, the steps below the
    last). Needs a history whose ``metrics`` hold ``train/<name>`` and ``val/<name>`` for every
    name (``recorded_by`` says in the error what records them); a PNG at ``path`` if given."""
    h = _as_dict(history)
    metrics = h.get("metrics") or {}
    missing = [f"{split}/{name}" for split in ("train", "val") for name in labels if not metrics.get(f"{split}/{name}")]
    if missing:
        raise ValueError(f"the history has no {', '.join(missing)}: was it recorded by train_model with "
                         f"{recorded_by}?")
    fig, loss_ax = new_figure(height=7 / 3 * (1 + len(labels)))
    grid = fig.add_gridspec(1 + len(labels), 1)
    loss_ax.set_subplotspec(grid[0])
    panels = [(loss_ax, h["train_losses"], h["val_losses"], "loss")]
    for row, (name, label) in enumerate(labels.items(), start=1):
        ax = fig.add_subplot(grid[row], sharex=loss_ax)
        ax.grid(alpha=0.3)
        panels.append((ax, metrics[f"train/{name}"], metrics[f"val/{name}"], label))
    for ax, train, val, label in panels:
        ax.plot(h["steps"], train, "o-", color=TRAIN_COLOR, markersize=3, label="training")
        ax.plot(h["steps"], val, "o--", color=VAL_COLOR, markersize=3, label="validation")
        ax.set_ylabel(label)
    panels[-1][0].set_xlabel("optimizer steps")
    loss_ax.legend(loc="upper right")
    return save_figure(fig, path)


def plot_preference(history: Any, path: str | os.PathLike | None = None) -> Figure:
    """Preference tuning (:mod:`minigpt.finetuning.dpo`) at a glance, training and validation against
    optimizer steps in three panels: the loss, the reward margin (chosen minus rejected)
    and the reward accuracy (the share of pairs ranked right). Read them together: the
    margin and accuracy rising on validation pairs mean the preference generalises.
    Needs a history whose ``metrics`` hold ``rewards/margins`` and ``rewards/accuracies``;
    saved as a PNG at ``path`` if given."""
    return _plot_scores(history, path, "rewards/margins", "rewards/accuracies",
                        "a preference loss (minigpt.finetuning.dpo.DPOLoss)")


def plot_reward_model(history: Any, path: str | os.PathLike | None = None) -> Figure:
    """A reward model's training (:mod:`minigpt.finetuning.reward`), as :func:`plot_preference`: the loss,
    the score margin (chosen minus rejected) and the accuracy (pairs ranked right), training
    and validation. Needs a history whose ``metrics`` hold ``margin`` and ``accuracy``."""
    return _plot_scores(history, path, "margin", "accuracy", "the reward model's loss (minigpt.finetuning.reward)")


def _plot_scores(history: Any, path: str | os.PathLike | None, margin: str, accuracy: str,
                 recorded_by: str) -> Figure:
    """:func:`plot_metrics` of a margin and an accuracy, with the margin's zero line drawn."""
    fig = plot_metrics(history, {margin: "reward margin", accuracy: "reward accuracy"}, recorded_by=recorded_by)
    _, margin_ax, accuracy_ax = fig.axes
    margin_ax.axhline(0.0, color=BEFORE_COLOR, linewidth=0.8)  # above zero: chosen answers gain
    accuracy_ax.set_ylim(-0.05, 1.05)
    return save_figure(fig, path)


def plot_ppo(logs: Mapping[str, list[float]], path: str | os.PathLike | None = None) -> Figure:
    """PPO per update (:mod:`minigpt.finetuning.ppo`), in three panels: the reward model's mean score and
    the total RLHF reward (score minus the KL penalty), the KL to the reference (summed over an
    answer's tokens), and the policy and value losses. The score should climb while the KL stays
    bounded: a score bought with a runaway KL is the reward model being gamed. ``logs`` maps
    TRL's names (``objective/scores``, ``objective/kl``, ...) to one value per update."""
    needed = ("objective/scores", "objective/rlhf_reward", "objective/kl", "loss/policy_avg", "loss/value_avg")
    missing = [name for name in needed if not logs.get(name)]
    if missing:
        raise ValueError(f"the PPO logs have no {', '.join(missing)}: were they written by minigpt.jobs.ppo?")
    updates = range(1, len(logs["objective/scores"]) + 1)
    fig, score_ax = new_figure(height=7)
    grid = fig.add_gridspec(3, 1)
    score_ax.set_subplotspec(grid[0])
    kl_ax, loss_ax = (fig.add_subplot(grid[row], sharex=score_ax) for row in (1, 2))
    score_ax.plot(updates, logs["objective/scores"], "o-", color=TRAIN_COLOR, markersize=3, label="score")
    score_ax.plot(updates, logs["objective/rlhf_reward"], "o--", color=VAL_COLOR, markersize=3,
                  label="score - KL penalty")
    score_ax.set_ylabel("reward")
    score_ax.legend(loc="lower right")
    kl_ax.plot(updates, logs["objective/kl"], "o-", color=LR_COLOR, markersize=3)
    kl_ax.set_ylabel("KL to reference")
    loss_ax.plot(updates, logs["loss/policy_avg"], "o-", color=TRAIN_COLOR, markersize=3, label="policy")
    loss_ax.plot(updates, logs["loss/value_avg"], "o--", color=VAL_COLOR, markersize=3, label="value")
    loss_ax.set_ylabel("loss")
    loss_ax.set_xlabel("PPO updates (one rollout each)")
    loss_ax.legend(loc="upper right")
    for ax in (kl_ax, loss_ax):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
