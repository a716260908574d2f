"""Where a run's records go besides ``metrics.jsonl``: TensorBoard, written as the records come."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .setup import RunError

__all__ = ["TensorBoard"]


class TensorBoard:
    """Writes each record of ``metrics.jsonl`` to a TensorBoard event file in ``folder``.

    A split record becomes the scalars ``<split>/loss`` and ``<split>/accuracy`` (and ``train/lr``)
    at its ``step``; a phase event becomes a text entry tagged ``phase``; other events are skipped.

    Raises:
        RunError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RunError('train.loggers: tensorboard needs the tensorboard package: '
                           'pip install "freezekit[tensorboard]"') from err
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if record.get("event") == "phase":
            self.writer.add_text("phase", f"phase {record['phase']}: {record.get('changes')}", global_step=step)
        elif "event" not in record and "split" in record:
            split = record["split"]
            self.writer.add_scalar(f"{split}/loss", record["loss"], global_step=step)
            self.writer.add_scalar(f"{split}/accuracy", record["accuracy"], global_step=step)
            if split == "train" and "lr" in record:
                self.writer.add_scalar("train/lr", record["lr"], global_step=step)

    def close(self) -> None:
        self.writer.close()
