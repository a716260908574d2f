"""The class names of a recipe's data, known without reading an image: the built-in ``shapes``
classes and an image folder's (its subfolders). The recipe check and the runner's data both use them.

Example:
    >>> from freezekit.labels import SHAPES
    >>> SHAPES
    ['circle', 'square', 'triangle']
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SHAPES", "classes_in"]

SHAPES = ["circle", "square", "triangle"]


def classes_in(folder: Path) -> list[str]:
    """The class names of an image folder: its subfolders, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
