"""What a framework integration does, in loop-neutral terms: the duties a hand-written loop has
when it uses a policy and a schedule, each a call of the library.

The framework adapters (:mod:`.lightning`, :mod:`.transformers`) only decide *when* to call these:
:meth:`LoopDriver.start` before the optimizer is built, :meth:`LoopDriver.advance` at epoch and step
boundaries, :meth:`LoopDriver.resume` after the optimizer is built and before its state is loaded,
:meth:`LoopDriver.check_in_sync` after every change of what trains and at the end.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..ddp import out_of_sync
from ..errors import FreezekitError, StateError
from ..freeze_state import State, state
from ..policy import Policy
from ..schedule import Event, Schedule
from ..select import Selector
from ..tracking import track_optimizer

__all__ = ["LoopDriver"]

VERSION = 1


class LoopDriver:
    """A starting policy and a schedule, carried through a framework's loop.

    Args:
        policy: applied once, before the optimizer is built: a :class:`~freezekit.Policy` or a
            recipe's ``policy`` section (a list of rule mappings).
        schedule: phases applied as epochs and steps go by, each synced into the optimizer and its
            LR scheduler: a :class:`~freezekit.Schedule` or a recipe's ``schedule`` section.
        rules, layer_decay: how parameters that join the optimizer later are grouped, as
            :func:`~freezekit.param_groups` grouped the others (see :func:`~freezekit.sync_optimizer`).
    """

    def __init__(self, policy: Policy | list | None = None, schedule: Schedule | list | dict | None = None,
                 rules: list[tuple[Selector | str, dict[str, float]]] | tuple = (), layer_decay: float | None = None):
        self.policy = policy if policy is None or isinstance(policy, Policy) else Policy.from_config(policy)
        self.schedule = schedule if schedule is None or isinstance(schedule, Schedule) else \
            Schedule.from_config(schedule)
        if self.policy is None and self.schedule is None:
            raise TypeError("pass a policy, a schedule or both")
        self.groups: dict[str, Any] = {"rules": rules, "layer_decay": layer_decay}
        self.events: list[Event] = []  # the phases applied (and replayed), in order
        self.sync_checks: list[dict[str, Any]] = []  # under torch.distributed: each in-sync check, and its result
        self._saved: State | None = None  # the freeze map a loaded checkpoint had: what a resume must rebuild

    def start(self, model: nn.Module) -> None:
        """Apply the starting policy (before the optimizer is built over what trains), and match every
        phase's patterns now (a typo in a late phase would stop the run when it comes). On a second
        ``fit``, the phases the first one applied are replayed into its new optimizer."""
        if self.policy is not None:
            self.policy.apply(model)
        if self.schedule is not None:
            self.schedule.check(model)
            if self.schedule.completed:
                self.schedule.load_state_dict(self.schedule.state_dict())

    def advance(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any = None,
                epoch: int | None = None, step: int | None = None) -> bool:
        """Apply the phases due at ``epoch`` / ``step``, synced into ``optimizer`` and ``scheduler``;
        True if what trains changed (a DDP wrapper must then be rebuilt)."""
        if self.schedule is None or not (self.schedule.due(epoch, step) or self.schedule.replay_pending):
            return False  # the common case, every batch: nothing to do
        if optimizer is not None:
            track_optimizer(optimizer, model)
        before = _trainable(model)
        self.events += self.schedule.update(model, optimizer, epoch=epoch, step=step, scheduler=scheduler,
                                            **self.groups)
        return _trainable(model) != before

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any = None) -> bool:
        """After :meth:`load_state_dict`, on the freshly built model and optimizer, before the optimizer's
        state is loaded: replay the phases the checkpoint had applied, and check that the model now
        carries the checkpoint's freeze map. True if what trains changed."""
        if optimizer is not None:
            track_optimizer(optimizer, model)
        before = _trainable(model)
        if self.schedule is not None:
            self.events += self.schedule.replay(model, optimizer, scheduler, **self.groups)
        if self._saved is not None and state(model) != self._saved:
            raise StateError("resuming: after the schedule's replay the model's freeze map is not the one the "
                             f"checkpoint saved.\n  now: {state(model)}\n  saved: {self._saved}\nWas the policy "
                             "or the schedule changed since the checkpoint?")
        self._saved = None
        return _trainable(model) != before

    def check_in_sync(self, model: nn.Module, when: str) -> None:
        """Under torch.distributed (a collective: every rank calls it): record whether every rank holds
        the same trainable parameters, and raise if not."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        first = out_of_sync(model)
        self.sync_checks.append({"after": when, "ranks_in_sync": first is None})
        if first is not None:
            raise FreezekitError(f"ranks out of sync after {when}: {first} differs between ranks")

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        return {"version": VERSION, "schedule": None if self.schedule is None else self.schedule.state_dict(),
                "freeze": state(model).to_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take a checkpoint's state; :meth:`resume` then rebuilds it."""
        if not isinstance(saved, dict) or saved.get("version") != VERSION:
            raise StateError(f"expected a state saved by a freezekit integration (version {VERSION}), "
                             f"got {saved!r:.200}")
        if self.schedule is not None and saved.get("schedule") is not None:
            self.schedule.load_state_dict(saved["schedule"])
        self._saved = State.from_dict(saved["freeze"])


def _trainable(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}
