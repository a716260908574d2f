"""Plans: what applying a policy would change, computed without changing anything.

A :class:`Plan` takes the :func:`~freezekit.decide.decide` decisions for a model and works out,
against the model as it is, what would change: the :attr:`Plan.steps` that ``apply`` performs
(each carrying its targets and able to undo itself), and the views a person reads
(:attr:`~Plan.changes`, :attr:`~Plan.parameters`, :attr:`~Plan.modules`, ``str(plan)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from . import boundary as _boundary
from . import lock as _lock
from .decide import decide
from .errors import some
from .index import ModelIndex
from .norm import STATS_ADAPT, FrozenBatchNorm, frozen
from .rules import Rule
from .steps import UNSET, AddBoundary, Lock, Release, SetAttribute, SetRequiresGrad, Step, Swap

__all__ = ["Change", "ModulePlan", "ParamPlan", "Plan"]

# DistributedDataParallel leaves out of its reducer the parameters named in this attribute of the
# module it wraps (its own "module_name.param_name" spelling, so ".weight" for the root's).
DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


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
    """What applying ``rules`` to the model of ``index`` would do, computed without changing anything.

    Raises :class:`~freezekit.NoMatchError` if a strict selector matches nothing.

    Attributes:
        rules: the rules planned, in order.
        index: the model's :class:`~freezekit.index.ModelIndex`.
        decisions: what the rules decide (:class:`~freezekit.decide.Decisions`).
        swaps: unique module -> True (a frozen BatchNorm goes in) / False (the original comes back).
        placed: unique module -> the module that will sit at each place swapped.
        requires_grad_before, requires_grad_after: per unique parameter.
        detached: per unique parameter, behind an output boundary after the plan.
        steps: what ``apply`` performs, in order.
        warnings: one line per dead rule (every selection overridden by later rules).
    """

    def __init__(self, rules: tuple[Rule, ...], index: ModelIndex):
        self.rules, self.index = rules, index
        d = self.decisions = decide(rules, index)
        modules = index.modules
        # The model as it is now, read once: a plan keeps describing the model it was made on.
        self._cuts_before = {u: tuple(_boundary.boundaries(modules[u])) for u in index.maybe_cut}
        locked_before = set(index.eval_locked())
        self.swaps = _flips(d.swapped, set(index.frozen_bn))
        # the module that will sit at each place swapped (placed), and which places will be locked then
        self.placed = {u: frozen(modules[u]) if swap else modules[u].original for u, swap in self.swaps.items()}
        self._locked_now = (locked_before - set(self.swaps)) | {u for u, m in self.placed.items() if _lock.is_locked(m)}
        self.locks = _flips(d.locked, self._locked_now)
        self.new_boundaries = self._boundaries_to_add()
        added_cuts = [u for u, i in self.new_boundaries if rules[i].at == "output"]
        self.detached = index.behind_output_boundaries(added_cuts)
        self.steps = self._steps()
        self.warnings = [f"policy[{i}] {rules[i]!r} is dead: later rules override everything it selects"
                         for i in d.dead]
        self.tied = self._tied() if len(index.par_uid) != index.n_params else []
        self.notes = self._fixed_norms()

    def _fixed_norms(self) -> list[str]:
        """One line per unfreeze that covers norm layers whose weight and bias are buffers, not
        parameters (torchvision's FrozenBatchNorm2d): no flag can make them train."""
        index, lines = self.index, []
        if not any(r.action == "unfreeze" for r in self.rules):
            return lines
        norms = index.norms.nonzero()[0]  # one of each class tells for its class
        classes, first = np.unique(index.class_of[norms], return_index=True)
        fixed_classes = [c for c, u in zip(classes.tolist(), norms[first].tolist())
                         if index.modules[u]._buffers.get("weight") is not None]
        if not fixed_classes:
            return lines
        fixed = index.norms & np.isin(index.class_of, fixed_classes)
        for i, rule in enumerate(self.rules):
            if rule.action == "unfreeze" and (hit := (self.decisions.selected[i][0] & fixed)).any():
                kinds = sorted({type(index.modules[u]).__name__ for u in hit.nonzero()[0].tolist()})
                lines.append(f"policy[{i}] {rule!r} covers {int(hit.sum())} {'/'.join(kinds)} whose weight and bias "
                             "are buffers, not parameters: they stay fixed (build the model with trainable norm "
                             "layers, e.g. norm_layer=nn.BatchNorm2d, to train them)")
        return lines

    def _tied(self) -> list[str]:
        """One line per tied tensor (one tensor, several names) whose names different rules selected
        (or some no rule did): which rule decided it, through which names, and that every name follows.
        A rule selects a name when it selects the module holding it (or, selecting none of them, the
        tensor itself)."""
        index, d, rules = self.index, self.decisions, self.rules
        owner = index.mod_uid[index.param_owner]  # per parameter occurrence: the unique module holding it
        names: dict[int, list[int]] = {}
        for j, u in enumerate(index.par_uid.tolist()):
            names.setdefault(u, []).append(j)
        lines = []
        for u, occurrences in names.items():
            by = int(d.requires_grad_by[u])
            if len(occurrences) < 2 or by < 0:
                continue
            deciding = [i for i, r in enumerate(rules) if r.action in ("freeze", "unfreeze") and d.selected[i][1][u]]
            last = {}  # name -> the last freeze / unfreeze that selected it by that name
            for j in occurrences:
                mods = [d.selected[i][0] for i in deciding]
                last[j] = max((i for i, m in zip(deciding, mods) if m[owner[j]] or not m[owner[occurrences]].any()),
                              default=-1)
            if len(set(last.values())) < 2:
                continue
            state = "trainable" if d.requires_grad[u] == 1 else "frozen"
            through = [index.par_names[j] for j in occurrences if last[j] == by]
            others = [f"{index.par_names[j]} ({f'policy[{i}] {rules[i]!r}' if (i := last[j]) >= 0 else 'no rule'})"
                      for j in occurrences if last[j] != by]
            lines.append(f"{index.par_names[occurrences[0]]} is one tensor under {len(occurrences)} names: "
                         f"policy[{by}] {rules[by]!r} makes it {state} through {', '.join(through)}, and so also "
                         f"{', '.join(others)}")
        return lines

    def _boundaries_to_add(self) -> list[tuple[int, int]]:
        """(unique module, rule) of the boundaries to add; one already there is not added again."""
        out, seen = [], set()
        for u, i in self.decisions.boundaries:
            key = (u, self.rules[i].at, self.rules[i].no_grad)
            if key[1:] not in {(b.at, b.no_grad) for b in self._cuts_before.get(u, ())} and key not in seen:
                seen.add(key)
                out.append((u, i))
        return out

    def _steps(self) -> list[Step]:
        index, d = self.index, self.decisions
        params, modules = index.params, index.modules
        steps: list[Step] = []
        for u, new in self.placed.items():  # every place that holds it, each once
            slots = list(dict.fromkeys(index.slot(o) for o in index.occurrences(u)))
            steps.append(Swap(modules[u], new, slots, index.ancestors(u)))
        placed = [self.placed.get(u, m) for u, m in enumerate(modules)] if self.placed else modules
        # each flag is read as it is set: what it was is requires_grad_before
        self._flags = [SetRequiresGrad([params[p] for p in (d.requires_grad == value).nonzero()[0].tolist()],
                                       bool(value)) for value in (0, 1)]
        steps += self._flags
        steps.append(Lock([placed[u] for u, lock in self.locks.items() if lock]))
        released = [u for u, lock in self.locks.items() if not lock]  # in model order: outer ones first
        steps.append(Release([placed[u] for u in released], [index.ancestors(u) for u in released]))
        # the marks of norm layers whose statistics were chosen to adapt (audit reads them)
        for u in sorted({*index.adapting, *(d.stats_adapt == 1).nonzero()[0].tolist(), *self.placed}):
            want, has = d.stats_adapt[u] == 1, STATS_ADAPT in placed[u].__dict__
            if d.stats_adapt[u] >= 0 and want != has:
                steps.append(SetAttribute(placed[u], STATS_ADAPT, True if want else UNSET))
        for u, i in self.new_boundaries:
            steps.append(AddBoundary(placed[u], self.rules[i].at, self.rules[i].no_grad))
        if self.new_boundaries:  # a DDP wrapper built later must not wait for gradients that cannot come
            behind = {index.par_names[j] for j in self.detached[index.par_uid].nonzero()[0].tolist()}
            behind |= {"." + n for n in behind if "." not in n}
            ignored = set(index.root.__dict__.get(DDP_IGNORE, ()))
            steps.append(SetAttribute(index.root, DDP_IGNORE, sorted(ignored | behind)))
        return steps

    # -- views

    @cached_property
    def requires_grad_before(self) -> np.ndarray:
        """Per unique parameter, its flag before the plan: as the apply found it, if it ran; else as it is."""
        before = self.index.requires_grad.copy()
        for step in self._flags:
            if step.was is not None:
                before[self.decisions.requires_grad == step.value] = step.was
        return before

    @cached_property
    def requires_grad_after(self) -> np.ndarray:
        """Per unique parameter, its flag after the plan."""
        d = self.decisions.requires_grad
        return np.where(d >= 0, d == 1, self.requires_grad_before)

    @cached_property
    def parameters(self) -> dict[str, ParamPlan]:
        """Qualified parameter name -> :class:`ParamPlan`, in model order."""
        rules, by = self.rules, self.decisions.requires_grad_by.tolist()
        after, before = self.requires_grad_after.tolist(), self.requires_grad_before.tolist()
        return {
            name: ParamPlan(a, ("detached" if det else "trainable") if a else "frozen",
                            rules[r] if r >= 0 else None, a != b)
            for name, a, b, det, r in zip(self.index.param_names, after, before, self.detached.tolist(), by)
        }

    @cached_property
    def eval_locked(self) -> np.ndarray:
        """Per unique module: eval-locked after the plan."""
        locked = np.zeros(self.index.n_modules, dtype=bool)
        locked[list(self._locked_now)] = True
        for u, lock in self.locks.items():
            locked[u] = lock
        return locked

    @cached_property
    def modules(self) -> dict[str, ModulePlan]:
        """Qualified module name -> :class:`ModulePlan`, in model order."""
        index, d, rules = self.index, self.decisions, self.rules
        added: dict[int, list[str]] = {}
        for u, i in self.new_boundaries:
            added.setdefault(u, []).append(rules[i].at)
        out = {}
        for u, (name, module, locked) in enumerate(zip(index.module_names, index.modules, self.eval_locked.tolist())):
            shown = type(self.placed.get(u, module))
            by = max(int(d.locked_by[u]), int(d.swapped_by[u]))
            sides = tuple(reversed(added.get(u, []))) + tuple(b.at for b in self._cuts_before.get(u, ()))
            out[name] = ModulePlan(shown.__name__, locked, issubclass(shown, FrozenBatchNorm), sides,
                                   rules[by] if by >= 0 else None,
                                   u in self.swaps or u in self.locks or u in added)
        return out

    @cached_property
    def changes(self) -> list[Change]:
        """Everything applying this plan would change, parameters first, in model order."""
        index, d, rules = self.index, self.decisions, self.rules
        before, after = self.requires_grad_before, self.requires_grad_after
        out = [Change("requires_grad", index.param_names[p], bool(before[p]), bool(after[p]),
                      rules[d.requires_grad_by[p]]) for p in (before != after).nonzero()[0].tolist()]
        out += [Change("frozen_bn", index.module_names[u], not want, want, rules[d.swapped_by[u]])
                for u, want in self.swaps.items()]
        out += [Change("eval_lock", index.module_names[u], not want, want, rules[d.locked_by[u]])
                for u, want in self.locks.items()]
        out += [Change("boundary", index.module_names[u], None, rules[i].at, rules[i]) for u, i in self.new_boundaries]
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
        index, d, rules = self.index, self.decisions, self.rules
        lines = [f"Plan for {index.model_name}: {len(rules)} rules, {index.n_params} parameter tensors, "
                 f"{len(self.changes)} changes"]
        rg_by = d.requires_grad_by
        for i, rule in enumerate(rules):
            mine = (rg_by == i).nonzero()[0]
            n_train = int((d.requires_grad[mine] == 1).sum())
            counts = [(len(mine) - n_train, "parameters frozen"), (n_train, "parameters trainable"),
                      (int(((d.locked_by == i) & (d.locked == 1)).sum()), "modules eval-locked"),
                      (int(((d.locked_by == i) & (d.locked == 0)).sum()) if rule.action != "unfreeze" else 0,
                       "modules released"),
                      (int(((d.swapped_by == i) & (d.swapped == 1)).sum()), "BatchNorms -> FrozenBatchNorm"),
                      (sum(1 for _, r in d.boundaries if r == i), f"boundaries at {rule.at}")]
            parts = [f"{n} {what}" for n, what in counts if n]
            lines.append(f"  policy[{i}] {rule!r}: {', '.join(parts) if parts else 'decides nothing'}")
            if len(mine):
                lines.append("      " + some([index.param_names[p] for p in mine[:7]], 6, len(mine)))
        undecided = int((rg_by < 0).sum())
        if undecided:
            lines.append(f"  no rule: {undecided} parameters keep their flag")
        statuses = [p.status for p in self.parameters.values()]
        lines.append(f"Result: {statuses.count('trainable')} trainable, {statuses.count('frozen')} frozen, "
                     f"{statuses.count('detached')} detached parameter tensors")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"tied: {t}" for t in self.tied]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Plan {self.index.model_name}: {len(self.changes)} changes, {len(self.warnings)} warnings>"


def _flips(decided: np.ndarray, now: set[int]) -> dict[int, bool]:
    """Unique module -> True (turn on) / False (turn off), in order, where the decision (1 on, 0 off,
    -1 none) differs from what is on ``now``."""
    on = [u for u in (decided == 1).nonzero()[0].tolist() if u not in now]
    off = [u for u in now if decided[u] == 0]
    return dict(sorted([*((u, True) for u in on), *((u, False) for u in off)])) if off else dict.fromkeys(on, True)
