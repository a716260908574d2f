"""Mapping a function over the tensors of nested values.

The structures freezekit walks -- module inputs and outputs, values to log, targets -- are any
nesting of dict, list, tuple, namedtuple and dataclass. :func:`tree_map` rebuilds the same
structure (same types, same keys) with ``fn`` applied to every tensor; everything else is kept
as it is, by reference. It stays traceable by ``torch.compile`` for the usual containers, so a
gradient boundary adds no graph break.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["NOT_A_CONTAINER", "rebuilt", "tree_map"]

_Tensor = torch.Tensor


def tree_map(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to each tensor inside it, structure and types kept.

    Example:
        >>> import torch
        >>> tree_map(lambda t: t * 2, {"a": [torch.tensor(1.0)], "b": "text"})
        {'a': [tensor(2.)], 'b': 'text'}
    """
    if isinstance(value, _Tensor):
        return fn(value)
    kind = type(value)
    if kind is dict:  # the common containers first, each item's tensor test inline
        return {k: fn(v) if isinstance(v, _Tensor) else tree_map(fn, v) for k, v in value.items()}
    if kind is list:
        return [fn(v) if isinstance(v, _Tensor) else tree_map(fn, v) for v in value]
    if kind is tuple:
        return tuple([fn(v) if isinstance(v, _Tensor) else tree_map(fn, v) for v in value])
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    out = rebuilt(value, lambda v: tree_map(fn, v))
    return value if out is NOT_A_CONTAINER else out


NOT_A_CONTAINER: Any = object()  # what rebuilt() returns for anything else


def rebuilt(value: Any, each: Callable[[Any], Any]) -> Any:
    """``value`` rebuilt with ``each`` applied to each item, if it is a dataclass, tuple (namedtuple
    included), list or dict, with the same type and keys; else :data:`NOT_A_CONTAINER`."""
    kind = type(value)
    # a dataclass instance, as dataclasses.is_dataclass tells it; before dict: ModelOutput is both
    if hasattr(kind, "__dataclass_fields__"):
        return _dataclass(each, value)
    if isinstance(value, tuple):
        items = [each(v) for v in value]
        return kind(*items) if hasattr(value, "_fields") else _sequence(value, items)  # namedtuple, or other
    if isinstance(value, list):
        return _sequence(value, [each(v) for v in value])
    if isinstance(value, dict):
        items = [(key, each(v)) for key, v in value.items()]
        if kind is OrderedDict:  # named as such, so that torch.compile can trace it
            return OrderedDict(items)
        try:
            return kind(items)
        except TypeError:  # defaultdict and others whose constructor wants more
            out = copy.copy(value)
            out.update(items)
            return out
    return NOT_A_CONTAINER


def _dataclass(each: Callable[[Any], Any], value: Any) -> Any:
    fields = dataclasses.fields(value)
    mapped = {f.name: each(getattr(value, f.name)) for f in fields}
    try:
        out = type(value)(**{f.name: mapped[f.name] for f in fields if f.init})
        rest = [f.name for f in fields if not f.init]
    except TypeError:  # an __init__ that takes more than the fields (InitVar)
        out, rest = copy.copy(value), list(mapped)
    for name in rest:
        object.__setattr__(out, name, mapped[name])
    return out


def _sequence(value: Any, items: list) -> Any:
    try:
        return type(value)(items)
    except TypeError:  # a sequence type that cannot be built from an iterable: plain container
        return tuple(items) if isinstance(value, tuple) else items
