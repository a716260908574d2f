"""``freezekit eval RUN_DIR``: the accuracy and loss of the model a run exported, overall and per
class, on the run's own validation split or on an image folder."""

from __future__ import annotations

import json
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

    from ..train.evaluation import evaluate, labelled_folder, run_split
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
            source = run_split(run_dir, preprocessing, names)
        elif names is None:
            raise ValueError(f"{folder / 'config.json'}: no label_names, so --data's class folders cannot be "
                             f"matched to the model's outputs")
        else:
            source = labelled_folder(data, preprocessing, names, BATCH)
        device = torch.device(resolve_device("auto"))
        result = evaluate(net.to(device), source, device, batch_size, workers, lambda line: typer.echo(line, err=True))
    summary = {"model": str(folder), **result.to_dict()}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print(summary)


def _label_names(config: dict[str, Any]) -> list[str] | None:
    names = config.get("label_names")
    if isinstance(names, list) and len(names) == config["num_classes"] and all(isinstance(n, str) for n in names):
        return names
    return None


def _print(summary: dict[str, Any]) -> None:
    rows = [(name, str(c["images"]), str(c["correct"]), f"{c['accuracy']:.2%}") for name, c in
            summary["classes"].items()]
    typer.echo(f"{summary['model']} on {summary['data']}")
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
