"""The recipes that come with freezekit (``recipes/`` in the source tree, ``freezekit/recipes`` when
installed): each runs as-is on the CPU with the built-in data."""

from __future__ import annotations

from pathlib import Path

__all__ = ["bundled", "folder"]


def folder() -> Path:
    return Path(__file__).resolve().parents[1] / "recipes"


def bundled() -> list[tuple[Path, str]]:
    """``(path, one-line description)`` of each bundled recipe, by name."""
    out = []
    for path in sorted(folder().glob("*.yaml")):
        comments = [line[1:].strip() for line in path.read_text().splitlines()[:3] if line.startswith("#")]
        out.append((path, comments[1] if len(comments) > 1 else ""))
    return out
