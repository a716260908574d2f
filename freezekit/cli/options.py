"""Options shared by several commands."""

from __future__ import annotations

import typer

SET = typer.Option([], "--set", help="Override a recipe value: key.path=value, the value read as YAML (repeatable).")
ALLOW_IMPORT = typer.Option([], "--allow-import", help="Let a recipe's model factory import this package "
                                                       "(repeatable); only torch, torchvision, timm and freezekit "
                                                       "are importable without it.")
