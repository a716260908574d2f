"""What a run is built from, each piece from its recipe: the device, the data, the model (with the
recipe's checkpoint loaded), the optimizer and its learning-rate shape."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import FreezekitError
from ..models import build
from ..optim import param_groups
from ..recipe import Recipe
from ..recipe.check import optimizer_rules
from . import checkpoint as ckpt
from .data import shapes
from .loader import default_workers
from .preprocess import transforms
from .sources import IMAGE_SUFFIXES, Files, Pixels, cifar, image_folder

__all__ = ["RunError", "WarmupThen", "build_model", "build_optimizer", "data_workers", "load_data",
           "resolve_device"]


class RunError(FreezekitError, RuntimeError):
    """A run that cannot start or go on: its message says why and what to do."""


class WarmupThen:
    """The learning-rate multiplier per step: linear warmup from 0, then cosine to 0 or constant."""

    def __init__(self, warmup: int, total: int, shape: str):
        self.warmup, self.total, self.shape = warmup, total, shape

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.shape == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device: cuda was asked for, but no GPU is available")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def load_data(recipe: Recipe, config: dict[str, Any]) -> tuple[Dataset, Dataset, list[str]]:
    """The training and validation datasets, preprocessed as ``config`` (:func:`.preprocess.data_config`)
    says, and the class names. Image folders are listed, not read: images are decoded per batch."""
    d = recipe.data
    if d.kind == "shapes":
        size = config["input_size"][-1]
        train, val, classes = shapes(size, d.train_size, d.val_size, recipe.seed)
        return (Pixels(train.images, train.labels.tolist(), shift=4 if d.augment else 0),
                Pixels(val.images, val.labels.tolist()), classes)
    train_transform, eval_transform = transforms(config, recipe)
    root = Path(d.path).expanduser()
    if d.kind == "image_folder":
        train, val, classes = image_folder(root, d.val_fraction, recipe.seed)
        if train and not val and not (root / "train").is_dir():
            raise RunError(f"data.val_fraction: {d.val_fraction} of each class in {str(root)!r} rounds to no image "
                           f"(the largest class has {max(Counter(label for _, label in train).values())}); "
                           f"raise it, or give train/ and val/ folders")
        if not train or not val:
            raise RunError(f"data.path: {str(root)!r} has no images for " + ("training" if not train else "validation")
                           + f" (looked for {', '.join(IMAGE_SUFFIXES)} files below each class folder)")
        return Files(train, train_transform, augmented=d.augment), Files(val, eval_transform), classes
    (train_images, train_labels), (val_images, val_labels), classes = cifar(d.kind, root)
    return (Pixels(train_images, train_labels, train_transform, augmented=d.augment),
            Pixels(val_images, val_labels, eval_transform),
            classes)


def data_workers(recipe: Recipe, local_world: int = 1) -> int:
    """Decoding workers per process: ``data.workers``, else none for ``shapes``, else ``default_workers``."""
    d = recipe.data
    return d.workers if d.workers is not None else 0 if d.kind == "shapes" else default_workers(local_world)


def build_model(recipe: Recipe, num_classes: int, allow_import: tuple[str, ...], say: Any) -> nn.Module:
    spec = recipe.model
    model = build(spec.name, num_classes=num_classes, pretrained=spec.pretrained, allow_import=allow_import,
                  **spec.kwargs)
    if spec.checkpoint:
        weights = ckpt.load_weights(Path(spec.checkpoint).expanduser())
        own = model.state_dict()
        fitting = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(k for k in weights if k in own and own[k].shape != weights[k].shape)
        missing = model.load_state_dict(fitting, strict=False).missing_keys
        say(f"loaded {len(fitting)} tensors from {spec.checkpoint}" +
            (f"; kept new {', '.join(skipped)} (shapes differ)" if skipped else "") +
            (f"; {len(missing)} not in the file" if missing else ""))
    return model


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = recipe.optimizer
    groups = param_groups(model, lr=o.lr, weight_decay=o.weight_decay, rules=optimizer_rules(recipe),
                          layer_decay=o.layer_decay)
    if not groups:
        raise RunError("nothing is trainable at the start: the recipe's policy freezes every parameter")
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    kind = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return kind(groups, lr=o.lr, weight_decay=o.weight_decay)
