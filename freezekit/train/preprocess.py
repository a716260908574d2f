"""The model's own preprocessing: input size, mean/std, interpolation and crop, resolved from the
model (timm's ``pretrained_cfg``; torchvision's weights' transforms) unless the recipe sets them,
and the transforms built from them by timm's factory.

Evaluation resizes keeping the aspect ratio and crops the centre (``crop_pct`` of the resized
side). Training with ``augment`` takes a random resized crop and a horizontal flip, plus timm's
auto-augment policy when ``auto_augment`` names one (``rand-m9-mstd0.5``); without ``augment`` it
uses the evaluation transform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ..index import unwrap
from ..models import parse
from ..recipe import Recipe

__all__ = ["data_config", "eval_transform", "transforms"]


def _torchvision_defaults(name: str) -> dict[str, Any]:
    """What torchvision's default weights for ``name`` expect (read from the enum: nothing downloaded)."""
    import torchvision

    try:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError, TypeError):  # no weights enum, or no classification preset
        return {}
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    return {"input_size": (3, crop, crop), "interpolation": preset.interpolation.value, "mean": tuple(preset.mean),
            "std": tuple(preset.std), "crop_pct": crop / resize, "crop_mode": "center"}


def data_config(recipe: Recipe, model: nn.Module) -> dict[str, Any]:
    """The resolved preprocessing: timm's ``resolve_data_config`` of the model, torchvision's
    weights preset for ``torchvision:`` models, then the recipe's ``data`` overrides on top."""
    from timm.data import resolve_data_config

    config = dict(resolve_data_config({}, model=unwrap(model)))
    source, name = parse(recipe.model.name)
    if source == "torchvision":
        config.update(_torchvision_defaults(name))
    d = recipe.data
    size = d.image_size or (64 if d.kind == "shapes" else None)
    if size:
        config["input_size"] = (3, size, size)
    if d.kind == "shapes":
        config["crop_pct"] = 1.0  # drawn at the input size: nothing to crop
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if getattr(d, key) is not None:
            config[key] = tuple(getattr(d, key)) if key in ("mean", "std") else getattr(d, key)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}  # JSON-ready


def _factory_args(config: dict[str, Any]) -> dict[str, Any]:
    return {"input_size": tuple(config["input_size"]), "interpolation": config["interpolation"],
            "mean": tuple(config["mean"]), "std": tuple(config["std"]), "crop_pct": config["crop_pct"],
            "crop_mode": config.get("crop_mode", "center")}


def eval_transform(config: dict[str, Any]) -> Callable:
    """The evaluation transform of a data config (:func:`data_config`, or an exported model's
    ``pretrained_cfg``): aspect-preserving resize, centre crop, normalization."""
    from timm.data import create_transform

    return create_transform(**_factory_args(config), is_training=False)


def transforms(config: dict[str, Any], recipe: Recipe) -> tuple[Callable, Callable]:
    """(training transform, evaluation transform) of PIL images to normalized tensors."""
    from timm.data import create_transform

    d = recipe.data
    evaluate = eval_transform(config)
    if not d.augment:
        return evaluate, evaluate
    train = create_transform(**{k: v for k, v in _factory_args(config).items() if k not in ("crop_pct", "crop_mode")},
                             is_training=True, auto_augment=d.auto_augment)
    return train, evaluate
