"""How the CLI reports a user's mistake: one clear message on stderr, exit code 1, no traceback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer

from ..errors import FreezekitError

T = TypeVar("T")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn freezekit's errors (and the library's argument errors) into ``error: ...`` and exit 1."""
    try:
        yield
    except (FreezekitError, ValueError, TypeError, OSError) as e:  # OSError: a file, or a factory reaching out
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def run(fn: Callable[[], T]) -> T:
    with user_errors():
        return fn()
