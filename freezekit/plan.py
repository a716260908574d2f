"""Plans: what a policy decides for each parameter and module of a model, computed without
changing anything. This is where a parameter's fate is decided.

For each parameter and module, the **last rule that selects it decides**, separately for four
things: a parameter's ``requires_grad``; a module's eval lock; a BatchNorm's swap for a
:class:`~freezekit.norm.FrozenBatchNorm`; gradient boundaries (which only accumulate).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn as nn

from . import boundary as _boundary
from . import lock as _lock
from .errors import NoMatchError, closest
from .index import ModelIndex
from .norm import FrozenBatchNorm, frozen_class
from .rules import Rule
from .select import Resolver, Selector, Unmatched

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["Change", "Decisions", "ModulePlan", "ParamPlan", "Plan", "decide"]


@dataclass
class Decisions:
    """What a policy decides on one index: -1 undecided, else the value, and the deciding rule."""

    requires_grad: np.ndarray  # int8 per unique parameter: -1, 0 frozen, 1 trainable
    requires_grad_by: np.ndarray
    locked: np.ndarray  # int8 per unique module: -1, 0 released, 1 locked
    locked_by: np.ndarray
    swapped: np.ndarray  # int8 per unique module: -1, 0 original BatchNorm, 1 FrozenBatchNorm
    swapped_by: np.ndarray
    boundaries: list[tuple[int, int]]  # (unique module, rule) in order
    stats_adapt: np.ndarray  # int8 per unique module: 1 where freeze(norm="train") chose moving statistics
    dead: list[int]  # rules that selected something, all of it decided by later rules


def decide(rules: tuple[Rule, ...], index: ModelIndex) -> Decisions:
    # The last rule wins, and rules are numbered in order: each rule only writes its number where
    # it selects, and what each thing becomes is read from the deciding rules once, at the end.
    par_by = _undecided(index.n_params)  # last freeze / unfreeze of each parameter
    mod_fu = _undecided(index.n_modules)  # last freeze / unfreeze of each module
    mod_ue = _undecided(index.n_modules)  # last unfreeze / eval_mode of each module
    adds: list[tuple[int, int]] = []
    selected: list[tuple[np.ndarray, np.ndarray]] = []  # (modules, parameters) of each rule
    resolver = Resolver(index)
    problems: list[str] = []
    masks = _NormMasks(index)
    for i, rule in enumerate(rules):
        mods = pars = None
        for sel in rule.selectors:
            seen = len(resolver.unmatched)
            m, p = resolver.resolve(sel)
            if rule.strict:
                if len(resolver.unmatched) > seen:
                    problems += [_no_match(i, rule, u, sel, index) for u in resolver.unmatched[seen:]]
                elif not sel._selects_what_matched and not (np.count_nonzero(p) or np.count_nonzero(m)):
                    problems.append(f"policy[{i}].{rule.action}: {sel!r} selected nothing in "
                                    f"{index.model_name}: every match was excluded")
            mods, pars = (m, p) if mods is None else (mods | m, pars | p)  # never changed in place
        selected.append((mods, pars))
        if rule.action == "freeze":
            np.putmask(par_by, pars, i)  # par_by[pars] = i, at less cost
            np.putmask(mod_fu, mods, i)
        elif rule.action == "unfreeze":
            np.putmask(par_by, pars, i)
            np.putmask(mod_fu, mods, i)
            np.putmask(mod_ue, mods, i)
        elif rule.action == "eval_mode":
            np.putmask(mod_ue, mods, i)
        else:  # detach
            roots = index.complete_roots(mods).nonzero()[0]
            adds += [(int(u), i) for u in roots]
            if rule.strict and np.count_nonzero(mods) and not len(roots):
                problems.append(f"policy[{i}].{rule.action}: selects parameters but no whole module in "
                                f"{index.model_name}; a boundary goes on modules")
    if problems:
        raise NoMatchError(problems)
    return _outcome(rules, par_by, mod_fu, mod_ue, masks, adds, selected)


def _outcome(rules: tuple[Rule, ...], par_by: np.ndarray, mod_fu: np.ndarray, mod_ue: np.ndarray,
             masks: _NormMasks, adds: list[tuple[int, int]], selected: list[tuple[np.ndarray, np.ndarray]]
             ) -> Decisions:
    """The decisions, read from the deciding rules. A freeze speaks for the norm layers with
    running statistics among its modules, and for no other module."""

    kinds = tuple(("freeze:" + r.norm) if r.action == "freeze" else r.action for r in rules)
    unfreezes, locks, trains, locks_norms, adapts, frozen_bn = _tables(kinds)
    rg = unfreezes[par_by]
    if "freeze:trainable" in kinds:  # norm parameters stay trainable
        rg[(trains[par_by] == 1) & masks.param] = 1
    locked, locked_by = locks[mod_ue], mod_ue  # decide's own array, changed below only after it is read
    swapped, swapped_by = _undecided(len(mod_fu), np.int8), _undecided(len(mod_fu))
    adapt = _undecided(len(mod_fu), np.int8)
    stats = masks.stats.nonzero()[0]
    if len(stats):
        by = np.maximum(mod_fu[stats], mod_ue[stats])
        locked_by[stats] = by
        locked[stats] = locks_norms[by]
        adapt[stats] = adapts[by]
    # those with statistics that a frozen BatchNorm can replace (may_swap(), by class, as the walk
    # found them); never the root, which has no parent to swap it through
    swap = np.array(masks.index.swappable, dtype=np.intp)
    if len(swap):
        by = mod_fu[swap]  # a freeze or unfreeze decides a swap; -1 stays undecided
        swapped_by[swap] = by
        frozen = frozen_bn[by]
        swapped[swap] = frozen
        if "freeze:frozen_bn" in kinds:  # a frozen BatchNorm needs no lock
            locked[swap[(frozen == 1) & (locked_by[swap] == by)]] = 0
    dead = _dead(rules, selected, masks, (par_by, locked_by[locked == 1], swapped_by))
    return Decisions(rg, par_by, locked, locked_by, swapped, swapped_by, adds, adapt, dead)


def _dead(rules: tuple[Rule, ...], selected: list[tuple[np.ndarray, np.ndarray]], masks: _NormMasks,
          deciders: tuple[np.ndarray, ...]) -> list[int]:
    """The rules that decide nothing though they selected something they could decide: a freeze
    its parameters or norm layers, an unfreeze its parameters or modules, an eval_mode its modules.
    Releasing a lock only matters where one was: a rule whose only surviving decisions are
    releases (an unfreeze overridden by a later freeze) is as good as dead."""
    deciding = np.zeros(len(rules) + 1, dtype=bool)  # [-1]: no rule
    for by in deciders:  # the deciding rule of each thing decided
        deciding[by] = True
    dead = []
    for i, (rule, deciding_i, (mods, pars)) in enumerate(zip(rules, deciding.tolist(), selected)):
        if deciding_i or rule.action == "detach":
            continue
        if rule.action == "freeze":
            mods = mods & masks.norm
        if (rule.action != "eval_mode" and np.count_nonzero(pars)) or np.count_nonzero(mods):
            dead.append(i)
    return dead


def _undecided(n: int, dtype: type = np.intp) -> np.ndarray:
    """``n`` times -1. Rule numbers are kept as ``intp``, which numpy indexes with as they are.
    (``np.full`` is a Python function around these two calls, and costs more at every apply.)"""
    out = np.empty(n, dtype=dtype)
    out.fill(-1)
    return out


@lru_cache(maxsize=256)
def _tables(kinds: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """What each rule's action and norm mode make of what it decides (``kinds``: the action, or
    ``freeze:<norm>``), one table per outcome, indexed by rule number; [-1] is "no rule"."""
    tables = np.array([
        [k == "unfreeze" for k in kinds] + [-1],
        [k == "eval_mode" for k in kinds] + [-1],
        [k == "freeze:trainable" for k in kinds] + [-1],
        [k in ("eval_mode", "freeze:eval", "freeze:frozen_bn") for k in kinds] + [-1],
        [k == "freeze:train" for k in kinds] + [-1],
        [k == "freeze:frozen_bn" for k in kinds] + [-1],
    ], dtype=np.int8)
    tables.flags.writeable = False
    return tuple(tables)  # rows as a tuple: unpacking an array ends on a caught IndexError, every time


class _NormMasks:
    """The norm layers of an index, as masks, each made when a rule first needs it."""

    def __init__(self, index: ModelIndex):
        self.index = index
        self.norm, self.stats = index.norms, index.norm_stats  # read in the walk

    @cached_property
    def param(self) -> np.ndarray:
        """Unique-parameter mask of the parameters of norm layers."""
        index = self.index
        param = np.zeros(index.n_params, dtype=bool)
        param[index.par_uid[self.norm[index.mod_uid[index.param_owner]]]] = True
        return param


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

    def __init__(self, policy: Policy, index: ModelIndex, decisions: Decisions):
        self.policy = policy
        self._index = index
        self._d = decisions
        # The locks and boundaries the model holds now, read once: a plan keeps describing
        # the model it was made on when it is read after an apply (``applied.plan`` included).
        modules = index.modules
        self._cuts_before = {u: tuple(_boundary.boundaries(modules[u])) for u in index.maybe_cut}
        self._locked_before = {u for u in index.maybe_locked if _lock.is_locked(modules[u])}
        self._locked_now  # noqa: B018 -- computed now: it reads the locks of swapped-out originals
        self.warnings = [f"policy[{i}] {policy.rules[i]!r} is dead: later rules override everything it selects"
                         for i in decisions.dead]

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
        return _flips(self._d.swapped, set(self._index.frozen_bn))

    @cached_property
    def _locked_now(self) -> set[int]:
        """Unique modules locked now; for a place about to be swapped, the module that will sit there."""
        modules, now = self._index.modules, set(self._locked_before)
        for u, swap in self._swaps.items():
            if not swap and _lock.is_locked(modules[u].original):
                now.add(u)
            else:
                now.discard(u)
        return now

    @cached_property
    def _locks(self) -> dict[int, bool]:
        """Unique module -> lock (True) / release (False), where that changes something, in order."""
        return _flips(self._d.locked, self._locked_now)

    @cached_property
    def _new_boundaries(self) -> list[tuple[int, int]]:
        """(unique module, rule) of the boundaries to add; one already there is not added again."""
        out, seen = [], set()
        for u, i in self._d.boundaries:
            rule = self.policy.rules[i]
            existing = {(b.at, b.no_grad) for b in self._cuts_before.get(u, ())}
            if (rule.at, rule.no_grad) not in existing and (u, rule.at, rule.no_grad) not in seen:
                seen.add((u, rule.at, rule.no_grad))
                out.append((u, i))
        return out

    @cached_property
    def _detached(self) -> np.ndarray:
        """Unique parameters behind an output boundary after the plan."""
        index = self._index
        cut = np.zeros(index.n_modules, dtype=bool)
        for u in index.maybe_cut:
            cut[u] = any(b.at == "output" for b in self._cuts_before[u])
        for u, i in self._d.boundaries:
            if self.policy.rules[i].at == "output":
                cut[u] = True
        if not np.count_nonzero(cut):
            return np.zeros(index.n_params, dtype=bool)
        return index.params_only_under(cut)

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
            sides = tuple(reversed(added.get(u, []))) + tuple(b.at for b in self._cuts_before.get(u, ()))
            if u in self._locks:
                locked = self._locks[u]
            elif self._d.locked[u] >= 0 or u in self._swaps:
                locked = u in self._locked_now
            else:
                locked = u in self._locked_before
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


def _flips(decided: np.ndarray, now: set[int]) -> dict[int, bool]:
    """Unique module -> True (turn on) / False (turn off), in order, where the decision (1 on, 0 off,
    -1 none) differs from what is on ``now``."""
    on = (decided == 1).nonzero()[0].tolist()
    if not now:  # the common case: nothing locked or swapped yet
        return dict.fromkeys(on, True)
    off = [u for u in now if decided[u] == 0]
    return dict(sorted([*((u, True) for u in on if u not in now), *((u, False) for u in off)]))


def _some(names: list[str], total: int) -> str:
    shown = ", ".join(names[:6])
    return shown + (f", ... ({total - 6} more)" if total > 6 else "")
