"""``freezekit recipes``: the bundled recipes, one line each."""

from __future__ import annotations

from pathlib import Path

import typer

from ..recipe.bundled import bundled


def command() -> None:
    """List the bundled recipes and what each does; run one with `freezekit run PATH`."""
    for path, line in bundled():
        typer.echo(f"{path.stem:<18} {line}")
        typer.echo(f"{'':<18} {Path(path)}")
