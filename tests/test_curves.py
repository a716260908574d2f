"""The run's pictures: curves.png drawn from metrics.jsonl, and the TensorBoard logger."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from freezekit.train.curves import curves_figure, write_curves
from freezekit.train.loggers import TensorBoard
from freezekit.train.setup import RunError


def _records() -> list[dict]:
    """Three epochs with a phase change at the start of epoch 1 and a sync check to ignore."""
    out = []
    lrs = [1e-2, 1e-3, 1e-4]
    for epoch in range(3):
        step = 10 * (epoch + 1)
        if epoch == 1:
            out.append({"epoch": 1, "step": 10, "event": "phase", "phase": "unfreeze-head", "changes": {}, "added": 2})
            out.append({"epoch": 1, "step": 10, "event": "sync_check", "after": "phase 1"})
        out.append({"epoch": epoch, "split": "train", "loss": 1.0 - 0.2 * epoch, "accuracy": 0.5 + 0.1 * epoch,
                    "step": step, "lr": lrs[epoch], "seconds": 1.5, "cached_features": False})
        out.append({"epoch": epoch, "split": "val", "loss": 1.1 - 0.25 * epoch, "accuracy": 0.4 + 0.15 * epoch,
                    "step": step, "lr": lrs[epoch], "seconds": 0.5, "cached_features": False})
    return out


def _write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_the_figure_plots_the_records():
    records = _records()
    fig = curves_figure(records)
    loss_ax, acc_ax, lr_ax = fig.axes
    assert (loss_ax.get_title(), acc_ax.get_title()) == ("loss", "accuracy")
    for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        lines = _lines_by_label(ax)
        assert set(lines) == {"train", "val"}
        for split, line in lines.items():
            rows = [r for r in records if r.get("split") == split]
            assert list(line.get_xdata()) == [1, 2, 3]  # 1-based epochs
            assert list(line.get_ydata()) == pytest.approx([r[key] for r in rows])
        assert ax.get_xlabel() == "epoch"
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_xdata()) == [1, 2, 3]
    assert list(lr_line.get_ydata()) == pytest.approx([1e-2, 1e-3, 1e-4])
    assert lr_ax.get_yscale() == "log"  # spans 100x


def test_a_phase_change_is_a_dashed_line_at_its_epoch_with_its_name():
    fig = curves_figure(_records())
    for ax in fig.axes[:2]:
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1  # the sync_check event draws nothing
        assert list(dashed[0].get_xdata()) == [2, 2]  # recorded at epoch 1 -> drawn at 1-based epoch 2
        assert [t.get_text() for t in ax.texts] == ["unfreeze-head"]


def test_the_lr_axis_stays_linear_when_the_rate_barely_moves():
    records = [{"epoch": e, "split": "train", "loss": 1.0, "accuracy": 0.5, "step": e, "lr": lr}
               for e, lr in enumerate([0.1, 0.05, 0.02])]
    assert curves_figure(records).axes[2].get_yscale() == "linear"


def test_the_epoch_ticks_are_integers():
    for ax in curves_figure(_records()).axes[:2]:
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_write_curves_writes_a_real_png(tmp_path):
    metrics = _write_metrics(tmp_path / "metrics.jsonl", _records())
    out = tmp_path / "curves.png"
    write_curves(metrics, out)
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 400)  # 10 x 4 inches at 100 dpi
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert len(colours) > 10  # lines, text and background, not a blank page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temp file left


def test_write_curves_replaces_an_old_picture_and_handles_one_epoch_without_phases(tmp_path):
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    one = [r for r in _records() if r.get("epoch") == 0]
    write_curves(_write_metrics(tmp_path / "metrics.jsonl", one), out)
    with Image.open(out) as image:
        assert image.size == (1000, 400)
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 10
    fig = curves_figure(one)
    assert [list(line.get_xdata()) for line in fig.axes[0].get_lines()] == [[1], [1]]
    assert not any(ax.texts for ax in fig.axes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_tensorboard_holds_the_scalars_at_their_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoard(tmp_path / "tb")
    for record in _records():
        logger.write(record)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/accuracy", "train/loss", "train/lr", "val/accuracy",
                                                "val/loss"]

    def read(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert read("train/loss") == [(10, pytest.approx(1.0)), (20, pytest.approx(0.8)), (30, pytest.approx(0.6))]
    assert read("val/accuracy") == [(10, pytest.approx(0.4)), (20, pytest.approx(0.55)), (30, pytest.approx(0.7))]
    assert read("train/lr") == [(10, pytest.approx(1e-2)), (20, pytest.approx(1e-3)), (30, pytest.approx(1e-4))]
    (phase,) = events.Tensors("phase/text_summary")  # the sync_check event is not logged
    assert (phase.step, phase.tensor_proto.string_val) == (10, [b"phase unfreeze-head: {}"])


def test_tensorboard_without_its_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(RunError) as info:
        TensorBoard(tmp_path / "tb")
    assert str(info.value) == ('train.loggers: tensorboard needs the tensorboard package: '
                               'pip install "freezekit[tensorboard]"')
    assert not (tmp_path / "tb").exists()
