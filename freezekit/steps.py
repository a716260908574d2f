"""Steps: the changes a :class:`~freezekit.plan.Plan` makes to a model, each carrying its targets.

``Applied`` performs a plan's steps in order and undoes the performed ones in reverse; each step
knows how to undo itself. A step carries the objects it changes (parameters, modules, the slots
that hold a module), so applying reads nothing but the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from . import boundary as _boundary
from . import lock as _lock
from .norm import FrozenBatchNorm, original_of

__all__ = ["AddBoundary", "Lock", "Release", "SetAttribute", "SetRequiresGrad", "Step", "Swap"]

UNSET: Any = object()  # SetAttribute: the attribute is absent


class Step:
    """One change to a model: :meth:`apply` makes it, :meth:`undo` reverses it."""

    def apply(self) -> None:
        raise NotImplementedError

    def undo(self) -> None:
        raise NotImplementedError


@dataclass
class Swap(Step):
    """Put ``new`` in every slot ``(holder, key)`` that holds ``old``: a BatchNorm for its frozen
    replacement, or back. A boundary belongs to the place: the module that takes over keeps it."""

    old: nn.Module
    new: nn.Module
    slots: list[tuple[nn.Module, str]]
    above: list[nn.Module] = field(default_factory=list)  # the modules above the place, nearest first
    _carried: list[_boundary.Boundary] = field(default_factory=list, repr=False)

    def apply(self) -> None:  # undone whole, also where it failed midway
        if isinstance(self.old, FrozenBatchNorm):  # hand back the tensors it holds now (model.to(...) since)
            mode = _lock.mode_above(self.above)  # and the mode the model is in here
            original_of(self.old).train(_lock.asked(self.old) if mode is None else mode)
        for holder, key in self.slots:
            holder._modules[key] = self.new
        have = {(b.at, b.no_grad) for b in _boundary.boundaries(self.new)}
        for b in reversed(_boundary.boundaries(self.old)):
            if (b.at, b.no_grad) not in have:
                self._carried.append(_boundary.add(self.new, b.at, b.no_grad))

    def undo(self) -> None:
        while self._carried:
            _boundary.remove(self.new, self._carried.pop())
        if isinstance(self.new, FrozenBatchNorm):
            original_of(self.new)
        else:  # the frozen module goes back: it takes the tensors and the mode its original has now
            _sync_into(self.old, self.new)
        for holder, key in self.slots:
            holder._modules[key] = self.old


def _sync_into(frozen_module: FrozenBatchNorm, original: nn.Module) -> None:
    frozen_module.train(_lock.asked(original))
    for name in list(frozen_module._parameters):
        frozen_module._parameters[name] = original._parameters.get(name)
    for name in list(frozen_module._buffers):
        frozen_module._buffers[name] = original._buffers.get(name)


@dataclass
class SetRequiresGrad(Step):
    """Set ``requires_grad`` of ``params`` to ``value``; freezing also drops their ``.grad`` (nothing
    frozen keeps a stale gradient). ``was`` holds each flag as apply found it; undo puts it back (a
    dropped gradient stays dropped)."""

    params: list[nn.Parameter]
    value: bool
    was: list[bool] | None = field(default=None, repr=False)

    def apply(self) -> None:
        self.was = []
        for p in self.params:  # one pass: each tensor is read and changed while it is at hand
            self.was.append(p.requires_grad)
            p.requires_grad = self.value
            if not self.value and p.grad is not None:
                p.grad = None

    def undo(self) -> None:
        for p, was in zip(self.params, self.was or ()):
            p.requires_grad = was


@dataclass
class Lock(Step):
    """Eval-lock ``modules``."""

    modules: list[nn.Module]

    def apply(self) -> None:
        _lock.lock_all(self.modules)

    def undo(self) -> None:
        for module in reversed(self.modules):
            if _lock.is_locked(module):
                _lock.unlock(module)


@dataclass
class Release(Step):
    """Release the eval locks of ``modules`` (outer ones first); each takes the mode the model is in
    at its place (:func:`~freezekit.lock.mode_above` of its ``above``: the modules above it,
    nearest first), or, with no unlocked module above it, the mode last asked of it."""

    modules: list[nn.Module]
    above: list[list[nn.Module]]
    _removed: list[_lock.EvalLock] = field(default_factory=list, repr=False)

    def apply(self) -> None:
        for module, above in zip(self.modules, self.above):
            self._removed.append(_lock.unlock(module, _lock.mode_above(above)))

    def undo(self) -> None:
        while self._removed:
            _lock.lock(self.modules[len(self._removed) - 1], self._removed.pop())


@dataclass
class AddBoundary(Step):
    """Install a gradient boundary on ``module``."""

    module: nn.Module
    at: str
    no_grad: bool
    _installed: _boundary.Boundary | None = field(default=None, repr=False)

    def apply(self) -> None:
        self._installed = _boundary.add(self.module, self.at, self.no_grad)

    def undo(self) -> None:
        if self._installed is not None:
            _boundary.remove(self.module, self._installed)
            self._installed = None


@dataclass
class SetAttribute(Step):
    """Set an instance attribute of ``owner`` (``value`` :data:`UNSET`: remove it)."""

    owner: nn.Module
    name: str
    value: Any
    _before: Any = field(default=UNSET, repr=False)

    def apply(self) -> None:
        self._before = self.owner.__dict__.get(self.name, UNSET)
        _set(self.owner, self.name, self.value)

    def undo(self) -> None:
        _set(self.owner, self.name, self._before)


def _set(owner: nn.Module, name: str, value: Any) -> None:
    if value is UNSET:
        owner.__dict__.pop(name, None)
    else:
        owner.__dict__[name] = value
