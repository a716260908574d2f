"""Detaching values: for logging, targets and snapshots, without keeping graphs alive.

Each helper takes a tensor or any nesting of dict / list / tuple / namedtuple / dataclass and
returns the same structure; what is not a tensor passes through untouched.

Example:
    >>> import torch, freezekit as fk
    >>> w = torch.tensor([1.5, 2.5], requires_grad=True)
    >>> fk.to_python({"loss": (w * 2).sum(), "step": 3})
    {'loss': 8.0, 'step': 3}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .tree import tree_map

__all__ = ["detached", "stop_gradient", "to_cpu", "to_numpy", "to_python"]


def _mapped(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    return fn(value) if isinstance(value, torch.Tensor) else tree_map(fn, value)


# A clone made under no_grad is a detached copy: a leaf without graph, in its own storage.
_copy = torch.Tensor.clone
_detach = torch.Tensor.detach


def detached(value: Any, clone: bool = True) -> Any:
    """Detached copies that share no storage with ``value`` and hold no graph.

    Later in-place changes to the originals do not show in the copies, and keeping the copies
    keeps no activation alive. ``clone=False`` only detaches (see :func:`stop_gradient`).

    Example:
        >>> import torch, freezekit as fk
        >>> x = torch.zeros(2)
        >>> snapshot = fk.detached({"x": x})
        >>> _ = x.add_(1)
        >>> snapshot["x"].tolist()
        [0.0, 0.0]
    """
    if not isinstance(clone, bool):
        raise TypeError(f"detached(): clone: expected True or False, got {clone!r}")
    if not clone:
        return _mapped(_detach, value)
    with torch.no_grad():
        return _mapped(_copy, value)


def stop_gradient(value: Any) -> Any:
    """``detach()`` without a copy: the result shares storage with ``value`` (and sees its in-place
    changes). For targets that are not modified in place; cheaper than :func:`detached`."""
    return _mapped(_detach, value)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", copy=True)


def to_cpu(value: Any) -> Any:
    """Detached copies on the CPU (a copy even of CPU tensors, so logs never change afterwards)."""
    with torch.no_grad():
        return _mapped(_cpu, value)


# Floating dtypes numpy lacks: bfloat16 and the float8 family.
_NOT_IN_NUMPY = frozenset(d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point
                          and (d == torch.bfloat16 or d.itemsize == 1))


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu", copy=True)
    if t.dtype in _NOT_IN_NUMPY:
        t = t.float()
    return t.resolve_conj().resolve_neg().numpy()


def to_numpy(value: Any) -> Any:
    """Detached copies as numpy arrays (bfloat16 and float8 become float32)."""
    return _mapped(_numpy, value)


def _python(t: torch.Tensor) -> Any:
    t = t.detach()
    return t.item() if t.ndim == 0 else t.cpu().tolist()


def to_python(value: Any) -> Any:
    """Python numbers (0-d tensors) and nested lists (others), for JSON logs and printing."""
    return _mapped(_python, value)
