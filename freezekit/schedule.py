"""Phases that change what trains during a run, applied once, in order, and resumable.

A :class:`Phase` is a policy that becomes due at an epoch or a step; a :class:`Schedule` applies
the phases that are due, each once and in order (catching up when a trigger was skipped), and
syncs the optimizer after each (new parameters join once, at ``lr_mult`` times the base rate).
``state_dict()`` records how many phases are done; after ``load_state_dict()`` on a fresh model
and optimizer, the next ``update()`` (or an explicit ``replay()``) first re-applies those phases,
so the optimizer's groups line up before ``optimizer.load_state_dict()``.

Example:
    >>> import torch, timm, freezekit as fk
    >>> model = timm.create_model("test_resnet", pretrained=False)
    >>> schedule = fk.Schedule(
    ...     fk.Phase(0, fk.Policy(fk.freeze("*"), fk.unfreeze("fc"))),               # linear probe
    ...     fk.Phase(2, fk.Policy(fk.unfreeze(fk.last("layer", 1))), lr_mult=0.1),   # then the last stage
    ... )
    >>> [e.phase for e in schedule.update(model, epoch=0)]  # first: the optimizer is built over what trains
    [0]
    >>> optimizer = torch.optim.AdamW(fk.param_groups(model, lr=1e-3))
    >>> [str(e) for e in schedule.update(model, optimizer, epoch=2)][0].startswith("phase 1 at epoch 2")
    True
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError, FreezekitWarning, NoMatchError
from .optim import SyncReport, sync_optimizer
from .policy import Policy
from .rules import did_you_mean, unfreeze
from .select import Selector
from .select_config import from_config as selector_from_config
from .tracking import warn_unheld

__all__ = ["Event", "Phase", "Schedule", "gradual_unfreeze"]

UNITS = ("epoch", "step")


@dataclass(frozen=True)
class Phase:
    """A policy that becomes due at ``at`` (an epoch or a step, by ``unit``); the parameters it
    makes trainable join the optimizer at ``lr_mult`` times the base learning rate."""

    at: int
    policy: Policy
    unit: str = "epoch"
    lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.at, bool) or not isinstance(self.at, int) or self.at < 0:
            raise ValueError(f"Phase(): at: expected an epoch or step number >= 0, got {self.at!r}")
        if not isinstance(self.policy, Policy):
            raise TypeError(f"Phase(): policy: expected a freezekit Policy, got {type(self.policy).__name__}")
        if self.unit not in UNITS:
            raise ValueError(f"Phase(): unit: expected 'epoch' or 'step', got {self.unit!r}")
        if isinstance(self.lr_mult, bool) or not isinstance(self.lr_mult, (int, float)) or \
                not 0 < self.lr_mult < math.inf:
            raise ValueError(f"Phase(): lr_mult: expected a positive finite number, got {self.lr_mult!r}")

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at, "policy": self.policy.to_config()}
        if self.unit != "epoch":
            out["unit"] = self.unit
        if self.lr_mult != 1.0:
            out["lr_mult"] = self.lr_mult
        return out


@dataclass
class Event:
    """A phase that :meth:`Schedule.update` applied (or replayed)."""

    phase: int
    at: int
    unit: str
    changes: int  # flags, locks, swaps and boundaries the policy changed
    sync: SyncReport = field(default_factory=SyncReport)
    replayed: bool = False

    def __str__(self) -> str:
        what = "replayed" if self.replayed else f"{self.changes} changes"
        return f"phase {self.phase} at {self.unit} {self.at}: {what}; optimizer: {self.sync}"


class Schedule:
    """Phases applied once each, in order, as epochs and steps go by."""

    def __init__(self, *phases: Phase):
        for i, phase in enumerate(phases):
            if not isinstance(phase, Phase):
                raise TypeError(f"Schedule() argument {i + 1}: expected a Phase, got {type(phase).__name__}")
        self.phases: tuple[Phase, ...] = phases
        self.completed = 0  # phases applied so far (they apply in order)
        self._replay = 0  # phases to re-apply on the next update, after load_state_dict

    def __len__(self) -> int:
        return len(self.phases)

    def __repr__(self) -> str:
        return f"Schedule({', '.join(f'{p.unit} {p.at}' for p in self.phases)}; {self.completed} done)"

    @property
    def replay_pending(self) -> int:
        """Phases a loaded state says were done that the next :meth:`update` or :meth:`replay` re-applies."""
        return self._replay

    def due(self, epoch: int | None = None, step: int | None = None) -> list[int]:
        """Indices of the phases not yet applied whose trigger has come, in order."""
        out = []
        for i in range(self.completed, len(self.phases)):
            phase = self.phases[i]
            now = epoch if phase.unit == "epoch" else step
            if now is None or phase.at > now:
                break  # in order: a later phase waits for an earlier one
            out.append(i)
        return out

    def replay(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
               **groups: Any) -> list[Event]:
        """Re-apply the phases a loaded state says were done, onto a freshly built model and optimizer."""
        events = []
        for i in range(self._replay):
            events.append(self._apply(i, model, optimizer, scheduler, groups, replayed=True))
        self._replay = 0
        return events

    def update(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, epoch: int | None = None,
               step: int | None = None, scheduler: Any = None, **groups: Any) -> list[Event]:
        """Apply the phases that are due at ``epoch`` / ``step`` (modifies ``model`` and ``optimizer``
        in place); first replays what a loaded state says was done. Returns what happened.

        ``groups`` (``rules=``, ``layer_decay=``) go to :func:`sync_optimizer`, so that parameters
        that join later get the rates :func:`param_groups` gave the others.
        """
        if epoch is None and step is None:
            raise TypeError("Schedule.update(): pass epoch=..., step=... or both")
        for name, value in (("epoch", epoch), ("step", step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor))):
                raise TypeError(f"Schedule.update(): {name}: expected a number or None, got {type(value).__name__} "
                                f"{value!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Schedule.update(): optimizer: expected a torch.optim.Optimizer or None, got "
                            f"{type(optimizer).__name__}")
        events = self.replay(model, optimizer, scheduler, **groups)
        for i in self.due(epoch, step):
            events.append(self._apply(i, model, optimizer, scheduler, groups))
            self.completed = i + 1
        return events

    def _apply(self, i: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any,
               groups: dict[str, Any], replayed: bool = False) -> Event:
        phase = self.phases[i]
        watch = optimizer is not None and phase.lr_mult != 1.0 and not replayed  # can lr_mult miss some?
        held = {id(p) for g in optimizer.param_groups for p in g["params"]} if watch else set()
        applied = phase.policy.apply(model, check_optimizers=False)  # for good: the handle is not kept
        report = sync_optimizer(optimizer, model, lr_mult=phase.lr_mult, scheduler=scheduler, **groups) \
            if optimizer is not None else SyncReport()
        kept = [name for name, p in applied.made_trainable() if id(p) in held] if watch else []
        if kept:
            warnings.warn(f"schedule phase {i} ({phase.unit} {phase.at}): its lr_mult {phase.lr_mult} does not reach "
                          f"{len(kept)} parameters the {type(optimizer).__name__} held while they were frozen "
                          f"({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}): they train at their group's "
                          "rate. Build the optimizer over what trains (fk.param_groups), and the phase adds them",
                          FreezekitWarning, stacklevel=4)
        warn_unheld(model, applied.made_trainable, lambda: f"schedule phase {i} ({phase.unit} {phase.at})",
                    stacklevel=4)
        return Event(i, phase.at, phase.unit, len(applied.changes), report, replayed)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "completed": self.completed, "phases": len(self.phases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress; the next :meth:`update` re-applies the completed phases first."""
        if not isinstance(state, dict) or state.get("version") != 1 or not isinstance(state.get("completed"), int):
            raise ConfigError(f"Schedule.load_state_dict(): expected a state from Schedule.state_dict(), got {state!r}")
        if state.get("phases") not in (None, len(self.phases)) or not 0 <= state["completed"] <= len(self.phases):
            raise ConfigError(f"Schedule.load_state_dict(): the state is of a schedule with {state.get('phases')} "
                              f"phases ({state['completed']} done); this one has {len(self.phases)}")
        self.completed = self._replay = state["completed"]

    def check(self, model: nn.Module) -> None:
        """Match every phase's selectors in ``model`` now, before the run, not when the phase comes
        (names do not change as phases apply).

        Raises:
            NoMatchError: every selector of every phase that matched nothing, named
                ``schedule[i].policy[j]``.
        """
        problems = []
        for i, phase in enumerate(self.phases):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # what a phase would do now is not what it will do
                    phase.policy.plan(model)
            except NoMatchError as e:
                problems += [re.sub(r"^policy", f"schedule[{i}].policy", line) for line in e.problems]
        if problems:
            raise NoMatchError(problems)

    def to_config(self) -> list[dict[str, Any]]:
        return [phase.to_config() for phase in self.phases]

    @classmethod
    def from_config(cls, config: Any, where: str = "schedule") -> Schedule:
        """A schedule from its recipe form: a list of ``{at, policy, unit, lr_mult}`` or
        ``{gradual_unfreeze: {groups: [...], start: 1, every: 1}}``."""
        if isinstance(config, dict) and set(config) == {"gradual_unfreeze"}:
            options = config["gradual_unfreeze"]
            here = f"{where}.gradual_unfreeze"
            if not isinstance(options, dict) or "groups" not in options:
                raise ConfigError(f"{here}: expected {{groups: [...], start: 1, every: 1}}, got {options!r}")
            unknown = set(options) - {"groups", "start", "every", "lr_mult", "unit"}
            if unknown:
                raise ConfigError(f"{here}: unknown keys {sorted(unknown)} (expected groups, start, every, lr_mult, "
                                  "unit)")
            groups = options["groups"]
            if not isinstance(groups, list) or not groups:
                raise ConfigError(f"{here}.groups: expected a non-empty list of patterns, got {groups!r}")
            selectors = [selector_from_config(g, f"{here}.groups[{i}]") for i, g in enumerate(groups)]
            try:
                return gradual_unfreeze(selectors, **{k: v for k, v in options.items() if k != "groups"})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{here}: {e}") from None
        if not isinstance(config, list):
            raise ConfigError(f"{where}: expected a list of phases or {{gradual_unfreeze: ...}}, "
                              f"got {type(config).__name__}")
        phases = []
        for i, item in enumerate(config):
            here = f"{where}[{i}]"
            keys = ("at", "policy", "unit", "lr_mult")
            unknown = sorted(set(item) - set(keys)) if isinstance(item, dict) else []
            if unknown:
                raise ConfigError(f"{here}.{unknown[0]}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], keys)} "
                                  f"(a phase takes {', '.join(keys)})")
            if not isinstance(item, dict) or "at" not in item or "policy" not in item:
                raise ConfigError(f"{here}: expected {{at: N, policy: [...], lr_mult: 1.0, unit: epoch}}, got {item!r}")
            policy = Policy.from_config(item["policy"], f"{here}.policy")
            try:
                phases.append(Phase(item["at"], policy, item.get("unit", "epoch"), item.get("lr_mult", 1.0)))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{here}: {e}") from None
        return cls(*phases)


def gradual_unfreeze(groups: list[Selector | str | list], start: int = 1, every: int = 1, lr_mult: float = 1.0,
                     unit: str = "epoch") -> Schedule:
    """ULMFiT's gradual unfreezing: ``groups[0]`` is unfrozen at ``start``, ``groups[1]`` ``every``
    later, and so on (list them in the order they should start training: last layers first)."""
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError("gradual_unfreeze(): groups: expected a non-empty list of patterns or selectors")
    for name, value in (("start", start), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "start" else 1):
            raise ValueError(f"gradual_unfreeze(): {name}: expected an int >= {0 if name == 'start' else 1}, "
                             f"got {value!r}")
    phases = []
    for i, group in enumerate(groups):
        selectors = group if isinstance(group, (list, tuple)) else [group]
        try:
            rule = unfreeze(*selectors)
        except TypeError as e:
            raise TypeError(f"gradual_unfreeze(): groups[{i}]: {e}") from None
        phases.append(Phase(start + i * every, Policy(rule), unit, lr_mult))
    return Schedule(*phases)
