"""The optimizers freezekit knows about, per model: so that nothing that starts training is silently
left out of them, and so that a resume in the wrong order says how to fix it.

An optimizer becomes known when it is passed to :func:`track_optimizer`, :func:`~freezekit.sync_optimizer`
or a :class:`~freezekit.Schedule`. Then:

- a :meth:`Policy.apply <freezekit.Policy.apply>` or a schedule phase that makes parameters
  trainable which a known optimizer does not hold warns (:class:`~freezekit.FreezekitWarning`):
  they would get gradients and never move;
- ``optimizer.load_state_dict`` of a state whose parameter groups differ from the optimizer's
  raises a :class:`~freezekit.StateError` that names the fix (replay the schedule first), where
  torch would say only "loaded state dict has a different number of parameter groups".

Example:
    >>> import torch, timm, warnings, freezekit as fk
    >>> model = timm.create_model("test_resnet", pretrained=False)
    >>> _ = fk.Policy(fk.freeze("*"), fk.unfreeze("fc")).apply(model)
    >>> optimizer = fk.track_optimizer(torch.optim.SGD(fk.param_groups(model, lr=0.1)), model)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = fk.Policy(fk.unfreeze("layer4")).apply(model)
    >>> "does not hold" in str(caught[0].message)
    True
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from .errors import FreezekitWarning, StateError, some
from .index import unwrap

__all__ = ["track_optimizer", "warn_unheld"]

# The optimizers known for each model (by its unwrapped root). Both sides are weak: tracking keeps
# neither a model nor an optimizer alive.
_known: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[torch.optim.Optimizer]] = weakref.WeakKeyDictionary()
_hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()  # those whose load_state_dict is checked


def track_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Let freezekit know that ``optimizer`` trains ``model``; returns ``optimizer``.

    Policies and schedule phases applied to ``model`` then warn when they make parameters trainable
    that ``optimizer`` does not hold, and ``optimizer.load_state_dict`` of a state with other
    parameter groups raises an error that names the fix.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"track_optimizer(): optimizer: expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    _known.setdefault(unwrap(model), weakref.WeakSet()).add(optimizer)
    if optimizer not in _hooked:
        _hooked.add(optimizer)
        optimizer.register_load_state_dict_pre_hook(_check_groups)
    return optimizer


def warn_unheld(model: nn.Module, made_trainable: Callable[[], Iterable[tuple[str, nn.Parameter]]],
                what: Callable[[], str], stacklevel: int = 3) -> None:
    """Warn for each known optimizer of ``model`` that does not hold all the ``(name, parameter)``
    pairs ``made_trainable()`` gives, which ``what()`` just made trainable. Both are called only when
    ``model`` has a known optimizer: most applies have none, and describing a policy costs a tenth
    of applying it to a 2,000-tensor model."""
    known = _known.get(unwrap(model))
    if not known:
        return
    params = list(made_trainable())
    for optimizer in list(known):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in params if id(p) not in held]
        if missing:
            warnings.warn(f"{what()} made {len(missing)} parameters trainable that the {type(optimizer).__name__} "
                          f"does not hold ({some(missing, 3)}): they get gradients but never move. Call "
                          "fk.sync_optimizer(optimizer, model) after it, or pass the optimizer to the schedule",
                          FreezekitWarning, stacklevel=stacklevel)


def _check_groups(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``load_state_dict`` pre-hook: refuse a state whose parameter groups do not line up, naming the
    likely cause (the saved run was further into its schedule) and the fix."""
    saved = [len(g["params"]) for g in state.get("param_groups", [])]
    mine = [len(g["params"]) for g in optimizer.param_groups]
    if saved == mine:
        return
    raise StateError(
        f"{type(optimizer).__name__}.load_state_dict: the saved optimizer has {len(saved)} parameter groups "
        f"of {saved} parameters, this one {len(mine)} of {mine}. If the saved run had applied freezekit "
        "phases that this one has not yet, replay them before loading the optimizer: "
        "schedule.load_state_dict(saved_schedule); schedule.replay(model, optimizer); then "
        "optimizer.load_state_dict(saved_optimizer) (or fk.load_state(model, saved_freeze_state) and "
        "fk.sync_optimizer(optimizer, model) first)")
