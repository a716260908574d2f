"""The class names of a recipe's data, known without reading an image: the built-in ``shapes``
classes, an image folder's (its subfolders) and CIFAR's (its ``meta`` file). The recipe check and
the runner's data both use them.

Example:
    >>> from freezekit.labels import SHAPES
    >>> SHAPES
    ['circle', 'square', 'triangle']
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["CIFAR", "SHAPES", "cifar_classes", "cifar_folder", "classes_in", "unpickle"]

SHAPES = ["circle", "square", "triangle"]


def classes_in(folder: Path) -> list[str]:
    """The class names of an image folder: its subfolders, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class _NumpyOnly(pickle.Unpickler):
    """CIFAR's batches are pickles of numpy arrays: nothing else is let in (a pickle can run code)."""

    ALLOWED: ClassVar = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # bytes, as protocol 2 spells them

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch or meta file, as a dict with str keys."""
    with open(path, "rb") as f:
        data = _NumpyOnly(f, encoding="latin1").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


CIFAR = {  # kind: (folder, training files, validation file, meta file, labels key, names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def cifar_folder(kind: str, root: Path) -> Path:
    """The folder holding CIFAR's batches: ``root`` itself, or the folder torchvision unpacks below it."""
    inner = root / CIFAR[kind][0]
    return inner if inner.is_dir() else root


def cifar_classes(kind: str, root: Path) -> list[str]:
    """CIFAR-10's or CIFAR-100's class names, from the ``meta`` file below ``root``."""
    _, _, _, meta, _, names_key = CIFAR[kind]
    return list(unpickle(cifar_folder(kind, root) / meta)[names_key])
