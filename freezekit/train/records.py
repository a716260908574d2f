"""What a run writes as it goes, besides checkpoints: ``metrics.jsonl`` (one JSON object per
line, and the same to TensorBoard when asked), ``summary.md`` (the frozen layers of each phase)
and ``curves.png``. Only the main process writes. A resumed run first drops what the killed one
recorded after its last checkpoint, then records it again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..summary_table import summary
from .curves import write_curves
from .loggers import TensorBoard

__all__ = ["Records"]


class Records:
    def __init__(self, out: Path, main: bool, loggers: list[str]):
        self.out, self.main = out, main
        self.tensorboard = TensorBoard(out / "tensorboard") if main and "tensorboard" in loggers else None

    def add(self, item: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(item) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(item)

    def summary(self, title: str, model: nn.Module, epoch: int, step: int) -> None:
        if self.main:
            with open(self.out / "summary.md", "a") as f:
                f.write(f"## {title}, from epoch {epoch} step {step}\n\n{summary(model).to_markdown()}\n\n")

    def curves(self) -> None:
        if self.main:
            write_curves(self.out / "metrics.jsonl", self.out / "curves.png")

    def trim(self, epoch: int, step: int) -> None:
        """Drop what was recorded at or after (``epoch``, ``step``): lines of ``metrics.jsonl``,
        sections of ``summary.md``."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and _before(json.loads(line), epoch, step)]
            path.write_text("".join(line + "\n" for line in kept))
        path = self.out / "summary.md"
        if path.exists():
            sections = re.split(r"(?m)^(?=## )", path.read_text())  # each "## TITLE, from epoch E step S"
            path.write_text("".join(s for s in sections
                                    if not (head := re.match(r"## .*, from epoch (\d+) step (\d+)$", s, re.M))
                                    or (int(head[1]), int(head[2])) < (epoch, step)))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _before(item: dict[str, Any], epoch: int, step: int) -> bool:
    return (item.get("epoch", 0), item.get("step", 0)) < (epoch, step)
