"""Data for the runner: the built-in ``shapes`` images and ``image_folder``, batched in an order
that depends only on (seed, epoch), with augmentation drawn from (seed, epoch, step) -- so a
resumed run sees exactly the batches an uninterrupted one would.

``shapes`` draws three classes -- circle, square, triangle -- of random size, place and colour
over a noisy background: built in, seedable, nothing to download, and hard enough that a
network has to learn something.

Example:
    >>> from freezekit.train.data import shapes
    >>> train, val, classes = shapes(image_size=32, train_size=8, val_size=4, seed=0)
    >>> classes, tuple(train.images.shape), train.labels.tolist()[:4]
    (['circle', 'square', 'triangle'], (8, 3, 32, 32), [2, 1, 1, 0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..labels import SHAPES, classes_in

__all__ = ["SHAPES", "Split", "augment", "batches", "classes_in", "image_folder", "normalize", "shapes"]

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    """Images (uint8, N x 3 x S x S) and labels of one split, held in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _draw(n: int, size: int, generator: torch.Generator) -> Split:
    labels = torch.randint(0, len(SHAPES), (n,), generator=generator)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    background = torch.rand(n, 3, 1, 1, generator=generator) * 0.4
    colour = 0.5 + torch.rand(n, 3, 1, 1, generator=generator) * 0.5
    radius = size * (0.15 + torch.rand(n, 1, 1, generator=generator) * 0.2)
    centre = size * 0.5 + (torch.rand(n, 2, 1, 1, generator=generator) - 0.5) * (size - 2 * radius[:, None])
    cy, cx = centre[:, 0], centre[:, 1]
    circle = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
    square = ((ys - cy).abs() <= radius * 0.85) & ((xs - cx).abs() <= radius * 0.85)
    triangle = (ys >= cy - radius) & (ys <= cy + radius) & ((xs - cx).abs() <= (ys - (cy - radius)) / 2)
    which = labels.view(n, 1, 1)
    mask = (circle & (which == 0)) | (square & (which == 1)) | (triangle & (which == 2))
    noise = torch.rand(n, 3, size, size, generator=generator).sub_(0.5).mul_(0.28)  # uniform: cheaper than normal
    images = noise.add_(background).add_(mask[:, None] * (colour - background))
    return Split(images.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels)


def shapes(image_size: int, train_size: int, val_size: int, seed: int) -> tuple[Split, Split, list[str]]:
    """The built-in dataset: ``train_size`` + ``val_size`` drawn images, the same for the same seed."""
    generator = torch.Generator().manual_seed(10_007 + seed)
    return _draw(train_size, image_size, generator), _draw(val_size, image_size, generator), list(SHAPES)


def _read(folder: Path, classes: list[str], size: int) -> Split:
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((folder / name).rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(file) as img:
                    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
                    images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
                                  .view(size, size, 3).permute(2, 0, 1))
                labels.append(label)
    if not images:
        raise ValueError(f"no images in {folder}")
    return Split(torch.stack(images), torch.tensor(labels))


def image_folder(path: str | Path, image_size: int) -> tuple[Split, Split, list[str]]:
    """``PATH/train/CLASS/*`` and ``PATH/val/CLASS/*``, resized to ``image_size`` and held in memory."""
    root = Path(path)
    classes = classes_in(root / "train")
    return _read(root / "train", classes, image_size), _read(root / "val", classes, image_size), classes


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
            world: int = 1) -> list[torch.Tensor]:
    """Index batches of one epoch: a permutation drawn from (seed, epoch), cut into batches. With
    ``world`` processes, rank ``rank`` takes every ``world``-th index, the permutation padded with
    its own start (as ``DistributedSampler`` does) so that every rank makes as many steps."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)) if shuffle \
        else torch.arange(n)
    if world > 1:
        total = math.ceil(n / world) * world
        order = torch.cat([order, order[: total - n]])[rank::world]
    return list(order.split(batch_size))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float, normalized with ImageNet statistics (what pretrained models expect)."""
    return (images.float() / 255 - MEAN.to(images.device)) / STD.to(images.device)


def augment(images: torch.Tensor, seed: int, epoch: int, step: int) -> torch.Tensor:
    """Random crop with 4-pixel padding and horizontal flip, drawn from (seed, epoch, step)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)
    n, _, h, w = images.shape
    shifts = torch.randint(0, 9, (n, 2), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    padded = F.pad(images, (4, 4, 4, 4), mode="reflect")
    out = torch.stack([padded[i, :, dy: dy + h, dx: dx + w] for i, (dy, dx) in enumerate(shifts)])
    flip = torch.tensor(flips, device=images.device)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)
