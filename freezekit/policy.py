"""Policies: ordered rules, applied to a model and undone.

A :class:`Policy` is an ordered list of rules (:func:`freeze`, :func:`unfreeze`, :func:`detach`,
:func:`eval_mode`). For each parameter and module, the **last rule that selects it decides**,
separately for four things: a parameter's ``requires_grad``; a module's eval lock; a BatchNorm's
swap for a :class:`~freezekit.norm.FrozenBatchNorm`; gradient boundaries (which only accumulate).

The rules are decided in :mod:`~freezekit.decide` and planned in :mod:`~freezekit.plan`:
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

import torch.nn as nn

from .errors import ConfigError, DeadRuleWarning, FreezekitError, FreezekitWarning, TiedWeightsWarning
from .index import ModelIndex
from .plan import Change, Plan
from .rules import Rule
from .steps import Step
from .tracking import warn_unheld

__all__ = ["Applied", "Policy"]

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
        self._performed: list[Step] = []
        self._done = False

    @property
    def changes(self) -> list[Change]:
        return self.plan.changes

    def made_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of each parameter this apply turned trainable, in model order."""
        plan, index = self.plan, self.plan.index
        for u in (plan.requires_grad_after & ~plan.requires_grad_before).nonzero()[0].tolist():
            yield index.param_names[u], index.params[u]

    def _run(self) -> None:
        for step in self.plan.steps:
            self._performed.append(step)  # first: a step that fails midway is undone too
            step.apply()

    def undo(self) -> None:
        """Restore the flags, modes, modules and boundaries this apply changed (modifies the model
        in place). Raises :class:`FreezekitError` if a later handle on the model is still live."""
        if self._done:
            return
        root = self.plan.index.root
        handles = [h for h in _live.get(root, []) if h() is not None]
        if handles and handles[-1]() is not self and any(h() is self for h in handles):
            later = handles[-1]()
            raise FreezekitError(f"undo out of order: undo the later {later!r} first (handles undo LIFO)")
        self._rollback()
        _live[root] = [h for h in handles if h() is not self]

    def _rollback(self) -> None:
        while self._performed:
            self._performed.pop().undo()
        self._done = True

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "undone" if self._done else "live"
        return f"<Applied {Policy(*self.plan.rules)!r}: {len(self.plan.changes)} changes, {state}>"


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
        plan = Plan(self.rules, ModelIndex(model))
        plan.requires_grad_before  # noqa: B018 -- read now: a plan describes the model as it was when made
        _warn(plan)
        return plan

    def apply(self, model: nn.Module, check_optimizers: bool = True) -> Applied:
        """Apply this policy to ``model`` (modifies it in place) and return the handle that undoes it.

        Works on the model inside DDP / ``torch.compile`` / FSDP wrappers, by the inner names.
        Nothing changes if planning fails; if applying fails midway, what was done is undone.
        Warns if it makes parameters trainable that an optimizer freezekit knows trains ``model``
        does not hold (see :func:`~freezekit.track_optimizer`); ``check_optimizers=False``: not
        now, for code that syncs the optimizer right after.
        """
        plan = Plan(self.rules, ModelIndex(model))
        handle = Applied(model, plan)
        try:
            handle._run()
        except BaseException:
            handle._rollback()
            raise
        _warn(plan)
        _live.setdefault(plan.index.root, []).append(weakref.ref(handle))
        if check_optimizers:
            warn_unheld(model, handle.made_trainable, lambda: f"applying {self!r}")
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
            ConfigError: a line per problem, naming the rule's position and the field, e.g.
                ``policy[1].norm: ...``.
        """
        if isinstance(config, Policy):
            return config
        if not isinstance(config, list):
            raise ConfigError(f"{where}: expected a list of rules like [{{freeze: '*'}}, {{unfreeze: head}}], "
                              f"got {type(config).__name__}")
        rules, problems = [], []
        for i, rule in enumerate(config):  # every rule's problem, not the first alone
            try:
                rules.append(Rule.from_config(rule, f"{where}[{i}]"))
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(*rules)


def _warn(plan: Plan) -> None:
    for line in plan.warnings:
        warnings.warn(line, DeadRuleWarning, stacklevel=3)
    for line in plan.tied:
        warnings.warn(line, TiedWeightsWarning, stacklevel=3)
    for line in plan.notes:
        warnings.warn(line, FreezekitWarning, stacklevel=3)
