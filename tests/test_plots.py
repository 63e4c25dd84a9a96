"""Plots: every figure is a valid PNG written atomically, in one shared style."""

import struct

import pytest
from matplotlib.colors import to_rgba

from minigpt.training import plots
from minigpt.training.plots import PlotFigure, plot_accuracy, plot_losses, plot_lr, plot_preference

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY = {
    "steps": [0, 5, 10], "train_losses": [10.9, 7.2, 5.8], "val_losses": [10.9, 7.5, 6.4],
    "tokens_seen": [0, 2560, 5120], "step_losses": [10.9, 9.8, 9.0, 8.1, 7.6, 7.2, 6.9, 6.5, 6.2, 6.0],
    "lrs": [1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 3.5e-4, 3e-4, 2e-4, 1e-4, 5e-5],
}
BEFORE = {"train": 0.46, "val": 0.45, "test": 0.48}
AFTER = {"train": 0.97, "val": 0.95, "test": 0.93}


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG's header chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def draw_all(folder) -> dict[str, object]:
    return {
        "loss.png": plot_losses(HISTORY, folder / "loss.png"),
        "lr.png": plot_lr(HISTORY, folder / "lr.png"),
        "accuracy.png": plot_accuracy(BEFORE, AFTER, folder / "accuracy.png"),
    }


def test_every_plot_writes_a_png_and_leaves_no_temporary_file(tmp_path):
    draw_all(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["accuracy.png", "loss.png", "lr.png"]
    # Height in inches times the resolution: 4, 3 and 3.5 inches at 120 dots per inch.
    assert png_size(tmp_path / "run" / "loss.png") == (840, 480)
    assert png_size(tmp_path / "run" / "lr.png") == (840, 360)
    assert png_size(tmp_path / "run" / "accuracy.png") == (840, 420)


def test_figures_share_one_style(tmp_path):
    figures = draw_all(tmp_path)
    for name, fig in figures.items():
        assert isinstance(fig, PlotFigure), name
        assert fig.get_figwidth() == plots.WIDTH, name
        assert png_size(tmp_path / name)[0] == plots.WIDTH * plots.DPI, name
        ax = fig.axes[0]
        assert ax.xaxis.get_gridlines()[0].get_visible(), name  # every figure has the light grid
        assert fig._repr_png_()[:8] == PNG_SIGNATURE  # a notebook can show it
    # One colour means "training" (or "after training") in every figure.
    loss_ax, accuracy_ax = figures["loss.png"].axes[0], figures["accuracy.png"].axes[0]
    train_line = next(line for line in loss_ax.get_lines() if line.get_label() == "training loss")
    assert train_line.get_color() == plots.TRAIN_COLOR
    after_bars = next(c for c in accuracy_ax.containers if c.get_label() == "after")
    assert after_bars.patches[0].get_facecolor() == pytest.approx(to_rgba(plots.TRAIN_COLOR))


def test_without_a_path_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isinstance(plot_losses(HISTORY), PlotFigure)
    assert isinstance(plot_accuracy(BEFORE, AFTER), PlotFigure)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_previous_png(tmp_path, monkeypatch):
    path = tmp_path / "loss.png"
    plot_losses(HISTORY, path)
    before = path.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE)  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(PlotFigure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="No space left"):
        plot_losses(HISTORY, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_loss_plot_shows_both_curves_and_the_tokens_axis():
    fig = plot_losses(HISTORY)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["training loss (each step)", "training loss", "validation loss"]
    assert list(ax.get_lines()[2].get_ydata()) == HISTORY["val_losses"]
    assert [child.get_xlabel() for child in ax.child_axes] == ["tokens seen"]  # the second x-axis, on top


def test_accuracy_plot_pairs_the_bars_and_labels_the_value_after():
    ax = plot_accuracy({"train": 0.5}, AFTER).axes[0]
    before_bars, after_bars = (next(c for c in ax.containers if c.get_label() == name) for name in ("before", "after"))
    # A split missing from ``before`` shows as 0.
    assert [bar.get_height() for bar in before_bars.patches] == [0.5, 0.0, 0.0]
    assert [bar.get_height() for bar in after_bars.patches] == [0.97, 0.95, 0.93]
    assert [t.get_text() for t in ax.texts] == ["97.0%", "95.0%", "93.0%"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["train", "val", "test"]
    assert ax.get_ylim() == (0, 1.1)


PREFERENCE_HISTORY = {
    **HISTORY, "train_losses": [0.693, 0.61, 0.52], "val_losses": [0.693, 0.65, 0.60],
    "metrics": {"train/rewards/margins": [0.0, 0.2, 0.5], "val/rewards/margins": [0.0, 0.1, 0.3],
                "train/rewards/accuracies": [0.0, 0.6, 0.8], "val/rewards/accuracies": [0.0, 0.55, 0.75],
                "train/rewards/chosen": [0.0, 0.1, 0.2]},
}


def test_preference_plot_shows_loss_margin_and_accuracy_for_both_splits(tmp_path):
    fig = plot_preference(PREFERENCE_HISTORY, tmp_path / "preference.png")
    assert png_size(tmp_path / "preference.png") == (840, 840)  # three panels, 7 inches high
    assert isinstance(fig, PlotFigure) and fig.get_figwidth() == plots.WIDTH
    loss_ax, margin_ax, accuracy_ax = fig.axes
    metrics = PREFERENCE_HISTORY["metrics"]
    for ax, train, val in ((loss_ax, PREFERENCE_HISTORY["train_losses"], PREFERENCE_HISTORY["val_losses"]),
                           (margin_ax, metrics["train/rewards/margins"], metrics["val/rewards/margins"]),
                           (accuracy_ax, metrics["train/rewards/accuracies"], metrics["val/rewards/accuracies"])):
        train_line, val_line = (line for line in ax.get_lines() if line.get_label() in ("training", "validation"))
        assert (train_line.get_label(), list(train_line.get_ydata())) == ("training", train)
        assert (val_line.get_label(), list(val_line.get_ydata())) == ("validation", val)
        assert list(train_line.get_xdata()) == PREFERENCE_HISTORY["steps"]
        assert train_line.get_color() == plots.TRAIN_COLOR and val_line.get_color() == plots.VAL_COLOR
        assert ax.xaxis.get_gridlines()[0].get_visible()
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "reward margin", "reward accuracy"]
    assert accuracy_ax.get_ylim() == (-0.05, 1.05) and accuracy_ax.get_xlabel() == "optimizer steps"
    with pytest.raises(ValueError, match="has no val/rewards/margins, val/rewards/accuracies"):
        plot_preference({**PREFERENCE_HISTORY, "metrics": {k: v for k, v in metrics.items() if k.startswith("train")}})
    with pytest.raises(ValueError, match="preference loss"):
        plot_preference(HISTORY)
