"""Detaching values: for logging, targets and snapshots, without keeping graphs alive.

Each helper takes a tensor or any nesting of dict / list / tuple / namedtuple / dataclass (a Hugging
Face ``ModelOutput`` included) and returns the same structure, with the same types; what holds no
tensor passes through untouched, by reference.

Other objects holding tensors -- a Hugging Face ``DynamicCache`` and its layers, any library's cache
-- are walked through their ``__dict__``: the object is shallow-copied (``copy.copy``) and each
attribute that holds tensors is replaced by its mapped value, the rest shared with the original,
which is left as it was. An object met twice, or in a cycle, is copied once.

What cannot be walked raises ``TypeError`` naming its type, rather than coming back still attached:
a ``torch.nn.Module`` or optimizer (not a value: pass its ``state_dict()``), tensors as dict keys,
and objects holding tensors outside their ``__dict__`` (``__slots__``, sets, deques,
``functools.partial``, C-level state) or that ``copy.copy`` refuses. Types, modules, functions and
numpy arrays are never looked into (tensors a function captures are not seen).

Example:
    >>> import torch, freezekit as fk
    >>> w = torch.tensor([1.5, 2.5], requires_grad=True)
    >>> fk.to_python({"loss": (w * 2).sum(), "step": 3})
    {'loss': 8.0, 'step': 3}
"""

from __future__ import annotations

import copy
import gc
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .tree import NOT_A_CONTAINER, rebuilt

__all__ = ["detached", "stop_gradient", "to_cpu", "to_numpy", "to_python"]

_ATOMS = frozenset({str, int, float, bool, complex, bytes, type(None)})
# Never looked into: types, modules and functions lead to whole namespaces; arrays hold no graph.
_OPAQUE = (str, bytes, type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.FrameType, np.ndarray, np.generic, torch.dtype, torch.device)
# They hold tensors but are not values: a copy of one would be a different, broken thing.
_NOT_VALUES = (torch.nn.Module, torch.optim.Optimizer)
_HOW = "pass the tensors you need in a dict, list, tuple or dataclass instead"


def _holds_tensor(value: Any, seen: set[int]) -> bool:
    """Whether a tensor is reachable from ``value``, through what the garbage collector sees."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, _OPAQUE) or id(value) in seen:
        return False
    seen.add(id(value))
    return any(_holds_tensor(v, seen) for v in gc.get_referents(value))


class _Walk:
    """One call of a helper: ``fn`` applied to each tensor in a value; each object copied once."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], helper: str):
        self.fn, self.helper, self.copies = fn, helper, {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.fn(value)
        kind = type(value)
        if kind in _ATOMS:
            return value
        fn, tensor = self.fn, torch.Tensor
        if kind is list:  # the common containers first, each item's tensor test inline (as tree_map does)
            return [fn(v) if isinstance(v, tensor) else self(v) for v in value]
        if kind is dict and all(type(key) is str for key in value):
            return {key: fn(v) if isinstance(v, tensor) else self(v) for key, v in value.items()}
        if isinstance(value, dict) and any(_holds_tensor(key, set()) for key in value):
            raise self._fail(value, "it has tensors as keys", "key it by names instead")
        out = rebuilt(value, self)
        return self._object(value) if out is NOT_A_CONTAINER else out

    def _fail(self, value: Any, why: str, how: str = _HOW) -> TypeError:
        kind = type(value)
        return TypeError(f"fk.{self.helper}(): cannot walk a {kind.__module__}.{kind.__qualname__}: {why}; {how}")

    def _object(self, value: Any) -> Any:
        """A copy of ``value`` with the attributes that hold tensors mapped, or ``value`` without tensors."""
        if id(value) in self.copies:
            return self.copies[id(value)]
        if not _holds_tensor(value, set()):
            return value
        if isinstance(value, _NOT_VALUES):
            raise self._fail(value, "it is not a value", "pass its state_dict(), or the tensors you need")
        state = getattr(value, "__dict__", None)
        state = state if type(state) is dict else {}
        inside = {id(state), *map(id, state.values())}
        if any(_holds_tensor(v, set()) for v in gc.get_referents(value) if id(v) not in inside):
            raise self._fail(value, "it holds tensors outside its __dict__ (in __slots__, items or C-level state)")
        try:
            out = copy.copy(value)
        except Exception as err:
            raise self._fail(value, f"copy.copy() failed ({err})") from err
        if out is value or getattr(out, "__dict__", None) is state:
            raise self._fail(value, "copy.copy() returns it, or an object sharing its __dict__")
        self.copies[id(value)] = out  # before its attributes: a cycle back to it finds the copy
        for name, v in state.items():
            if _holds_tensor(v, set()):
                vars(out)[name] = self(v)
        return out


def _mapped(fn: Callable[[torch.Tensor], Any], value: Any, helper: str) -> Any:
    return _Walk(fn, helper)(value)


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
        return _mapped(_detach, value, "detached")
    with torch.no_grad():
        return _mapped(_copy, value, "detached")


def stop_gradient(value: Any) -> Any:
    """``detach()`` without a copy: the result shares storage with ``value`` (and sees its in-place
    changes). For targets that are not modified in place; cheaper than :func:`detached`."""
    return _mapped(_detach, value, "stop_gradient")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", copy=True)


def to_cpu(value: Any) -> Any:
    """Detached copies on the CPU (a copy even of CPU tensors, so logs never change afterwards)."""
    with torch.no_grad():
        return _mapped(_cpu, value, "to_cpu")


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
    return _mapped(_numpy, value, "to_numpy")


def _python(t: torch.Tensor) -> Any:
    t = t.detach()
    return t.item() if t.ndim == 0 else t.cpu().tolist()


def to_python(value: Any) -> Any:
    """Python numbers (0-d tensors) and nested lists (others), for JSON logs and printing."""
    return _mapped(_python, value, "to_python")
