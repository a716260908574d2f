"""An exported model evaluated on labelled images, read in order through the runner's loader: a
run's own validation split (:func:`run_split`) or a folder whose class folders are named as the
model's classes (:func:`labelled_folder`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..labels import classes_in
from ..recipe import load as load_recipe
from .data import model_inputs
from .loader import EpochBatches, default_workers, loader
from .preprocess import eval_transform
from .setup import data_workers, load_data
from .sources import IMAGE_SUFFIXES, Files, changes, fingerprint, samples_of

__all__ = ["Evaluation", "Source", "evaluate", "labelled_folder", "logits_of", "run_split"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or a Hugging Face output's ``logits``."""
    return output if isinstance(output, torch.Tensor) else output.logits


@dataclass(frozen=True)
class Source:
    """What to evaluate on, and how to read it."""

    dataset: Any
    classes: list[str]  # in the order of the model's outputs
    where: str
    preprocessing: dict[str, Any]  # the model's data config: uint8 images are normalized with its mean and std
    batch_size: int
    workers: int
    skip: bool  # leave unreadable images out (the run's data.on_error: skip) instead of stopping


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` counted: the summed loss, and images and correct answers per class."""

    data: str
    classes: list[str]
    images: list[int]
    correct: list[int]
    loss: float

    def to_dict(self) -> dict[str, Any]:
        seen, right = sum(self.images), sum(self.correct)
        return {"data": self.data, "images": seen, "correct": right, "accuracy": right / seen, "loss": self.loss / seen,
                "classes": {name: {"images": n, "correct": c, "accuracy": c / n}
                            for name, n, c in zip(self.classes, self.images, self.correct) if n}}


def run_split(run_dir: Path, preprocessing: dict[str, Any], names: list[str] | None) -> Source:
    """The validation split of the run in ``run_dir``: its recipe's data, drawn by its seed,
    preprocessed as ``preprocessing`` (the exported model's data config) says; its classes must be
    ``names``, the model's, where it has them."""
    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no recipe.yaml in it, so no validation split to evaluate on; "
                                f"give --data PATH")
    recipe = load_recipe(run_dir / "recipe.yaml")
    train, dataset, classes = load_data(recipe, preprocessing)
    d = recipe.data
    if (run_dir / "data.json").is_file():
        recorded = json.loads((run_dir / "data.json").read_text())
        changed = changes(recorded, fingerprint(train, dataset, classes), ("val",))
        if changed:
            raise ValueError(f"data.path: {d.path}: its images changed since the run ({'; '.join(changed)}), so "
                             f"its validation split is not the run's; give --data PATH to evaluate on a folder")
    if names is not None and classes != names:
        raise ValueError(f"{d.path}: its classes are now {', '.join(classes)}, and the model's are "
                         f"{', '.join(names)}: not the data the run validated on")
    if d.kind == "shapes":
        described = f"shapes, seed {recipe.seed}"
    elif d.kind == "image_folder" and not (Path(d.path).expanduser() / "train").is_dir():
        described = f"image_folder {d.path}, val_fraction {d.val_fraction}, seed {recipe.seed}"
    else:
        described = f"{d.kind} {d.path}"
    return Source(dataset, classes, f"the validation split of {run_dir / 'recipe.yaml'} ({described})",
                  preprocessing, recipe.train.batch_size, data_workers(recipe), d.on_error == "skip")


def labelled_folder(data: Path, preprocessing: dict[str, Any], names: list[str], batch_size: int) -> Source:
    """``data/val/CLASS/*`` (or ``data/CLASS/*``), each class folder given the model's label of its
    name (``names``: the model's class names, in the order of its outputs)."""
    if not data.is_dir():
        raise FileNotFoundError(f"--data: {data}: {'not a folder' if data.exists() else 'no such folder'}")
    root = data / "val" if (data / "val").is_dir() else data
    classes = classes_in(root)
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ValueError(f"--data: {root}: class folder{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} not among the model's classes: {', '.join(names)}")
    samples = [(path, names.index(classes[label])) for path, label in samples_of(root, classes)]
    if not samples:
        raise ValueError(f"--data: {root}: no images (looked for {', '.join(IMAGE_SUFFIXES)} files below each "
                         f"class folder)")
    return Source(Files(samples, eval_transform(preprocessing)), names, str(root),
                  preprocessing, batch_size, default_workers(), skip=False)


def evaluate(net: torch.nn.Module, source: Source, device: torch.device, batch_size: int | None = None,
             workers: int | None = None, say: Callable[[str], None] = print) -> Evaluation:
    """Images and correct answers per class, and the summed cross-entropy, of ``net`` (on ``device``)
    over ``source`` read in order through the runner's DataLoader (``batch_size`` and ``workers``:
    the source's unless given), in eval mode without gradients; an unreadable image stops it, or is
    left out (and said through ``say``) where ``source.skip``."""
    num_classes = len(source.classes)
    images = torch.zeros(num_classes, dtype=torch.long)
    correct = torch.zeros(num_classes, dtype=torch.long)
    loss = 0.0
    order = EpochBatches(len(source.dataset), batch_size or source.batch_size, 0, shuffle=False)
    net.eval()
    with torch.no_grad():
        for batch in loader(source.dataset, order, source.workers if workers is None else workers,
                            device.type == "cuda"):
            for bad in batch.unreadable:
                if not source.skip:
                    raise ValueError(f"cannot read {bad.path} ({bad.reason}); fix or remove it")
                say(f"skipped unreadable image {bad.path} ({bad.reason})")
            if not len(batch.labels):
                continue
            logits = logits_of(net(model_inputs(batch.images, device, source.preprocessing))).float().cpu()
            loss += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            images += torch.bincount(batch.labels, minlength=num_classes)
            correct += torch.bincount(batch.labels[logits.argmax(1) == batch.labels], minlength=num_classes)
    if not images.sum():
        raise ValueError("no image could be read")
    return Evaluation(source.where, source.classes, images.tolist(), correct.tolist(), loss)
