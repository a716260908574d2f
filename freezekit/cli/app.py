"""The typer app that joins freezekit's commands."""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(
    name="freezekit",
    help="Control what a PyTorch model learns during fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"freezekit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Control what a PyTorch model learns during fine-tuning: freeze, unfreeze, detach and
    eval-lock parts of a model by name, pattern, type or position."""


from . import check as _check  # noqa: E402  (commands register on the app above)
from . import eval as _eval  # noqa: E402
from . import predict as _predict  # noqa: E402
from . import recipes as _recipes  # noqa: E402
from . import run as _run  # noqa: E402
from . import summary as _summary  # noqa: E402

app.command("run")(_run.command)
app.command("check")(_check.command)
app.command("summary")(_summary.command)
app.command("recipes")(_recipes.command)
app.command("predict")(_predict.command)
app.command("eval")(_eval.command)


def main() -> None:
    """Entry point of the ``freezekit`` console script and ``python -m freezekit``."""
    app()
