"""A run's learning curves as one PNG: loss and accuracy per epoch (train and val), the learning rate
beside the loss, and a dashed line where each phase begins. Drawn from ``metrics.jsonl`` as it is.

Epochs are shown 1-based: the records' epoch ``e`` is drawn at ``e + 1``, and so is a phase change
recorded at epoch ``e`` — its line stands at the first epoch trained under the new phase.

matplotlib is imported inside the functions (``import freezekit`` does not pay for it) and used
through ``Figure`` and the Agg canvas, never pyplot: no global state, no GUI backend.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["curves_figure", "write_curves"]

COLOURS = {"train": "C0", "val": "C1"}
MUTED = "0.6"  # the learning rate and the phase lines stay behind the curves


def curves_figure(records: list[dict[str, Any]]) -> Figure:
    """Loss (with the learning rate on a second axis) and accuracy per epoch, side by side.

    ``records`` are the objects of ``metrics.jsonl``: per-epoch split records, phase events, and
    other events, which are ignored.

    Example:
        >>> fig = curves_figure([{"epoch": 0, "split": "train", "loss": 0.7, "accuracy": 0.5, "lr": 0.1}])
        >>> [ax.get_title() for ax in fig.axes[:2]]
        ['loss', 'accuracy']
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [r for r in records if "event" not in r and "split" in r]
    for split in ("train", "val"):
        rows = [r for r in epochs if r["split"] == split]
        x = [r["epoch"] + 1 for r in rows]
        loss_ax.plot(x, [r["loss"] for r in rows], marker="o", color=COLOURS[split], label=split)
        acc_ax.plot(x, [r["accuracy"] for r in rows], marker="o", color=COLOURS[split], label=split)

    lr_rows = [r for r in epochs if r["split"] == "train" and "lr" in r]
    lr_ax = loss_ax.twinx()
    lr_ax.plot([r["epoch"] + 1 for r in lr_rows], [r["lr"] for r in lr_rows], color=MUTED, linewidth=1,
               label="lr")
    lrs = [r["lr"] for r in lr_rows]
    if lrs and min(lrs) > 0 and max(lrs) > 10 * min(lrs):
        lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate", color=MUTED)
    lr_ax.tick_params(axis="y", colors=MUTED)
    loss_ax.set_zorder(lr_ax.get_zorder() + 1)  # the curves over the learning rate, not under it
    loss_ax.patch.set_visible(False)

    for r in records:
        if r.get("event") == "phase":
            for ax in (loss_ax, acc_ax):
                ax.axvline(r["epoch"] + 1, color=MUTED, linestyle="--", linewidth=1)
                ax.annotate(str(r["phase"]), (r["epoch"] + 1, 1), xycoords=("data", "axes fraction"),
                            xytext=(2, -2), textcoords="offset points", va="top", fontsize=7, color="0.4")

    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize=8)
    return fig


def write_curves(metrics: Path, out: Path) -> None:
    """Draw the run's ``metrics.jsonl`` to the PNG ``out``, replacing it whole (a temporary file in
    the same folder, then ``os.replace``): a reader never sees half a picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    fig = curves_figure(records)
    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            FigureCanvasAgg(fig).print_png(f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
