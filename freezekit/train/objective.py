"""What training minimizes: cross-entropy with the recipe's label smoothing, or, with mixup or
cutmix (timm's ``Mixup``), cross-entropy against the mixed soft targets. The mixing of a batch is
drawn from (seed, epoch, step), so a resumed run mixes as an uninterrupted one did."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..recipe import Recipe
from .loader import image_seed
from .sources import drawn_from

__all__ = ["Objective"]


class Objective:
    def __init__(self, recipe: Recipe, num_classes: int):
        d, self.seed, self.smoothing = recipe.data, recipe.seed, recipe.train.label_smoothing
        self.mixup = None
        if d.mixup or d.cutmix:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=self.smoothing,
                               num_classes=num_classes)

    def mix(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        """The batch and its targets, mixed when the recipe asks; an odd batch (timm mixes pairs) is
        left as it is."""
        if self.mixup is None or len(images) % 2:
            return images, labels
        with drawn_from(image_seed(self.seed, epoch, -1 - step)):
            return self.mixup(images, labels)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dtype.is_floating_point:  # mixup's soft targets, smoothing already in them
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)
