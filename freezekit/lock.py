"""Eval locks: modules that stay in eval mode whatever ``model.train()`` asks.

A lock is an :class:`EvalLock` object installed as the module's own ``train`` attribute, so
``model.train()`` reaches it through the usual recursion: the module's children still follow the
call, the module itself stays in eval mode. Being a plain attribute of the module, the lock
survives ``copy.deepcopy`` and pickling, and needs no hook.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

__all__ = ["EvalLock", "asked", "is_locked", "lock", "lock_all", "mode_above", "unlock"]


class EvalLock:
    """The ``train`` of a locked module (made by :func:`lock`). Remembers the mode last asked of it,
    and any instance-level ``train`` it replaced, for :func:`unlock`."""

    __slots__ = ("asked", "module", "previous")

    def __init__(self, module: nn.Module):
        self.module, self.asked, self.previous = module, module.training, module.__dict__.get("train")

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.asked = mode
        if self.previous is not None:
            self.previous(mode)
        else:
            type(self.module).train(self.module, mode)  # the class's train: children follow
        self.module.__dict__["training"] = False
        return self.module

    def __repr__(self) -> str:
        return f"EvalLock({type(self.module).__name__}, asked={'train' if self.asked else 'eval'})"


def is_locked(module: nn.Module) -> bool:
    """True if ``module`` is eval-locked."""
    return isinstance(module.__dict__.get("train"), EvalLock)


def asked(module: nn.Module) -> bool:
    """The mode last asked of ``module``: its own, or, if it is locked, the one its lock remembers."""
    current = module.__dict__.get("train")
    return current.asked if isinstance(current, EvalLock) else module.training


def lock(module: nn.Module, existing: EvalLock | None = None) -> EvalLock:
    """Lock ``module`` in eval mode (modifies it in place); ``existing`` re-installs a removed lock."""
    if existing is None:
        existing = EvalLock(module)
    existing.asked = module.training  # the module followed the model while it was unlocked
    # Plain attribute writes: nn.Module.__setattr__ has nothing to do for these and costs 5x more.
    module.__dict__["train"] = existing
    module.__dict__["training"] = False
    return existing


def lock_all(modules: Iterable[nn.Module]) -> None:
    """Lock each of ``modules`` in eval mode (modifies them in place): :func:`lock`, as one loop."""
    for module in modules:
        state = module.__dict__
        state["train"] = EvalLock(module)
        state["training"] = False


def unlock(module: nn.Module, mode: bool | None = None) -> EvalLock:
    """Remove ``module``'s lock; it takes ``mode``, by default the mode last asked of it. Returns
    the removed lock."""
    current = module.__dict__["train"]
    if current.previous is not None:
        module.__dict__["train"] = current.previous
    else:
        del module.__dict__["train"]
    module.__dict__["training"] = current.asked if mode is None else mode
    return current


def mode_above(ancestors: Iterable[nn.Module]) -> bool | None:
    """The mode the model is in at a place: the ``training`` flag of the nearest of ``ancestors``
    (nearest first) that is not eval-locked; None if there is none.

    This, not what a lock remembers, is what a released module must take: loops such as
    Lightning's put modes back by writing ``module.training`` directly after ``model.eval()``, so
    the mode a lock last saw asked can be stale.
    """
    for module in ancestors:
        if not is_locked(module):
            return module.training
    return None
