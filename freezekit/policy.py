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
import gc
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch.nn as nn

from . import boundary as _boundary
from . import lock as _lock
from .errors import ConfigError, DeadRuleWarning, FreezekitError, NoMatchError, closest
from .index import ModelIndex
from .norm import (
    FrozenBatchNorm,
    frozen,
    frozen_class,
    is_norm,
    may_swap,
    original_of,
)
from .select import Glob, Resolver, Selector, Unmatched, as_selector
from .select import from_config as selector_from_config

__all__ = [
    "ACTIONS",
    "NORM_MODES",
    "Applied",
    "Change",
    "ModulePlan",
    "ParamPlan",
    "Plan",
    "Policy",
    "Rule",
    "detach",
    "eval_mode",
    "freeze",
    "unfreeze",
]

ACTIONS = ("freeze", "unfreeze", "detach", "eval_mode")
NORM_MODES = ("eval", "frozen_bn", "train", "trainable")
SIDES = ("output", "input")
_OPTIONS = {"freeze": ("norm", "strict"), "unfreeze": ("strict",), "detach": ("at", "no_grad", "strict"),
            "eval_mode": ("strict",)}


# ------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One line of a policy: an action, what it selects, and the action's options."""

    action: str
    selectors: tuple[Selector, ...]
    norm: str = "eval"  # freeze: what happens to the norm layers it covers (NORM_MODES)
    at: str = "output"  # detach: which side of the module is cut
    no_grad: bool = True  # detach at="output": run the module under torch.no_grad()
    strict: bool = True  # every selector must select something

    def __repr__(self) -> str:
        args = [repr(s.patterns[0]) if isinstance(s, Glob) and len(s.patterns) == 1 else repr(s)
                for s in self.selectors]
        if self.action == "freeze":
            args.append(f"norm={self.norm!r}")
        if self.action == "detach":
            args += [f"at={self.at!r}", f"no_grad={self.no_grad}"]
        if not self.strict:
            args.append("strict=False")
        return f"{self.action}({', '.join(args)})"

    def to_config(self) -> dict[str, Any]:
        """The recipe form: ``{action: selector(s), option: value, ...}``."""
        sels = [s.to_config() for s in self.selectors]
        out: dict[str, Any] = {self.action: sels[0] if len(sels) == 1 else sels}
        if self.action == "freeze":
            out["norm"] = self.norm
        if self.action == "detach":
            out["at"] = self.at
            out["no_grad"] = self.no_grad
        if not self.strict:
            out["strict"] = False
        return out

    @classmethod
    def from_config(cls, config: Any, where: str = "rule") -> Rule:
        """A rule from its recipe form. Raises :class:`ConfigError` naming ``where`` and the field."""
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: expected a mapping like {{freeze: PATTERN}}, got {config!r}")
        actions = [k for k in config if k in ACTIONS]
        if len(actions) != 1:
            unknown = [k for k in config if k not in ACTIONS and k not in ("norm", "at", "no_grad", "strict")]
            hint = _did_you_mean(str(unknown[0]), ACTIONS) if unknown else ""
            found = f"found {', '.join(map(repr, actions))}" if actions else "found none"
            raise ConfigError(f"{where}: expected exactly one action key of {', '.join(ACTIONS)}; {found}{hint}")
        action = actions[0]
        for key in config:
            if key != action and key not in _OPTIONS[action]:
                raise ConfigError(f"{where}.{key}: not an option of {action} (options: "
                                  f"{', '.join(_OPTIONS[action])}){_did_you_mean(str(key), _OPTIONS[action])}")
        value = config[action]
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ConfigError(f"{where}.{action}: expected a pattern, a list of patterns or a selector mapping, "
                              "got an empty list")
        here = f"{where}.{action}"
        selectors = [selector_from_config(v, f"{here}[{i}]" if isinstance(value, list) else here)
                     for i, v in enumerate(items)]
        options = {k: v for k, v in config.items() if k != action}
        try:
            return _make(action, selectors, **options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None


def _did_you_mean(value: str, choices: tuple[str, ...] | list[str]) -> str:
    hint = closest(value, choices, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _make(action: str, selectors: tuple | list, **options: Any) -> Rule:
    if not selectors:
        raise TypeError(f"{action}() needs at least one selector (a pattern string or a freezekit selector)")
    sels = tuple(as_selector(s, f"{action}() argument {i + 1}") for i, s in enumerate(selectors))
    for key in ("strict", "no_grad"):
        if key in options and not isinstance(options[key], bool):
            raise TypeError(f"{action}(): {key}: expected True or False, got {options[key]!r}")
    if "norm" in options and options["norm"] not in NORM_MODES:
        raise ValueError(f"{action}(): norm: {options['norm']!r} is not one of {', '.join(NORM_MODES)}"
                         f"{_did_you_mean(str(options['norm']), NORM_MODES)}")
    if "at" in options and options["at"] not in SIDES:
        raise ValueError(f"{action}(): at: {options['at']!r} is not one of {', '.join(SIDES)}"
                         f"{_did_you_mean(str(options['at']), SIDES)}")
    return Rule(action, sels, **options)


def freeze(*selectors: Selector | str, norm: str = "eval", strict: bool = True) -> Rule:
    """Freeze what is selected: ``requires_grad_(False)`` and ``.grad = None``.

    Args:
        *selectors: patterns (``"layer4*"``, ``"re:..."``) or selectors.
        norm: what happens to the norm layers among the selected modules:
            ``"eval"`` keeps those with running statistics in eval mode (statistics never change);
            ``"frozen_bn"`` replaces BatchNorms by :class:`~freezekit.norm.FrozenBatchNorm`;
            ``"train"`` leaves them to the model's mode (statistics keep updating);
            ``"trainable"`` keeps their affine parameters trainable and lets them follow the model.
        strict: raise :class:`~freezekit.NoMatchError` if a selector matches nothing.
    """
    return _make("freeze", selectors, norm=norm, strict=strict)


def unfreeze(*selectors: Selector | str, strict: bool = True) -> Rule:
    """Make what is selected trainable again, release eval locks and undo frozen-BatchNorm swaps."""
    return _make("unfreeze", selectors, strict=strict)


def detach(*selectors: Selector | str, at: str = "output", no_grad: bool = True, strict: bool = True) -> Rule:
    """Put a gradient boundary at the output (or inputs) of the outermost selected modules.

    With ``at="output"`` nothing downstream sends gradient into the module; with ``no_grad`` it also
    runs under ``torch.no_grad()`` and stores no activations. ``at="input"`` cuts what flows back
    out of the module, and leaves its own parameters trainable. ``requires_grad`` is not changed.
    """
    return _make("detach", selectors, at=at, no_grad=no_grad, strict=strict)


def eval_mode(*selectors: Selector | str, strict: bool = True) -> Rule:
    """Keep the selected modules in eval mode whatever ``model.train()`` says (dropout off,
    norm statistics fixed)."""
    return _make("eval_mode", selectors, strict=strict)


# ---------------------------------------------------------------------------------------- decisions


@dataclass
class _Decisions:
    """What a policy decides on one index: -1 undecided, else the value, and the deciding rule."""

    requires_grad: np.ndarray  # int8 per unique parameter: -1, 0 frozen, 1 trainable
    requires_grad_by: np.ndarray
    locked: np.ndarray  # int8 per unique module: -1, 0 released, 1 locked
    locked_by: np.ndarray
    swapped: np.ndarray  # int8 per unique module: -1, 0 original BatchNorm, 1 FrozenBatchNorm
    swapped_by: np.ndarray
    boundaries: list[tuple[int, int]]  # (unique module, rule) in order
    spoke: np.ndarray  # bool per rule: it decided something before later rules spoke


def _module_mask(index: ModelIndex, test) -> np.ndarray:
    return np.fromiter((test(m) for m in index.modules), dtype=bool, count=index.n_modules)


def _decide(rules: tuple[Rule, ...], index: ModelIndex) -> _Decisions:
    n_par, n_mod = index.n_params, index.n_modules
    rg = np.full(n_par, -1, dtype=np.int8)
    rg_by = np.full(n_par, -1, dtype=np.int32)
    locked = np.full(n_mod, -1, dtype=np.int8)
    locked_by = np.full(n_mod, -1, dtype=np.int32)
    swapped = np.full(n_mod, -1, dtype=np.int8)
    swapped_by = np.full(n_mod, -1, dtype=np.int32)
    adds: list[tuple[int, int]] = []
    spoke = np.zeros(len(rules), dtype=bool)
    resolver = Resolver(index)
    problems: list[str] = []
    norm_state: dict[str, np.ndarray] = {}

    def norm_masks() -> dict[str, np.ndarray]:
        if not norm_state:
            norm = index.class_mask(is_norm)
            stats = norm & index.running_stats
            swap = stats & index.class_mask(may_swap)  # can_swap(), by class once
            swap[index.mod_uid[0]] = False  # the root has no parent to swap it through
            owner_norm = norm[index.mod_uid[index.param_owner]]
            param_norm = np.zeros(n_par, dtype=bool)
            param_norm[index.par_uid[owner_norm]] = True
            norm_state.update(norm=norm, stats=stats, swap=swap, param=param_norm)
        return norm_state

    def decide(values, by, mask, value, i) -> None:
        values[mask] = value
        by[mask] = i

    for i, rule in enumerate(rules):
        mods = np.zeros(n_mod, dtype=bool)
        pars = np.zeros(n_par, dtype=bool)
        for sel in rule.selectors:
            seen = len(resolver.unmatched)
            m, p = resolver.resolve(sel)
            if rule.strict:
                problems += [_no_match(i, rule, u, sel, index) for u in resolver.unmatched[seen:]]
                if len(resolver.unmatched) == seen and not (np.count_nonzero(m) or np.count_nonzero(p)):
                    problems.append(f"policy[{i}].{rule.action}: {sel!r} selected nothing in "
                                    f"{index.model_name}: every match was excluded")
            mods |= m
            pars |= p
        if rule.action == "freeze":
            masks = norm_masks()
            norm_mods = mods & masks["norm"]
            stats, swap = norm_mods & masks["stats"], norm_mods & masks["swap"]
            decide(rg, rg_by, pars, 0, i)
            if rule.norm == "trainable":
                decide(rg, rg_by, pars & masks["param"], 1, i)
            if rule.norm == "eval":
                decide(locked, locked_by, stats, 1, i)
                decide(swapped, swapped_by, swap, 0, i)
            elif rule.norm == "frozen_bn":
                decide(swapped, swapped_by, swap, 1, i)
                decide(locked, locked_by, swap, 0, i)  # a frozen BatchNorm needs no lock
                decide(locked, locked_by, stats & ~swap, 1, i)  # norms that cannot be swapped
            else:
                decide(locked, locked_by, stats, 0, i)
                decide(swapped, swapped_by, swap, 0, i)
            spoke[i] = bool(np.count_nonzero(pars) or np.count_nonzero(norm_mods))
        elif rule.action == "unfreeze":
            decide(rg, rg_by, pars, 1, i)
            decide(locked, locked_by, mods, 0, i)
            if np.count_nonzero(mods):
                decide(swapped, swapped_by, mods & norm_masks()["swap"], 0, i)
            spoke[i] = bool(np.count_nonzero(pars) or np.count_nonzero(mods))
        elif rule.action == "eval_mode":
            decide(locked, locked_by, mods, 1, i)
            spoke[i] = bool(np.count_nonzero(mods))
        else:  # detach
            roots = index.complete_roots(mods).nonzero()[0]
            adds += [(int(u), i) for u in roots]
            if rule.strict and np.count_nonzero(mods) and not len(roots):
                problems.append(f"policy[{i}].{rule.action}: selects parameters but no whole module in "
                                f"{index.model_name}; a boundary goes on modules")
    if problems:
        raise NoMatchError(problems)
    return _Decisions(rg, rg_by, locked, locked_by, swapped, swapped_by, adds, spoke)


def _no_match(i: int, rule: Rule, u: Unmatched, sel: Selector, index: ModelIndex) -> str:
    where = f"policy[{i}].{rule.action}"
    inside = "" if u.selector is sel else f" (in {sel!r})"
    if u.kind == "type":
        classes = {c.__name__ for m in index.modules for c in type(m).__mro__ if issubclass(c, nn.Module)}
        near = closest(u.pattern.rpartition(".")[2], sorted(classes))
        what = f"{u.pattern!r}{inside} matched no module of {index.model_name}"
    elif u.kind == "module":
        near = closest(u.pattern, index.module_names)
        what = f"{u.pattern!r}{inside} is not a container (or numbered family) in {index.model_name}"
    else:
        near = closest(u.pattern.removeprefix("re:"), index.module_names + index.param_names)
        what = f"{u.pattern!r}{inside} matched nothing in {index.model_name}"
    return f"{where}: {what}" + (f"; closest: {', '.join(map(repr, near))}" if near else "")


# -------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Change:
    """One change that applying a plan makes."""

    kind: str  # "requires_grad", "eval_lock", "frozen_bn" or "boundary"
    name: str  # qualified name of the parameter or module
    before: Any
    after: Any
    rule: Rule

    def __str__(self) -> str:
        return f"{self.name}: {self.kind} {self.before} -> {self.after}  [{self.rule!r}]"


@dataclass(frozen=True)
class ParamPlan:
    """A parameter after the plan: its ``requires_grad``, status, and the rule that decided it."""

    requires_grad: bool
    status: str  # "trainable", "frozen" or "detached"
    rule: Rule | None  # None: no rule selected it, it keeps its flag
    changed: bool


@dataclass(frozen=True)
class ModulePlan:
    """A module after the plan."""

    type: str
    eval_locked: bool
    frozen_bn: bool
    boundaries: tuple[str, ...]  # "output" / "input", outermost first
    rule: Rule | None  # the last rule that decided its lock or swap, if any
    changed: bool


class Plan:
    """What applying a policy to a model would do, computed without changing anything.

    Attributes:
        policy: the policy planned.
        warnings: one line per dead rule (every selection overridden by later rules).
    """

    def __init__(self, policy: Policy, index: ModelIndex, decisions: _Decisions):
        self.policy = policy
        self._index = index
        self._d = decisions
        self.warnings = self._dead_rules()

    # -- the target state, per unique object

    @property
    def _rg_before(self) -> np.ndarray:
        return self._index.requires_grad

    @cached_property
    def _rg_after(self) -> np.ndarray:
        d = self._d.requires_grad
        return np.where(d >= 0, d == 1, self._rg_before)

    @cached_property
    def _swaps(self) -> dict[int, bool]:
        """Unique module -> True (swap in a FrozenBatchNorm) / False (restore the original)."""
        d = self._d.swapped
        is_frozen = self._index.class_mask(lambda c: issubclass(c, FrozenBatchNorm))
        changed = ((d >= 0) & ((d == 1) != is_frozen)).nonzero()[0]
        return dict(zip(changed.tolist(), (d[changed] == 1).tolist()))

    @cached_property
    def _locked_now(self) -> np.ndarray:
        """Unique modules locked now; for a place about to be swapped, the module that will sit there."""
        modules = self._index.modules
        now = np.zeros(len(modules), dtype=bool)
        now[[u for u in self._index.maybe_locked.nonzero()[0].tolist() if _lock.is_locked(modules[u])]] = True
        for u, swap in self._swaps.items():
            now[u] = False if swap else _lock.is_locked(modules[u].original)
        return now

    @cached_property
    def _locks(self) -> dict[int, bool]:
        """Unique module -> lock (True) / release (False), where that changes something."""
        d = self._d.locked
        changed = ((d >= 0) & ((d == 1) != self._locked_now)).nonzero()[0]
        return dict(zip(changed.tolist(), (d[changed] == 1).tolist()))

    @cached_property
    def _new_boundaries(self) -> list[tuple[int, int]]:
        """(unique module, rule) of the boundaries to add; one already there is not added again."""
        out, seen = [], set()
        for u, i in self._d.boundaries:
            rule = self.policy.rules[i]
            module = self._index.modules[u]
            existing = {(b.at, b.no_grad) for b in _boundary.boundaries(module)}
            if (rule.at, rule.no_grad) not in existing and (u, rule.at, rule.no_grad) not in seen:
                seen.add((u, rule.at, rule.no_grad))
                out.append((u, i))
        return out

    @cached_property
    def _detached(self) -> np.ndarray:
        """Unique parameters behind an output boundary after the plan."""
        index = self._index
        cut = _module_mask(index, lambda m: any(b.at == "output" for b in _boundary.boundaries(m)))
        for u, i in self._d.boundaries:
            if self.policy.rules[i].at == "output":
                cut[u] = True
        if not np.count_nonzero(cut):
            return np.zeros(index.n_params, dtype=bool)
        return index.expand_modules(cut)[1]

    # -- public views

    @cached_property
    def parameters(self) -> dict[str, ParamPlan]:
        """Qualified parameter name -> :class:`ParamPlan`, in model order."""
        rules, by = self.policy.rules, self._d.requires_grad_by.tolist()
        after, before, detached = self._rg_after.tolist(), self._rg_before.tolist(), self._detached.tolist()
        return {
            name: ParamPlan(a, ("detached" if det else "trainable") if a else "frozen",
                            rules[r] if r >= 0 else None, a != b)
            for name, a, b, det, r in zip(self._index.param_names, after, before, detached, by)
        }

    @cached_property
    def modules(self) -> dict[str, ModulePlan]:
        """Qualified module name -> :class:`ModulePlan`, in model order."""
        index, d, rules = self._index, self._d, self.policy.rules
        added: dict[int, list[str]] = {}
        for u, i in self._new_boundaries:
            added.setdefault(u, []).append(rules[i].at)
        out = {}
        for u, (name, module) in enumerate(zip(index.module_names, index.modules)):
            swap = self._swaps.get(u)
            if swap is None:
                is_frozen, shown = isinstance(module, FrozenBatchNorm), type(module)
            else:
                is_frozen, shown = swap, frozen_class(module) if swap else type(module.original)
            by = max(int(d.locked_by[u]), int(d.swapped_by[u]))
            sides = tuple(reversed(added.get(u, []))) + tuple(b.at for b in _boundary.boundaries(module))
            if u in self._locks:
                locked = self._locks[u]
            elif self._d.locked[u] >= 0 or u in self._swaps:
                locked = bool(self._locked_now[u])
            else:
                locked = _lock.is_locked(module)
            out[name] = ModulePlan(shown.__name__, locked, is_frozen, sides,
                                   rules[by] if by >= 0 else None,
                                   u in self._swaps or u in self._locks or u in added)
        return out

    @cached_property
    def changes(self) -> list[Change]:
        """Everything applying this plan would change, parameters first, in model order."""
        index, d, rules = self._index, self._d, self.policy.rules
        out = []
        before, after = self._rg_before, self._rg_after
        for p in (before != after).nonzero()[0].tolist():
            out.append(Change("requires_grad", index.param_names[p], bool(before[p]), bool(after[p]),
                              rules[d.requires_grad_by[p]]))
        for u, want in self._swaps.items():
            out.append(Change("frozen_bn", index.module_names[u], not want, want, rules[d.swapped_by[u]]))
        for u, want in self._locks.items():
            out.append(Change("eval_lock", index.module_names[u], not want, want, rules[d.locked_by[u]]))
        for u, i in self._new_boundaries:
            out.append(Change("boundary", index.module_names[u], None, rules[i].at, rules[i]))
        return out

    @property
    def trainable(self) -> list[str]:
        """Names of the parameters that will be trainable (not frozen, not detached)."""
        return [n for n, p in self.parameters.items() if p.status == "trainable"]

    @property
    def frozen(self) -> list[str]:
        """Names of the parameters that will be frozen."""
        return [n for n, p in self.parameters.items() if p.status == "frozen"]

    def _dead_rules(self) -> list[str]:
        d, n = self._d, len(self.policy.rules)
        # Releasing a lock only matters where one was; a rule whose only surviving decisions are
        # releases (an unfreeze overridden by a later freeze) is as good as dead.
        deciding = np.zeros(n, dtype=bool)
        for by in (d.requires_grad_by, d.locked_by[d.locked == 1], d.swapped_by):
            deciding[by[by >= 0]] = True
        out = []
        for i, rule in enumerate(self.policy.rules):
            if rule.action != "detach" and d.spoke[i] and not deciding[i]:
                out.append(f"policy[{i}] {rule!r} is dead: later rules override everything it selects")
        return out

    def __str__(self) -> str:
        index, d, rules = self._index, self._d, self.policy.rules
        n = index.n_params
        lines = [f"Plan for {index.model_name}: {len(rules)} rules, {n} parameter tensors, "
                 f"{len(self.changes)} changes"]
        rg_by = d.requires_grad_by
        for i, rule in enumerate(rules):
            mine = (rg_by == i).nonzero()[0]
            parts = []
            n_train = int((d.requires_grad[mine] == 1).sum())
            if len(mine) - n_train:
                parts.append(f"{len(mine) - n_train} parameters frozen")
            if n_train:
                parts.append(f"{n_train} parameters trainable")
            n_lock = int(((d.locked_by == i) & (d.locked == 1)).sum())
            n_free = int(((d.locked_by == i) & (d.locked == 0)).sum())
            n_swap = int(((d.swapped_by == i) & (d.swapped == 1)).sum())
            if n_lock:
                parts.append(f"{n_lock} modules eval-locked")
            if n_free and rule.action != "unfreeze":
                parts.append(f"{n_free} modules released")
            if n_swap:
                parts.append(f"{n_swap} BatchNorms -> FrozenBatchNorm")
            n_cut = sum(1 for _, r in d.boundaries if r == i)
            if n_cut:
                parts.append(f"{n_cut} boundaries at {rule.at}")
            lines.append(f"  policy[{i}] {rule!r}: {', '.join(parts) if parts else 'decides nothing'}")
            if len(mine):
                lines.append("      " + _some([index.param_names[p] for p in mine[:7]], len(mine)))
        undecided = int((rg_by < 0).sum())
        if undecided:
            lines.append(f"  no rule: {undecided} parameters keep their flag")
        statuses = [p.status for p in self.parameters.values()]
        lines.append(f"Result: {statuses.count('trainable')} trainable, {statuses.count('frozen')} frozen, "
                     f"{statuses.count('detached')} detached parameter tensors")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Plan {self._index.model_name}: {len(self.changes)} changes, {len(self.warnings)} warnings>"


def _some(names: list[str], total: int) -> str:
    shown = ", ".join(names[:6])
    return shown + (f", ... ({total - 6} more)" if total > 6 else "")


# ------------------------------------------------------------------------------------------ applying

@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a model is walked or changed.

    Walking 100k modules allocates a few hundred thousand short-lived objects; each generational
    collection they trigger also scans the model's own objects, which costs more than the walk.
    Nothing is freed later than it would be otherwise: collection resumes at the end.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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
            swapped = []
            log.append(("module", swapped))
            for u, want in plan._swaps.items():
                module = index.modules[u]
                new = frozen(module) if want else original_of(module)
                for occurrence in index.occurrences(u):
                    holder, key = index.slot(occurrence)
                    holder._modules[key] = new
                    swapped.append((holder, key, module))
                at[u] = new
        # 2. requires_grad, and no stale gradient on anything frozen
        params, after = index.params, plan._rg_after
        changed = (plan._rg_before != after).nonzero()[0].tolist()
        if changed:
            flipped, values = [params[p] for p in changed], after[changed].tolist()
            log.append(("requires_grad", list(zip(flipped, [not v for v in values]))))
            for param, value in zip(flipped, values):
                param.requires_grad_(value)
        for p in ((d.requires_grad == 0) & index.has_grad).nonzero()[0].tolist():
            params[p].grad = None
        # 3. eval locks, on the module that now sits at each place
        if plan._locks:
            locked, released = [], []
            log += [("locked", locked), ("unlocked", released)]
            for u, want in plan._locks.items():
                module = at.get(u, index.modules[u])
                if want:
                    _lock.lock(module)
                    locked.append(module)
                else:
                    released.append((module, _lock.unlock(module)))
        # 4. boundaries
        if plan._new_boundaries:
            added = []
            log.append(("boundary", added))
            for u, i in plan._new_boundaries:
                rule = plan.policy.rules[i]
                module = at.get(u, index.modules[u])
                added.append((module, _boundary.add(module, rule.at, rule.no_grad)))

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
        with _gc_paused():
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
                    elif kind == "requires_grad":
                        entry[0].requires_grad_(entry[1])
                    elif kind == "locked":
                        _lock.unlock(entry)
                    elif kind == "unlocked":
                        _lock.lock(*entry)
                    else:
                        _boundary.remove(*entry)
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
    """Give a re-installed frozen module the tensors its original holds now."""
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
        with _gc_paused():
            index = ModelIndex(model)
            plan = Plan(self, index, _decide(self.rules, index))
        for line in plan.warnings:
            warnings.warn(line, DeadRuleWarning, stacklevel=2)
        return plan

    def apply(self, model: nn.Module) -> Applied:
        """Apply this policy to ``model`` (modifies it in place) and return the handle that undoes it.

        Works on the model inside DDP / ``torch.compile`` / FSDP wrappers, by the inner names.
        Nothing changes if planning fails; if applying fails midway, what was done is undone.
        """
        with _gc_paused():
            index = ModelIndex(model)
            plan = Plan(self, index, _decide(self.rules, index))
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
