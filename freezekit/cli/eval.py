"""``freezekit eval RUN_DIR``: the accuracy and loss of the model a run exported, overall and per
class, on the run's own validation split or on an image folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import user_errors
from .options import ALLOW_IMPORT

BATCH = 64  # with --data; the run's own split is read in the run's train.batch_size


class Exported(str, Enum):
    model = "model"
    best = "model-best"


@dataclass(frozen=True)
class Evaluation:
    """What :func:`_evaluate` counted: the summed loss, and images and correct answers per class."""

    model: str
    data: str
    classes: list[str]
    images: list[int]
    correct: list[int]
    loss: float

    def to_dict(self) -> dict[str, Any]:
        seen, right = sum(self.images), sum(self.correct)
        return {"model": self.model, "data": self.data, "images": seen, "correct": right,
                "accuracy": right / seen, "loss": self.loss / seen,
                "classes": {name: {"images": n, "correct": c, "accuracy": c / n}
                            for name, n, c in zip(self.classes, self.images, self.correct) if n}}


def command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run's output folder."),
    data: Path = typer.Option(None, "--data", help="Evaluate on this image folder, PATH/CLASS/* (or PATH/val/CLASS/*"
                                                   " if PATH has a val folder), its class folders named as the "
                                                   "model's classes. Default: the run's own validation split."),
    which: Exported = typer.Option(Exported.model, "--model", help="The model at the run's end, or its best one."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Images per batch (default: the run's "
                                                                     f"train.batch_size; {BATCH} with --data)."),
    workers: int = typer.Option(None, "--workers", min=0, help="Decoding processes (default: the run's data.workers,"
                                                               " else as many as the cores allow)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    allow_import: list[str] = ALLOW_IMPORT,
) -> None:
    """Print the accuracy and loss of the model RUN_DIR/model (or model-best) on the run's own
    validation split (the same images, after the model's own preprocessing), or on --data, then
    each class's images, correct answers and accuracy."""
    import torch  # here, not above: timm and PIL would slow every other command's start
    from timm.data import resolve_data_config

    from ..train.export import load
    from ..train.setup import resolve_device

    with user_errors():
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: {'not a folder' if run_dir.exists() else 'no such folder'}")
        folder = run_dir / which.value
        if not folder.is_dir():
            raise FileNotFoundError(f"{run_dir}: no {which.value}/ in it; expected a run folder written by "
                                    f"freezekit run")
        net, config = load(folder, allow_import=allow_import)
        preprocessing = dict(resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
        names = _label_names(config)
        if data is None:
            source = _run_split(run_dir, preprocessing, names)
        elif names is None:
            raise ValueError(f"{folder / 'config.json'}: no label_names, so --data's class folders cannot be "
                             f"matched to the model's outputs")
        else:
            source = _folder(data, preprocessing, names)
        device = torch.device(resolve_device("auto"))
        images, correct, loss = _evaluate(net.to(device), source, batch_size or source.batch_size,
                                          source.workers if workers is None else workers, device, preprocessing)
        result = Evaluation(str(folder), source.where, source.classes, images, correct, loss)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print(result)


def _label_names(config: dict[str, Any]) -> list[str] | None:
    names = config.get("label_names")
    if isinstance(names, list) and len(names) == config["num_classes"] and all(isinstance(n, str) for n in names):
        return names
    return None


@dataclass(frozen=True)
class _Source:
    """What to evaluate on, and how to read it."""

    dataset: Any
    classes: list[str]  # in the order of the model's outputs
    where: str
    batch_size: int
    workers: int
    skip: bool  # leave unreadable images out (the run's data.on_error: skip) instead of stopping


def _run_split(run_dir: Path, preprocessing: dict[str, Any], names: list[str] | None) -> _Source:
    """The run's own validation split: its recipe's data, drawn by its seed, preprocessed as the
    exported model says."""
    from ..recipe import load
    from ..train.loader import default_workers
    from ..train.setup import load_data

    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no recipe.yaml in it, so no validation split to evaluate on; "
                                f"give --data PATH")
    recipe = load(run_dir / "recipe.yaml")
    _, dataset, classes = load_data(recipe, preprocessing)
    d = recipe.data
    if names is not None and classes != names:
        raise ValueError(f"{d.path}: its classes are now {', '.join(classes)}, and the model's are "
                         f"{', '.join(names)}: not the data the run validated on")
    if d.kind == "shapes":
        described = f"shapes, seed {recipe.seed}"
    elif d.kind == "image_folder" and not (Path(d.path).expanduser() / "train").is_dir():
        described = f"image_folder {d.path}, val_fraction {d.val_fraction}, seed {recipe.seed}"
    else:
        described = f"{d.kind} {d.path}"
    workers = d.workers if d.workers is not None else 0 if d.kind == "shapes" else default_workers()
    return _Source(dataset, classes, f"the validation split of {run_dir / 'recipe.yaml'} ({described})",
                   recipe.train.batch_size, workers, d.on_error == "skip")


def _folder(data: Path, preprocessing: dict[str, Any], names: list[str]) -> _Source:
    """``data/val/CLASS/*`` (or ``data/CLASS/*``), each class folder given the model's label of its name."""
    from timm.data import create_transform

    from ..labels import classes_in
    from ..train.loader import default_workers
    from ..train.sources import IMAGE_SUFFIXES, Files

    if not data.is_dir():
        raise FileNotFoundError(f"--data: {data}: {'not a folder' if data.exists() else 'no such folder'}")
    root = data / "val" if (data / "val").is_dir() else data
    classes = classes_in(root)
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ValueError(f"--data: {root}: class folder{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} not among the model's classes: {', '.join(names)}")
    samples = [(str(file), names.index(name)) for name in classes
               for file in sorted((root / name).rglob("*")) if file.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise ValueError(f"--data: {root}: no images (looked for {', '.join(IMAGE_SUFFIXES)} files below each "
                         f"class folder)")
    return _Source(Files(samples, create_transform(**preprocessing, is_training=False)), names, str(root), BATCH,
                   default_workers(), skip=False)


def _evaluate(net: Any, source: _Source, batch_size: int, workers: int, device: Any,
              preprocessing: dict[str, Any]) -> tuple[list[int], list[int], float]:
    """Images and correct answers per class, and the summed cross-entropy, over ``source`` read in
    order through the runner's DataLoader, in eval mode without gradients; an unreadable image
    stops it, or is left out (and said) where ``source.skip``."""
    import torch
    import torch.nn.functional as F

    from ..train.data import normalize
    from ..train.loader import EpochBatches, loader
    from ..train.run import logits_of

    num_classes = len(source.classes)
    images = torch.zeros(num_classes, dtype=torch.long)
    correct = torch.zeros(num_classes, dtype=torch.long)
    loss = 0.0
    net.eval()
    with torch.no_grad():
        order = EpochBatches(len(source.dataset), batch_size, 0, shuffle=False)
        for batch in loader(source.dataset, order, workers, device.type == "cuda"):
            for bad in batch.unreadable:
                if not source.skip:
                    raise ValueError(f"cannot read {bad.path} ({bad.reason}); fix or remove it")
                typer.echo(f"skipped unreadable image {bad.path} ({bad.reason})", err=True)
            if not len(batch.labels):
                continue
            inputs = batch.images.to(device)
            if inputs.dtype == torch.uint8:  # shapes: normalized a batch at a time, as the runner does
                inputs = normalize(inputs, preprocessing["mean"], preprocessing["std"])
            logits = logits_of(net(inputs)).float().cpu()
            loss += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            images += torch.bincount(batch.labels, minlength=num_classes)
            correct += torch.bincount(batch.labels[logits.argmax(1) == batch.labels], minlength=num_classes)
    if not images.sum():
        raise ValueError("no image could be read")
    return images.tolist(), correct.tolist(), loss


def _print(result: Evaluation) -> None:
    summary = result.to_dict()
    rows = [(name, str(c["images"]), str(c["correct"]), f"{c['accuracy']:.2%}") for name, c in
            summary["classes"].items()]
    typer.echo(f"{result.model} on {result.data}")
    typer.echo(f"accuracy {summary['accuracy']:.2%} ({summary['correct']}/{summary['images']})  "
               f"loss {summary['loss']:.4f}")
    console = Console()
    header = ("class", "images", "correct", "accuracy")
    if not console.is_terminal:  # piped: plain columns, for grep and awk
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            typer.echo("  ".join([row[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(row[1:], widths[1:]))]))
        return
    table = Table()
    for name in header:
        table.add_column(name, justify="left" if name == "class" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
