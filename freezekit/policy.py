"""Rules and policies: the one place where a parameter's and a module's fate is decided.

A :class:`Policy` is an ordered list of rules (:func:`freeze`, :func:`unfreeze`, :func:`detach`,
:func:`eval_mode`). For each parameter and module, the **last rule that selects it decides**,
separately for four things: a parameter's ``requires_grad``; a module's eval lock; a BatchNorm's
swap for a :class:`~freezekit.norm.FrozenBatchNorm`; gradient boundaries (which only accumulate).

``policy.plan(model)`` decides and changes nothing; ``policy.apply(model)`` decides, then changes
the model and returns an :class:`Applied` handle whose ``undo()`` restores exactly what it changed.
Nothing is changed unless every strict selector matched: errors come before the first mutation.

Example:
    >>> import timm, freezekit as fk
    >>> model = timm.create_model("test_resnet", pretrained=False)
    >>> probe = fk.Policy(fk.freeze("*"), fk.unfreeze("fc"))
    >>> with probe.applied(model):
    ...     sorted(n for n, p in model.named_parameters() if p.requires_grad)
    ['fc.bias', 'fc.weight']
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.nn as nn

from . import boundary as _boundary
from . import lock as _lock
from .errors import ConfigError, DeadRuleWarning, FreezekitError
from .index import ModelIndex, gc_paused
from .norm import STATS_ADAPT, FrozenBatchNorm, frozen, original_of
from .plan import Change, Plan, decide
from .rules import Rule

__all__ = ["Applied", "Policy"]


# DistributedDataParallel leaves out of its reducer the parameters named in this attribute of the
# module it wraps (its own "module_name.param_name" spelling, so ".weight" for the root's).
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"
_UNSET = object()


def _ddp_names(plan: Plan) -> set[str]:
    """DDP's names of the parameters behind an output boundary after ``plan``: they can receive no
    gradient, and a reducer waiting for them would fail the next iteration."""
    index = plan._index
    behind = plan._detached[index.par_uid]
    names = {index.par_names[j] for j in behind.nonzero()[0].tolist()}
    return names | {"." + n for n in names if "." not in n}


# Live handles per model root, to undo in reverse order.
_live: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[Applied]]] = weakref.WeakKeyDictionary()


class Applied:
    """The handle of an applied policy: ``undo()`` restores exactly what the apply changed.

    A context manager: leaving the ``with`` block undoes. Handles on the same model undo in reverse
    order of application (LIFO); undoing twice does nothing.

    Attributes:
        plan: the :class:`Plan` that was applied.
    """

    def __init__(self, model: nn.Module, plan: Plan):
        self.model = model
        self.plan = plan
        self._log: list[tuple] = []
        self._done = False

    @property
    def changes(self) -> list[Change]:
        return self.plan.changes

    def _run(self) -> None:
        plan, index, d = self.plan, self.plan._index, self.plan._d
        log = self._log  # batches of (kind, entries), undone last first
        # 1. frozen BatchNorm swaps, through every parent that holds the module
        at: dict[int, nn.Module] = {}
        if plan._swaps:
            swapped, carried = [], []
            log += [("module", swapped), ("boundary", carried)]
            for u, want in plan._swaps.items():
                module = index.modules[u]
                new = frozen(module) if want else original_of(module)
                # every place that holds it, each once (a shared parent holds it under several names)
                for holder, key in dict.fromkeys(index.slot(o) for o in index.occurrences(u)):
                    holder._modules[key] = new
                    swapped.append((holder, key, module))
                at[u] = new
                # a boundary belongs to the place: the module that takes it over keeps it
                have = {(b.at, b.no_grad) for b in _boundary.boundaries(new)}
                for b in reversed(_boundary.boundaries(module)):
                    if (b.at, b.no_grad) not in have:
                        carried.append((new, _boundary.add(new, b.at, b.no_grad)))
        # 2. requires_grad, each flag read as it is set (one pass over the tensors): what it was
        # becomes the plan's "before". Nothing frozen keeps a stale gradient.
        before, now_frozen, now_trainable = [], [], []
        log += [("frozen", now_frozen), ("thawed", now_trainable)]
        keep, froze, thawed = before.append, now_frozen.append, now_trainable.append
        for param, want in zip(index.params, d.requires_grad.tolist()):
            was = param.requires_grad
            keep(was)
            if want == 0:
                if was:
                    param.requires_grad = False
                    froze(param)
                if param.grad is not None:
                    param.grad = None
            elif want > 0 and not was:
                param.requires_grad = True
                thawed(param)
        index.requires_grad = np.array(before, dtype=bool)
        # 3. eval locks, on the module that now sits at each place; then the marks of norm layers
        # whose statistics were chosen to adapt (audit reads them)
        modules = index.modules if not at else [at.get(u, m) for u, m in enumerate(index.modules)]
        adapt = d.stats_adapt
        if plan._locks:
            locked, released = [], []
            log += [("locked", locked), ("unlocked", released)]
            for u, lock in plan._locks.items():
                if lock:
                    locked.append(modules[u])
                else:
                    released.append((modules[u], _lock.unlock(modules[u])))
            _lock.lock_all(locked)  # undone by unlocking those that got locked
        marked = set(index.adapting)  # as the walk read them; a swapped-in module is asked again
        todo = {u for u in (adapt == 1).nonzero()[0].tolist() if u not in marked}
        todo.update(u for u in marked if adapt[u] == 0)
        todo.update(u for u in at if adapt[u] >= 0)
        if todo:
            marks = []
            log.append(("attribute", marks))
            for u in sorted(todo):
                want = adapt[u] == 1
                state = modules[u].__dict__
                if STATS_ADAPT in state:
                    if not want:
                        marks.append((modules[u], STATS_ADAPT, state.pop(STATS_ADAPT)))
                elif want:
                    state[STATS_ADAPT] = True
                    marks.append((modules[u], STATS_ADAPT, _UNSET))
        # 4. boundaries
        if plan._new_boundaries:
            added = []
            log.append(("boundary", added))
            for u, i in plan._new_boundaries:
                rule = plan.policy.rules[i]
                module = modules[u]
                added.append((module, _boundary.add(module, rule.at, rule.no_grad)))
            # 5. a DDP wrapper built later must not wait for gradients that cannot come
            root = index.root
            before = root.__dict__.get(_DDP_IGNORE, _UNSET)
            log.append(("attribute", [(root, _DDP_IGNORE, before)]))
            root.__dict__[_DDP_IGNORE] = sorted(set(before if before is not _UNSET else ()) | _ddp_names(plan))

    def undo(self) -> None:
        """Restore the flags, modes, modules and boundaries this apply changed (modifies the model
        in place). Raises :class:`FreezekitError` if a later handle on the model is still live."""
        if self._done:
            return
        handles = [h for h in _live.get(self.plan._index.root, []) if h() is not None]
        if handles and handles[-1]() is not self and any(h() is self for h in handles):
            later = handles[-1]()
            raise FreezekitError(f"undo out of order: undo the later {later!r} first (handles undo LIFO)")
        self._rollback()
        _live[self.plan._index.root] = [h for h in handles if h() is not self]

    def _rollback(self) -> None:
        with gc_paused():
            for kind, entries in reversed(self._log):
                for entry in reversed(entries):
                    if kind == "module":
                        holder, key, module = entry
                        current = holder._modules[key]
                        if isinstance(current, FrozenBatchNorm) and current.original is module:
                            original_of(current)  # hand back tensors replaced since (model.to(...))
                        elif isinstance(module, FrozenBatchNorm):
                            _sync_into(module, current)
                        holder._modules[key] = module
                    elif kind == "frozen":
                        entry.requires_grad = True
                    elif kind == "thawed":
                        entry.requires_grad = False
                    elif kind == "locked":
                        if _lock.is_locked(entry):
                            _lock.unlock(entry)
                    elif kind == "unlocked":
                        _lock.lock(*entry)
                    elif kind == "boundary":
                        _boundary.remove(*entry)
                    else:
                        owner, name, value = entry
                        if value is _UNSET:
                            owner.__dict__.pop(name, None)
                        else:
                            owner.__dict__[name] = value
        self._log.clear()
        self._done = True

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "undone" if self._done else "live"
        return f"<Applied {self.plan.policy!r}: {len(self.plan.changes)} changes, {state}>"


def _sync_into(frozen_module: FrozenBatchNorm, original: nn.Module) -> None:
    """Give a re-installed frozen module the tensors its original holds now, and the mode the
    model last asked of it."""
    frozen_module.train(_lock.asked(original))
    for name in list(frozen_module._parameters):
        frozen_module._parameters[name] = original._parameters.get(name)
    for name in list(frozen_module._buffers):
        frozen_module._buffers[name] = original._buffers.get(name)


# -------------------------------------------------------------------------------------------- policy


class Policy:
    """An ordered list of rules; for each parameter and module, the last rule that selects it decides.

    Args:
        *rules: rules, or policies whose rules are taken in order.
        strict: ``False`` lets every rule match nothing without error.

    Example:
        >>> import freezekit as fk
        >>> fk.Policy(fk.freeze("*"), fk.unfreeze("head")) + fk.Policy(fk.eval_mode("blocks.0"))
        Policy(freeze('*', norm='eval'), unfreeze('head'), eval_mode('blocks.0'))
    """

    def __init__(self, *rules: Rule | Policy, strict: bool = True):
        if not isinstance(strict, bool):
            raise TypeError(f"Policy(): strict: expected True or False, got {strict!r}")
        flat: list[Rule] = []
        for i, rule in enumerate(rules):
            if isinstance(rule, Policy):
                flat += rule.rules
            elif isinstance(rule, Rule):
                flat.append(rule)
            else:
                raise TypeError(f"Policy() argument {i + 1}: expected a rule (fk.freeze, fk.unfreeze, fk.detach, "
                                f"fk.eval_mode) or a Policy, got {type(rule).__name__} {rule!r}")
        if not strict:
            flat = [dataclasses.replace(r, strict=False) for r in flat]
        self.rules: tuple[Rule, ...] = tuple(flat)

    def __add__(self, other: Policy) -> Policy:
        if not isinstance(other, Policy):
            return NotImplemented
        return Policy(self, other)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.rules == other.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def __repr__(self) -> str:
        return f"Policy({', '.join(map(repr, self.rules))})"

    def plan(self, model: nn.Module) -> Plan:
        """Decide, per parameter and module, what applying this policy would do; change nothing.

        Raises:
            NoMatchError: a strict selector matched nothing (all such problems, one per line).
        """
        with gc_paused():
            index = ModelIndex(model)
            plan = Plan(self, index, decide(self.rules, index))
            plan._rg_before  # noqa: B018 -- read now: a plan describes the model as it was when made
        for line in plan.warnings:
            warnings.warn(line, DeadRuleWarning, stacklevel=2)
        return plan

    def apply(self, model: nn.Module) -> Applied:
        """Apply this policy to ``model`` (modifies it in place) and return the handle that undoes it.

        Works on the model inside DDP / ``torch.compile`` / FSDP wrappers, by the inner names.
        Nothing changes if planning fails; if applying fails midway, what was done is undone.
        """
        with gc_paused():
            index = ModelIndex(model)
            plan = Plan(self, index, decide(self.rules, index))
            handle = Applied(model, plan)
            try:
                handle._run()
            except BaseException:
                handle._rollback()
                raise
        for line in plan.warnings:
            warnings.warn(line, DeadRuleWarning, stacklevel=2)
        _live.setdefault(index.root, []).append(weakref.ref(handle))
        return handle

    def applied(self, model: nn.Module) -> Applied:
        """``with policy.applied(model):`` applies for the block and undoes at its end."""
        return self.apply(model)

    def to_config(self) -> list[dict[str, Any]]:
        """The recipe form: a list of rule mappings, YAML-ready."""
        return [rule.to_config() for rule in self.rules]

    @classmethod
    def from_config(cls, config: Any, where: str = "policy") -> Policy:
        """A policy from its recipe form (a list of rule mappings).

        Raises:
            ConfigError: naming the rule's position and the field, e.g. ``policy[1].norm: ...``.
        """
        if isinstance(config, Policy):
            return config
        if not isinstance(config, list):
            raise ConfigError(f"{where}: expected a list of rules like [{{freeze: '*'}}, {{unfreeze: head}}], "
                              f"got {type(config).__name__}")
        return cls(*(Rule.from_config(rule, f"{where}[{i}]") for i, rule in enumerate(config)))
