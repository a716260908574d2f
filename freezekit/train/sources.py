"""Where a run's images come from, one dataset per split, read lazily: the built-in ``shapes``
(drawn in memory), an image folder (paths only; each image is decoded when a batch needs it),
and CIFAR-10/100's python batches from a local folder (never downloaded).

Each dataset is indexed by a *key*, ``(index, seed)``: the sampler (:mod:`freezekit.train.loader`)
draws the keys, and ``seed`` -- drawn from (run seed, epoch, index) -- drives the random
augmentation of that one image, so what an image becomes depends on neither the worker that
decodes it, nor the batch it lands in, nor whether the run was resumed. A sample is
``(image, label, index)``; an image that cannot be read comes back as :class:`Unreadable`, so
the main process reports it by path instead of a worker's traceback.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..labels import CIFAR, cifar_classes, cifar_folder, classes_in, unpickle

__all__ = ["IMAGE_SUFFIXES", "Files", "Pixels", "Unreadable", "changes", "cifar", "drawn_from", "fingerprint",
           "image_folder", "samples_of"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
Key = tuple[int, int]  # (index, augmentation seed)


@dataclass(frozen=True)
class Unreadable:
    """An image that could not be read: where it is and why."""

    path: str
    reason: str


@contextmanager
def drawn_from(seed: int) -> Iterator[None]:
    """Run the block with torch's (CPU), numpy's and Python's global generators seeded by ``seed``
    (timm's and torchvision's transforms draw from all three), and put them back after it."""
    python, legacy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it seeds every accelerator too, 3x slower
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(legacy)
        torch.set_rng_state(cpu)


class Pixels(Dataset):
    """Images held in memory as uint8: ``shapes`` (a N x 3 x S x S tensor, normalized later, on the
    device, a batch at a time) or CIFAR (N x H x W x 3, through ``transform`` like a file's image).
    With ``shift`` and no transform, training draws a crop of the image padded by ``shift`` pixels,
    and a horizontal flip. ``augmented``: the transform draws random numbers, seeded per image from
    its key (a deterministic one is left unseeded: seeding costs a fifth of decoding an image)."""

    def __init__(self, images: torch.Tensor | np.ndarray, labels: list[int], transform: Callable | None = None,
                 shift: int = 0, augmented: bool = False):
        self.images, self.labels, self.transform, self.shift = images, labels, transform, shift
        self.augmented = augmented

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, int]:
        index, seed = key
        image = self.images[index]
        if self.transform is not None:
            from PIL import Image

            with drawn_from(seed) if self.augmented else nullcontext():
                image = self.transform(Image.fromarray(image))
        elif self.shift:
            image = _shift_and_flip(image, self.shift, torch.Generator().manual_seed(seed))
        return image, self.labels[index], index


def _shift_and_flip(image: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    _, h, w = image.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    padded = F.pad(image[None].float(), (pad, pad, pad, pad), mode="reflect")[0].to(image.dtype)
    out = padded[:, dy: dy + h, dx: dx + w]
    return out.flip(-1) if torch.rand((), generator=generator) < 0.5 else out


class Files(Dataset):
    """Image files, decoded and transformed one at a time (in the loader's workers); ``augmented`` as
    for :class:`Pixels`."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, augmented: bool = False):
        self.paths = [path for path, _ in samples]
        self.labels = [label for _, label in samples]
        self.transform, self.augmented = transform, augmented

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, int] | Unreadable:
        from PIL import Image

        index, seed = key
        path = self.paths[index]
        try:
            with Image.open(path) as img, drawn_from(seed) if self.augmented else nullcontext():
                return self.transform(img.convert("RGB")), self.labels[index], index
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what PIL raises for a
            # missing, truncated, bad or absurdly large file
            return Unreadable(path, f"{type(e).__name__}: {e}")


def samples_of(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """Every image below each class folder, in a fixed order (class, then path)."""
    return [(str(file), label) for label, name in enumerate(classes)
            for file in sorted((folder / name).rglob("*")) if file.suffix.lower() in IMAGE_SUFFIXES]


def image_folder(root: Path, val_fraction: float, seed: int) -> tuple[list, list, list[str]]:
    """``ROOT/train/CLASS/*`` and ``ROOT/val/CLASS/*``; or, without those, ``ROOT/CLASS/*`` with
    ``val_fraction`` of each class held out for validation, drawn from ``seed``. Returns the
    (path, label) samples of each split and the class names."""
    if (root / "train").is_dir():
        classes = classes_in(root / "train")
        return samples_of(root / "train", classes), samples_of(root / "val", classes), classes
    classes = classes_in(root)
    train, val = [], []
    generator = torch.Generator().manual_seed(seed)
    for label in range(len(classes)):
        mine = samples_of(root, classes[label: label + 1])
        order = torch.randperm(len(mine), generator=generator).tolist()
        held = round(len(mine) * val_fraction)
        val += [(mine[i][0], label) for i in sorted(order[:held])]
        train += [(mine[i][0], label) for i in sorted(order[held:])]
    return train, val, classes


def cifar(kind: str, root: Path) -> tuple[tuple[np.ndarray, list[int]], tuple[np.ndarray, list[int]], list[str]]:
    """CIFAR-10/100's python batches below ``root`` (as torchvision lays them out): the train and
    test images (N x 32 x 32 x 3 uint8) with their labels, and the class names."""
    _, train_files, val_file, _, labels_key, _ = CIFAR[kind]
    base = cifar_folder(kind, root)

    def read(files: list[str]) -> tuple[np.ndarray, list[int]]:
        parts = [unpickle(base / f) for f in files]
        images = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), [int(y) for p in parts for y in p[labels_key]]

    return read(train_files), read([val_file]), cifar_classes(kind, root)


def fingerprint(train: Files | Pixels, val: Files | Pixels, classes: list[str]) -> dict[str, Any]:
    """What a run reads, enough to tell later that it changed: the classes, and each split's count
    and digest of its files and labels (of its labels alone for arrays, which the recipe names)."""
    def split(dataset: Files | Pixels) -> dict[str, Any]:
        listed = json.dumps([getattr(dataset, "paths", None), dataset.labels]).encode()
        return {"images": len(dataset), "sha256": hashlib.sha256(listed).hexdigest()}

    return {"classes": classes, "train": split(train), "val": split(val)}


def changes(before: dict[str, Any], now: dict[str, Any], splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """How ``now`` differs from ``before`` (two fingerprints) in ``splits``, in words."""
    said = [f"classes {', '.join(before['classes'])} -> {', '.join(now['classes'])}"] \
        if before["classes"] != now["classes"] else []
    for name in splits:
        was, is_ = before[name], now[name]
        if was["images"] != is_["images"]:
            said.append(f"{name}: {was['images']} -> {is_['images']} images")
        elif was["sha256"] != is_["sha256"]:
            said.append(f"{name}: other images or labels, as many ({is_['images']})")
    return said
