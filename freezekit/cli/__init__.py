"""The ``freezekit`` command line: a typer app, one module per command, each thin."""

from .app import app, main

__all__ = ["app", "main"]
