"""Deciding: what a policy's rules make of each parameter and module. This is the one place where
a parameter's fate is decided; :mod:`~freezekit.plan` turns the decisions into changes.

For each parameter and module, the **last rule that selects it decides**, separately for four
things: a parameter's ``requires_grad``; a module's eval lock; a BatchNorm's swap for a
:class:`~freezekit.norm.FrozenBatchNorm`; gradient boundaries (which only accumulate).

Rules are numbered in order. Each rule writes its number wherever it selects, so that after the
last rule every array holds the deciding rule of each thing (-1: no rule), and what each thing
becomes is read from its deciding rule once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import NoMatchError
from .index import ModelIndex
from .rules import Rule
from .select import Resolver, Selector, Unmatched
from .suggest import unmatched

__all__ = ["Decisions", "decide"]


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
    selected: list[tuple[np.ndarray, np.ndarray]]  # (unique modules, unique parameters) each rule selected


def decide(rules: tuple[Rule, ...], index: ModelIndex) -> Decisions:
    """Resolve every rule's selectors on ``index`` and decide. Raises :class:`NoMatchError` listing
    every strict selector that selected nothing."""
    par_fu = _undecided(index.n_params)  # last freeze / unfreeze of each parameter
    mod_fu = _undecided(index.n_modules)  # last freeze / unfreeze of each module
    mod_ue = _undecided(index.n_modules)  # last unfreeze / eval_mode of each module
    boundaries: list[tuple[int, int]] = []
    selected: list[tuple[np.ndarray, np.ndarray]] = []  # (modules, parameters) of each rule
    resolver = Resolver(index)
    problems: list[str] = []
    for i, rule in enumerate(rules):
        mods = pars = None
        for sel in rule.selectors:
            seen = len(resolver.unmatched)
            m, p = resolver.resolve(sel)
            if rule.strict:
                if len(resolver.unmatched) > seen:
                    problems += [_no_match(i, rule, u, sel, index) for u in resolver.unmatched[seen:]]
                elif not sel.selects_what_matched and not (p.any() or m.any()):
                    problems.append(f"policy[{i}].{rule.action}: {sel!r} selected nothing in "
                                    f"{index.model_name}: every match was excluded")
            mods, pars = (m, p) if mods is None else (mods | m, pars | p)  # never changed in place
        selected.append((mods, pars))
        if rule.action in ("freeze", "unfreeze"):
            par_fu[pars] = i
            mod_fu[mods] = i
        if rule.action in ("unfreeze", "eval_mode"):
            mod_ue[mods] = i
        if rule.action == "detach":
            roots = index.complete_roots(mods).nonzero()[0].tolist()
            boundaries += [(u, i) for u in roots]
            if rule.strict and mods.any() and not roots:
                problems.append(f"policy[{i}].{rule.action}: selects parameters but no whole module in "
                                f"{index.model_name}; a boundary goes on modules")
    if problems:
        raise NoMatchError(problems)
    return _outcome(rules, index, par_fu, mod_fu, mod_ue, boundaries, selected)


def _outcome(rules: tuple[Rule, ...], index: ModelIndex, par_fu: np.ndarray, mod_fu: np.ndarray,
             mod_ue: np.ndarray, boundaries: list[tuple[int, int]], selected: list[tuple[np.ndarray, np.ndarray]]
             ) -> Decisions:
    """The decisions, read from the deciding rules. A freeze speaks for the norm layers with
    running statistics among its modules, and for no other module."""

    kind = [f"freeze:{r.norm}" if r.action == "freeze" else r.action for r in rules]

    def of(by: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
        """1 where the deciding rule is one of ``kinds``, 0 where it is another rule, -1 where none decided."""
        is_kind = np.array([k in kinds for k in kind] + [-1], dtype=np.int8)  # by == -1 reads the last: -1
        return is_kind[by]

    requires_grad = of(par_fu, ("unfreeze",))
    if "freeze:trainable" in kind:  # norm parameters stay trainable
        requires_grad[(of(par_fu, ("freeze:trainable",)) == 1) & _norm_params(index)] = 1
    locked, locked_by = of(mod_ue, ("eval_mode",)), mod_ue.copy()
    swapped, swapped_by = _undecided(index.n_modules, np.int8), _undecided(index.n_modules)
    adapt = _undecided(index.n_modules, np.int8)
    stats = index.norm_stats.nonzero()[0]  # a freeze or unfreeze (or eval_mode) decides their lock
    by = np.maximum(mod_fu[stats], mod_ue[stats])
    locked_by[stats] = by
    locked[stats] = of(by, ("eval_mode", "freeze:eval", "freeze:frozen_bn"))
    adapt[stats] = of(by, ("freeze:train",))
    swap = np.array(index.swappable, dtype=np.intp)  # a freeze or unfreeze decides a swap
    by = mod_fu[swap]
    swapped_by[swap] = by
    swapped[swap] = of(by, ("freeze:frozen_bn",))
    release = swap[(swapped[swap] == 1) & (locked_by[swap] == by)]
    locked[release] = 0  # a frozen BatchNorm needs no lock
    held = np.zeros(index.n_modules, dtype=bool)
    held[index.eval_locked()] = True  # releasing a lock matters where there is one
    dead = _dead(rules, selected, index, (par_fu, locked_by[(locked == 1) | ((locked == 0) & held)], swapped_by))
    return Decisions(requires_grad, par_fu, locked, locked_by, swapped, swapped_by, boundaries, adapt, dead, selected)


def _dead(rules: tuple[Rule, ...], selected: list[tuple[np.ndarray, np.ndarray]], index: ModelIndex,
          deciders: tuple[np.ndarray, ...]) -> list[int]:
    """The rules that decide nothing though they selected something they could decide: a freeze
    its parameters or norm layers, an unfreeze its parameters or modules, an eval_mode its modules.
    Releasing a lock only matters where one is: a rule whose only surviving decisions are releases
    of locks that are not there (an unfreeze overridden by a later freeze) is as good as dead."""
    deciding = np.zeros(len(rules) + 1, dtype=bool)  # the last: "no rule" (-1)
    for by in deciders:
        deciding[by] = True
    dead = []
    for i, (rule, (mods, pars)) in enumerate(zip(rules, selected)):
        if deciding[i] or rule.action == "detach":
            continue
        if rule.action == "freeze":
            mods = mods & index.norms
        if (rule.action != "eval_mode" and pars.any()) or mods.any():
            dead.append(i)
    return dead


def _undecided(n: int, dtype: type = np.intp) -> np.ndarray:
    return np.full(n, -1, dtype=dtype)


def _norm_params(index: ModelIndex) -> np.ndarray:
    """Unique-parameter mask of the parameters of norm layers."""
    param = np.zeros(index.n_params, dtype=bool)
    param[index.par_uid[index.norms[index.mod_uid[index.param_owner]]]] = True
    return param


def _no_match(i: int, rule: Rule, u: Unmatched, sel: Selector, index: ModelIndex) -> str:
    inside = "" if u.selector is sel else f" (in {sel!r})"
    return f"policy[{i}].{rule.action}: {u.pattern!r}{inside} {unmatched(u.pattern, u.kind, index)}"
