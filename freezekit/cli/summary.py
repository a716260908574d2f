"""``freezekit summary MODEL``: the frozen-layer table of a timm or torchvision model."""

from __future__ import annotations

from enum import Enum

import typer
from rich.console import Console
from rich.table import Table

from ..models import build_for_inspection
from ..policy import Policy
from ..recipe import check, load
from ..rules import detach, freeze, unfreeze
from ..summary_table import Summary, summary
from .errors import user_errors
from .options import ALLOW_IMPORT

COLOURS = {"trainable": "green", "frozen": "blue", "partial": "yellow", "detached": "magenta", "-": "dim"}


class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"


def command(
    model: str = typer.Argument(None, help="timm:NAME or torchvision:NAME, built on the meta device (no weights)."),
    recipe: str = typer.Option(None, "--recipe", help="Use this recipe's model, and preview its policy."),
    freeze_: list[str] = typer.Option([], "--freeze", help="Freeze what this pattern selects (repeatable)."),
    unfreeze_: list[str] = typer.Option([], "--unfreeze", help="Then unfreeze what this selects (repeatable)."),
    detach_: list[str] = typer.Option([], "--detach", help="Then put a boundary at its output (repeatable)."),
    depth: int = typer.Option(None, "--depth", min=1, help="Row depth (default: the deepest that fits ~40 rows)."),
    fmt: Format = typer.Option(Format.table, "--format", help="table, markdown or json."),
    allow_import: list[str] = ALLOW_IMPORT,
) -> None:
    """Show what trains and what is frozen in MODEL (or a recipe's model, as its policy leaves it),
    then as the --freeze/--unfreeze/--detach patterns would leave it (applied in that order; "re:"
    for a regex). Instant: no weights, no forward pass."""
    with user_errors():
        if (model is None) == (recipe is None):
            raise ValueError("give a MODEL (timm:NAME or torchvision:NAME) or --recipe RECIPE, not both")
        rules = [r(*p) for r, p in ((freeze, freeze_), (unfreeze, unfreeze_), (detach, detach_)) if p]
        if recipe is not None:
            loaded = load(recipe)
            prepared = check(loaded, allow_import)
            net = _build(loaded.model.name, allow_import, num_classes=prepared.num_classes, **loaded.model.kwargs)
            rules = [*prepared.policy.rules, *rules]
        else:
            net = _build(model, allow_import)
        result = summary(net, depth=depth, policy=Policy(*rules) if rules else None)
    if fmt is Format.json:
        typer.echo(result.to_json())
    elif fmt is Format.markdown:
        typer.echo(result.to_markdown())
    else:
        _print_table(result)


def _build(name: str, allow_import: list[str], **kwargs: object) -> object:
    return build_for_inspection(name, on_cpu=lambda note: typer.echo(f"note: {note}", err=True),
                                allow_import=allow_import, **kwargs)


def _print_table(result: Summary) -> None:
    console = Console()
    if not console.is_terminal:
        typer.echo(str(result))
        return
    table = Table(title=f"{result.model} (depth {result.depth})", title_justify="left")
    for name, justify in (("name", "left"), ("type", "left"), ("parameters", "right"), ("trainable", "right"),
                          ("status", "left"), ("mode", "left")):
        table.add_column(name, justify=justify)
    for row in result.rows:
        table.add_row("  " * (row.depth - 1) + row.name, row.type + (f" x{row.count}" if row.count > 1 else ""),
                      f"{row.parameters:,}", f"{row.trainable:,}", f"[{COLOURS.get(row.status, 'white')}]{row.status}",
                      row.mode)
    console.print(table)
    console.print(result._footer())
