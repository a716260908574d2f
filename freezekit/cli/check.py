"""``freezekit check RECIPE``: validate a recipe against its model and data, and print each phase's plan."""

from __future__ import annotations

import typer

from ..recipe import check, load
from .errors import user_errors
from .options import ALLOW_IMPORT, SET


def command(
    recipe: str = typer.Argument(..., help="The recipe (YAML) to check."),
    set_: list[str] = SET,
    allow_import: list[str] = ALLOW_IMPORT,
) -> None:
    """Check RECIPE (every pattern against the real model, built on the meta device) and print the
    plan of every phase: what trains, what is frozen, the learning rate of each optimizer group.
    Exit code 0 only if the recipe is valid."""
    with user_errors():
        loaded = load(recipe, set_)
        prepared = check(loaded, allow_import)
    typer.echo(f"{recipe}: valid ({loaded.name}: {loaded.model.name}, {prepared.num_classes} classes, "
               f"{loaded.train.epochs} epochs)")
    for phase in prepared.phases:
        totals = phase.summary.totals
        typer.echo(f"\n== {phase.label}: {totals['trainable']:,} of {totals['total']:,} parameters train "
                   f"({totals['trainable_pct']:.2f}%), {totals['frozen']:,} frozen, {totals['detached']:,} detached")
        typer.echo(str(phase.plan))
        typer.echo("optimizer groups:")
        for name, lr, decay, count in phase.groups:
            typer.echo(f"  {name:<28} lr {lr:.3g}  weight decay {decay:g}  {count} tensors")
