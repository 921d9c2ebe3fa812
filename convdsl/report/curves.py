"""Loss and accuracy curves of a training run, drawn with matplotlib into a PNG.

matplotlib is optional (`pip install "convdsl[plot]"`); without it training
still runs and writes its metrics, and `convdsl plot RUN` can draw them later.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convdsl.errors import RunError
from convdsl.runtime.checkpoint import write_atomically


class PlotUnavailable(RunError):
    """matplotlib is not installed."""


def draw(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Two panels, loss and accuracy per epoch, training and validation."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window or need a display
        from matplotlib import pyplot
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed, so no curves were drawn",
                              'pip install "convdsl[plot]"') from None
    epochs = [row["epoch"] for row in rows]
    figure, (loss_axes, accuracy_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    for axes, key, label in ((loss_axes, "loss", "loss"),
                             (accuracy_axes, "accuracy", "accuracy")):
        axes.plot(epochs, [row[key] for row in rows], marker=".", label="training")
        validation = [(row["epoch"], row[f"val_{key}"]) for row in rows
                      if row.get(f"val_{key}") is not None]
        if validation:
            axes.plot(*zip(*validation), marker=".", label="validation")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    loss_axes.set_yscale("log" if all(row["loss"] > 0 for row in rows) else "linear")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    try:
        write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    finally:
        pyplot.close(figure)
