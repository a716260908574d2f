"""The built-in ``shapes`` data, drawn in memory, and the normalization of uint8 batches.

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

from dataclasses import dataclass
from typing import Any

import torch

from ..labels import SHAPES

__all__ = ["SHAPES", "Split", "model_inputs", "normalize", "shapes"]


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


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 images -> float, normalized with ``mean`` and ``std`` (per channel, in 0..1 units)."""
    mean_ = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_ = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_) / std_


def model_inputs(images: torch.Tensor, device: torch.device, config: dict[str, Any]) -> torch.Tensor:
    """A batch's images on ``device`` as the model takes them: uint8 ones (``shapes``) normalized there,
    a batch at a time, with the preprocessing ``config``'s mean and std."""
    images = images.to(device, non_blocking=True)
    return normalize(images, config["mean"], config["std"]) if images.dtype == torch.uint8 else images
