"""Checking a recipe against the real model (built on the meta device: instant, no weights) and
the real data, and planning each phase: what trains, what is frozen, and the learning rates.

Every problem found is reported at once, each at its line.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, DeadRuleWarning, FreezekitError, NoMatchError, closest
from ..index import ModelIndex
from ..labels import CIFAR, SHAPES, cifar_classes, classes_in
from ..models import WEIGHT_ARGUMENTS, build_for_inspection
from ..optim import param_groups, sync_optimizer
from ..plan import Plan
from ..policy import Policy
from ..schedule import Schedule
from ..select import Resolver
from ..select_config import from_config as selector_from_config
from ..suggest import unmatched
from ..summary_table import Summary, summary
from ..weights import CheckpointError, load_weights
from .load import Problem, RecipeError, _from_override, locate, split_path
from .schema import Recipe

__all__ = ["PhasePlan", "Prepared", "check", "optimizer_rules", "plan_phases"]

_PATH = re.compile(r"^((?:[A-Za-z_]\w*|\[\d+\])(?:\.[A-Za-z_]\w*|\[\d+\])*)(?:\(\))?: ")


@dataclass
class PhasePlan:
    """One phase of a recipe, planned: where it starts, what it does, the table and the groups."""

    label: str
    plan: Plan
    summary: Summary
    groups: list[tuple[str, float, float, int]]  # (name, lr, weight decay, tensors) of the optimizer


@dataclass
class Prepared:
    """What checking a recipe builds along the way, for the runner to reuse."""

    classes: list[str]
    num_classes: int
    policy: Policy
    schedule: Schedule
    phases: list[PhasePlan] = field(default_factory=list)


class _Collector:
    def __init__(self, recipe: Recipe):
        self.file, self.data, self.overridden = recipe._source or ("<recipe>", None, set())
        self.problems: list[Problem] = []

    def add(self, field_path: str, message: str) -> None:
        line = None if _from_override(field_path, self.overridden) else locate(self.data, split_path(field_path))
        self.problems.append(Problem(self.file, line, field_path, message))

    def add_located(self, message: str) -> None:
        """A library message that starts with its own path (``policy[1].freeze: ...``)."""
        for text in message.splitlines():
            m = _PATH.match(text)
            self.add(m.group(1) if m else "", text[m.end():] if m else text)


def _classes(recipe: Recipe, out: _Collector) -> list[str]:
    kind = recipe.data.kind
    if kind == "shapes":
        if recipe.data.path is not None:
            out.add("data.path", "shapes is built in and takes no path (remove it, or use kind: image_folder)")
        return list(SHAPES)
    if recipe.data.path is None:
        out.add("data.path", f"{kind} needs a path: " + ("PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg, or "
                "PATH/CLASS/*.jpg" if kind == "image_folder" else "the folder holding CIFAR's python batches"))
        return []
    root = Path(recipe.data.path).expanduser()
    if not root.is_dir():
        out.add("data.path", f"folder {str(root)!r} does not exist")
        return []
    if kind in CIFAR:
        try:
            return cifar_classes(kind, root)
        except (OSError, pickle.UnpicklingError, KeyError, EOFError) as e:
            out.add("data.path", f"{str(root)!r} holds no readable {kind} batches ({e}); expected the python "
                                 f"version's files, e.g. {CIFAR[kind][0]}/{CIFAR[kind][3]}")
            return []
    if not (root / "train").is_dir():
        classes = classes_in(root)
        if not classes:
            out.add("data.path", f"{str(root)!r} has no class folders (expected PATH/train/CLASS/*.jpg and "
                                 "PATH/val/CLASS/*.jpg, or PATH/CLASS/*.jpg)")
        return classes
    train = classes_in(root / "train")
    if not (root / "val").is_dir():
        out.add("data.path", f"{str(root)!r} has a train folder but no val folder (expected PATH/train/CLASS/*.jpg "
                             "and PATH/val/CLASS/*.jpg)")
    elif not train:
        out.add("data.path", f"{str(root / 'train')!r} has no class folders")
    elif train != (val := classes_in(root / "val")):
        out.add("data.path", f"train and val classes differ: {train} vs {val}")
    return train


def _output(recipe: Recipe, out: _Collector) -> None:
    """A recipe may come from anyone: from the file, ``output.dir`` must stay below the working
    folder (an absolute or ``..`` path is the command line's to give, ``--output`` or ``--set``)."""
    where = recipe.output.dir
    if where is None or _from_override("output.dir", out.overridden):
        return
    path = Path(where)
    if path.is_absolute() or where.startswith("~") or ".." in path.parts:
        out.add("output.dir", f"{where!r} leaves the working folder; a recipe writes below it (a relative path "
                              "without '..'); choose another place on the command line with --output")


def _model(recipe: Recipe, num_classes: int, allow_import: tuple[str, ...], out: _Collector) -> nn.Module | None:
    spec = recipe.model
    try:
        return build_for_inspection(spec.name, num_classes=num_classes, allow_import=allow_import, **spec.kwargs)
    except FreezekitError as e:
        loads = any(k in spec.kwargs for k in WEIGHT_ARGUMENTS)
        out.add("model.kwargs" if loads else "model.name", str(e).removeprefix(f"model {spec.name!r}: "))
    except TypeError as e:
        out.add("model.kwargs", f"the factory refused them: {e}")
    except Exception as e:  # the factory's own checks (assert, ValueError, RuntimeError, ...) on these values
        out.add("model.kwargs" if spec.kwargs else "model.name",
                f"building the model failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return None


def _checkpoint(recipe: Recipe, model: nn.Module | None, out: _Collector) -> None:
    if recipe.model.checkpoint is None:
        return
    try:
        weights = load_weights(Path(recipe.model.checkpoint).expanduser())
    except CheckpointError as e:
        out.add("model.checkpoint", str(e))
        return
    if model is not None:
        names = set(model.state_dict())
        if not names & set(weights):
            first = next(iter(weights))
            near = closest(first, sorted(names))
            out.add("model.checkpoint", f"none of its {len(weights)} tensors has a name of the model's (first: "
                                        f"{first!r}" + (f"; closest: {near[0]!r})" if near else ")"))


def optimizer_rules(recipe: Recipe) -> list[tuple[Any, dict[str, float]]]:
    """The optimizer's ``groups`` as :func:`freezekit.param_groups` rules."""
    rules = []
    for i, group in enumerate(recipe.optimizer.groups):
        options = {k: v for k, v in group.model_dump().items() if k != "select" and v is not None}
        select = group.select
        sel = selector_from_config(select, f"optimizer.groups[{i}].select") if not isinstance(select, list) else \
            selector_from_config({"glob": select}, f"optimizer.groups[{i}].select")
        rules.append((sel, options))
    return rules


def _groups(optimizer: torch.optim.Optimizer) -> list[tuple[str, float, float, int]]:
    return [(g.get("name", f"group{i}"), g["lr"], g["weight_decay"], len(g["params"]))
            for i, g in enumerate(optimizer.param_groups)]


def plan_phases(recipe: Recipe, model: nn.Module, policy: Policy, schedule: Schedule) -> list[PhasePlan]:
    """Plan the starting policy and each phase on ``model`` (changed in place: pass a meta copy).

    Raises:
        NoMatchError: every selector of every phase that matched nothing (the phases' own named
            ``schedule[i].policy[j]``); the planning goes on past one, to find them all.
    """
    opt = recipe.optimizer
    groups = {"rules": optimizer_rules(recipe), "layer_decay": opt.layer_decay}
    phases, problems = [], []
    optimizer = None
    stages = [("start", "policy", policy, 1.0), *((f"schedule[{i}] at {p.unit} {p.at}" + (
        f", lr x{p.lr_mult}" if p.lr_mult != 1 else ""), f"schedule[{i}].policy", p.policy, p.lr_mult)
        for i, p in enumerate(schedule.phases))]
    for label, where, stage, lr_mult in stages:
        try:
            plan = stage.plan(model)
        except NoMatchError as e:
            problems += [re.sub(r"^policy", where, line) for line in e.problems]
            stage = Policy(stage, strict=False)  # go on, to find the later phases' problems too
            plan = stage.plan(model)
        table = summary(model, policy=stage)
        stage.apply(model, check_optimizers=False)  # synced just below
        if optimizer is None:
            start_groups = param_groups(model, lr=opt.lr, weight_decay=opt.weight_decay, **groups)
            optimizer = torch.optim.SGD(start_groups, lr=opt.lr) if start_groups else None
        else:
            sync_optimizer(optimizer, model, lr_mult=lr_mult, **groups)
        phases.append(PhasePlan(label, plan, table, _groups(optimizer) if optimizer is not None else []))
    if problems:
        raise NoMatchError(problems)
    return phases


def check(recipe: Recipe, allow_import: tuple[str, ...] | list[str] = ()) -> Prepared:
    """Check ``recipe`` against its data and model and plan every phase.

    Raises:
        RecipeError: every problem found, each ``file:line: field: problem``.
    """
    out = _Collector(recipe)
    allow = tuple(allow_import)
    classes = _classes(recipe, out)
    num_classes = recipe.model.num_classes or len(classes) or 1
    if recipe.model.num_classes is not None and classes and recipe.model.num_classes != len(classes):
        out.add("model.num_classes", f"{recipe.model.num_classes}, but the data has {len(classes)} classes "
                                     f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    _output(recipe, out)
    model = _model(recipe, num_classes, allow, out)
    _checkpoint(recipe, model, out)
    policy, schedule, rules = Policy(), Schedule(), []
    parsed = True  # the patterns are matched when the rules are whole, whatever else is wrong
    try:
        policy = Policy.from_config(list(recipe.policy), "policy")
    except (ConfigError, ValueError, TypeError) as e:
        out.add_located(str(e))
        parsed = False
    try:
        schedule = Schedule.from_config(recipe.schedule if isinstance(recipe.schedule, dict)
                                        else list(recipe.schedule), "schedule")
    except (ConfigError, ValueError, TypeError) as e:
        out.add_located(str(e))
        parsed = False
    try:
        rules = optimizer_rules(recipe)
    except (ConfigError, ValueError, TypeError) as e:
        out.add_located(str(e))
        parsed = False
    prepared = Prepared(classes, num_classes, policy, schedule)
    if model is not None and parsed:
        index = ModelIndex(model)
        resolver = Resolver(index)
        for i, (sel, _) in enumerate(rules):
            before = len(resolver.unmatched)
            _, params = resolver.resolve(sel)
            for u in resolver.unmatched[before:]:
                out.add(f"optimizer.groups[{i}].select", f"{u.pattern!r} {unmatched(u.pattern, u.kind, index)}")
            if len(resolver.unmatched) == before and not params.any():
                out.add(f"optimizer.groups[{i}].select", "selects no parameter")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeadRuleWarning)
                prepared.phases = plan_phases(recipe, model, policy, schedule)
        except NoMatchError as e:
            out.add_located(str(e))
    if out.problems:
        raise RecipeError(out.problems)
    return prepared
