"""Mapping a function over the tensors of nested values.

The structures freezekit walks -- module inputs and outputs, values to log, targets -- are any
nesting of dict, list, tuple, namedtuple and dataclass. :func:`tree_map` rebuilds the same
structure (same types, same keys) with ``fn`` applied to every tensor; everything else is kept
as it is, by reference.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # before dict: ModelOutput is both
        return _dataclass(fn, value)
    if isinstance(value, dict):
        items = [(key, tree_map(fn, v)) for key, v in value.items()]
        if type(value) is dict:
            return dict(items)
        if type(value) is OrderedDict:  # named as such, so that torch.compile can trace it
            return OrderedDict(items)
        try:
            return type(value)(items)  # OrderedDict and kin, rebuilt the way torch.compile can trace
        except TypeError:  # defaultdict and others whose constructor wants more
            out = copy.copy(value)
            out.update(items)
            return out
    return value


def _dataclass(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    fields = dataclasses.fields(value)
    mapped = {f.name: tree_map(fn, getattr(value, f.name)) for f in fields}
    try:
        out = type(value)(**{f.name: mapped[f.name] for f in fields if f.init})
        rest = [f for f in fields if not f.init]
    except TypeError:  # an __init__ that takes more than the fields (InitVar)
        out, rest = copy.copy(value), fields
    for f in rest:
        object.__setattr__(out, f.name, mapped[f.name])
    return out


def _rebuilt(value: Any, items: list) -> Any:
    try:
        return type(value)(items)
    except TypeError:  # a sequence type that cannot be built from an iterable: plain container
        return tuple(items) if isinstance(value, tuple) else items
