"""``freezekit summary MODEL``: the frozen-layer table of a timm or torchvision model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

from ..models import build_for_inspection
from ..policy import Policy
from ..recipe import check, load
from ..recipe.load import apply_overrides
from ..rules import detach, freeze, unfreeze
from ..summary_table import Summary, summary
from .errors import user_errors
from .options import ALLOW_IMPORT, SET

COLOURS = {"trainable": "green", "frozen": "blue", "partial": "yellow", "detached": "magenta", "-": "dim"}


class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"


def command(
    model: str = typer.Argument(None, help="timm:NAME, torchvision:NAME or hf:PATH_OR_ID, built on the meta device "
                                           "(no weights)."),
    recipe: str = typer.Option(None, "--recipe", help="Use this recipe's model, and preview its policy."),
    policy_file: str = typer.Option(None, "--policy", help="Preview this policy: a YAML file of rules, as a recipe's "
                                                           "policy section (types, norms, first/last, regex, ...)."),
    kwargs: list[str] = typer.Option([], "--kwargs", help="A model factory argument: key=value, the value read as "
                                                          "YAML (repeatable)."),
    set_: list[str] = SET,
    freeze_: list[str] = typer.Option([], "--freeze", help="Freeze what this pattern selects (repeatable)."),
    unfreeze_: list[str] = typer.Option([], "--unfreeze", help="Then unfreeze what this selects (repeatable)."),
    detach_: list[str] = typer.Option([], "--detach", help="Then put a boundary at its output (repeatable)."),
    depth: int = typer.Option(None, "--depth", min=1, help="Row depth (default: the deepest that fits ~40 rows)."),
    fmt: Format = typer.Option(Format.table, "--format", help="table, markdown or json."),
    allow_import: list[str] = ALLOW_IMPORT,
) -> None:
    """Show what trains and what is frozen in MODEL (or a recipe's model, as its policy leaves it),
    then as the --policy file and the --freeze/--unfreeze/--detach patterns would leave it (applied in
    that order; "re:" for a regex). Instant: no weights, no forward pass."""
    with user_errors():
        if (model is None) == (recipe is None):
            raise ValueError("give a MODEL (timm:NAME, torchvision:NAME or hf:PATH_OR_ID) or --recipe RECIPE, "
                             "not both")
        if (set_ and recipe is None) or (kwargs and recipe is not None):
            raise ValueError("--set changes a --recipe; --kwargs goes with a MODEL")
        rules = list(_policy_file(policy_file).rules) if policy_file else []
        rules += [r(*p) for r, p in ((freeze, freeze_), (unfreeze, unfreeze_), (detach, detach_)) if p]
        if recipe is not None:
            loaded = load(recipe, set_)
            prepared = check(loaded, allow_import)
            net = _build(loaded.model.name, allow_import, num_classes=prepared.num_classes, **loaded.model.kwargs)
            rules = [*prepared.policy.rules, *rules]
        else:
            factory_kwargs: dict = {}
            apply_overrides(factory_kwargs, kwargs, "--kwargs")
            net = _build(model, allow_import, **factory_kwargs)
        result = summary(net, depth=depth, policy=Policy(*rules) if rules else None)
    if fmt is Format.json:
        typer.echo(result.to_json())
    elif fmt is Format.markdown:
        typer.echo(result.to_markdown())
    else:
        _print_table(result)


def _policy_file(path: str) -> Policy:
    """The policy in a YAML file: a list of rules, or a recipe (its ``policy`` section)."""
    data = yaml.safe_load(Path(path).expanduser().read_text())
    if isinstance(data, dict) and "policy" in data:
        return Policy.from_config(data["policy"], f"{path}: policy")
    return Policy.from_config(data, path)


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
    for name, kind, parameters, trainable, status, mode in result._cells():
        table.add_row(name, kind, parameters, trainable, f"[{COLOURS.get(status, 'white')}]{status}", mode)
    console.print(table)
    console.print(result._footer())
