"""Mapping a function over the tensors of nested values.

The structures freezekit walks -- module inputs and outputs, values to log, targets -- are any
nesting of dict, list, tuple, namedtuple and dataclass. :func:`tree_map` rebuilds the same
structure (same types, same keys) with ``fn`` applied to every tensor; everything else is kept
as it is, by reference.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["tree_map"]


def tree_map(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to each tensor inside it, structure and types kept.

    Example:
        >>> import torch
        >>> tree_map(lambda t: t * 2, {"a": [torch.tensor(1.0)], "b": "text"})
        {'a': [tensor(2.)], 'b': 'text'}
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        items = [tree_map(fn, v) for v in value]
        return items if type(value) is list else _rebuilt(value, items)
    if isinstance(value, tuple):
        items = [tree_map(fn, v) for v in value]
        if type(value) is tuple:
            return tuple(items)
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items)
        return _rebuilt(value, items)
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps OrderedDict, defaultdict, ModelOutput-style subclasses
        for key, v in value.items():
            out[key] = tree_map(fn, v)
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = copy.copy(value)
        for field in dataclasses.fields(value):
            object.__setattr__(out, field.name, tree_map(fn, getattr(value, field.name)))
        return out
    return value


def _rebuilt(value: Any, items: list) -> Any:
    try:
        return type(value)(items)
    except TypeError:  # a sequence type that cannot be built from an iterable: plain container
        return tuple(items) if isinstance(value, tuple) else items
