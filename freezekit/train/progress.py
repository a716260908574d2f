"""What a run shows while it trains: rich progress bars on a terminal, a plain line per epoch when
the output is piped or logged, nothing but errors with ``quiet``."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["Reporter"]


class Reporter:
    def __init__(self, quiet: bool = False, enabled: bool = True):
        self.quiet = quiet or not enabled
        self.console = Console(file=sys.stdout)
        self.live = self.console.is_terminal and not self.quiet
        self._progress: Progress | None = None
        self._task: Any = None

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False) if self.live else print(text, flush=True)

    def start_epoch(self, epoch: int, epochs: int, steps: int, cached: bool) -> None:
        if not self.live:
            return
        self._progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}" + (" (cached features)" if cached else "")),
                                  BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                  TimeElapsedColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, stats="")

    def step(self, loss: float, accuracy: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, stats=f"loss {loss:.4f} acc {accuracy:.1%}")

    def end_epoch(self, line: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.say(line)
