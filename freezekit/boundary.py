"""Gradient boundaries: detach a module's output (or inputs) so that no gradient crosses.

A boundary is a :class:`Boundary` object installed as the module's own ``forward`` attribute. It
calls the module's forward, under ``torch.no_grad()`` when asked (so the module stores no
activations), and detaches what crosses: the output for ``at="output"``, the positional and
keyword inputs for ``at="input"``. Module hooks keep running around it as usual. Being a plain
attribute, it survives ``copy.deepcopy``, pickling and later DDP wrapping; removing it restores
the module exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .tree import tree_map

__all__ = ["Boundary", "add", "boundaries", "detach_all", "remove"]


def _detach(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def detach_all(value: Any) -> Any:
    """``value`` with every tensor inside detached (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    return tree_map(_detach, value)


class Boundary:
    """The ``forward`` of a module with a gradient boundary."""

    def __init__(self, module: nn.Module, at: str, no_grad: bool):
        self.module = module
        self.at = at
        self.no_grad = no_grad
        self.previous = module.__dict__.get("forward")  # an instance-level forward, wrapped in turn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)
        if self.at == "input":
            return forward(*detach_all(args), **detach_all(kwargs))
        if self.no_grad:
            with torch.no_grad():
                return detach_all(forward(*args, **kwargs))
        return detach_all(forward(*args, **kwargs))

    def __repr__(self) -> str:
        return f"Boundary(at={self.at!r}, no_grad={self.no_grad})"


def boundaries(module: nn.Module) -> list[Boundary]:
    """The boundaries installed on ``module``, outermost first."""
    out = []
    forward = module.__dict__.get("forward")
    while isinstance(forward, Boundary):
        out.append(forward)
        forward = forward.previous
    return out


def add(module: nn.Module, at: str, no_grad: bool) -> Boundary:
    """Install a boundary on ``module`` (modifies it in place) and return it."""
    boundary = Boundary(module, at, no_grad)
    module.__dict__["forward"] = boundary
    return boundary


def remove(module: nn.Module, boundary: Boundary) -> None:
    """Remove ``boundary``, which must be the outermost one on ``module``."""
    if module.__dict__.get("forward") is not boundary:
        raise RuntimeError("boundaries must be removed in reverse order of installation")
    if boundary.previous is not None:
        module.__dict__["forward"] = boundary.previous
    else:
        del module.__dict__["forward"]
