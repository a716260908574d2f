"""Optimizer parameter groups, and keeping an optimizer in step when the trainable set changes.

:func:`param_groups` builds torch parameter groups from the trainable parameters only, each once:
weight decay off for biases, 1-D parameters and position/class tokens, learning-rate and decay
rules by selector, and layer-wise learning-rate decay. :func:`sync_optimizer` adds what became
trainable (once), clears the gradients of what was frozen, and keeps an attached LR scheduler
valid for the new groups.

Example:
    >>> import torch, timm, freezekit as fk
    >>> vit = timm.create_model("test_vit", pretrained=False)
    >>> _ = fk.Policy(fk.freeze("*"), fk.unfreeze(fk.last("blocks", 1), "head")).apply(vit)
    >>> groups = fk.param_groups(vit, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    >>> optimizer = torch.optim.AdamW(groups)
    >>> [g["name"] for g in optimizer.param_groups]
    ['layer6.no_decay', 'layer6.decay', 'layer7.decay', 'layer7.no_decay']
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .index import ModelIndex, unwrap
from .select import Resolver, Selector, as_selector
from .tracking import track_optimizer

__all__ = ["SyncReport", "layer_ids", "param_groups", "sync_optimizer"]

# Parameters that are positions or tokens rather than weights: no weight decay, as in timm / BEiT.
_TOKENS = re.compile(r"(^|\.)(pos_embed\w*|cls_token|dist_token|reg_token|mask_token|absolute_pos_embed|"
                     r"relative_position_bias_table|position_embeddings|\w*_token)$")
# Containers whose numbered children are the model's layers, when the model does not say.
_LAYERS = re.compile(r"(?:^|\.)(?:blocks|layers|layer|stages|resblocks|h|encoder\.layer)\.(\d+)(?:\.|$)|"
                     r"(?:^|\.)layer(\d+)(?:\.|$)")
_RULE_KEYS = ("lr_mult", "wd_mult", "lr", "weight_decay")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """``(name -> layer id, number of layers)`` for layer-wise learning-rate decay: embeddings and
    stem first (0), the head last. Uses the model's own ``group_matcher()`` where timm provides one,
    else the numbered children of ``blocks`` / ``layers`` / ``layerN`` / ``stages`` and the like."""
    model = unwrap(model)
    names = [n for n, _ in model.named_parameters()]
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        grouped = group_parameters(model, matcher(coarse=False))
        ordered = sorted(grouped)
        ids = {name: ordered.index(key) for key, members in grouped.items() for name in members}
        last = len(ordered) - 1
        return {n: ids.get(n, last) for n in names}, last + 1
    keys: dict[str, tuple] = {}
    for name in names:
        m = _LAYERS.search(name)
        if m:
            keys[name] = (name[: m.start()], int(m.group(1) or m.group(2)))
    if not keys:
        return {n: 0 for n in names}, 1
    order = sorted(set(keys.values()), key=lambda k: names.index(next(n for n in names if keys.get(n) == k)))
    rank = {k: i + 1 for i, k in enumerate(order)}
    first_layer = min(names.index(n) for n in keys)
    head = len(order) + 1
    return {n: rank[keys[n]] if n in keys else (0 if names.index(n) < first_layer else head)
            for n in names}, head + 1


def _no_decay_mask(model: nn.Module, index: ModelIndex, no_decay: Any) -> np.ndarray:
    if no_decay is None or no_decay is False:
        return np.zeros(index.n_params, dtype=bool)
    if no_decay == "auto":
        declared = set()
        hook = getattr(unwrap(model), "no_weight_decay", None)
        if callable(hook):
            declared = set(hook())
        return np.array([p.ndim <= 1 or name.endswith(".bias") or bool(_TOKENS.search(name)) or name in declared
                         for name, p in zip(index.param_names, index.params)], dtype=bool)
    selectors = no_decay if isinstance(no_decay, (list, tuple)) else [no_decay]
    resolver = Resolver(index)
    mask = np.zeros(index.n_params, dtype=bool)
    for sel in selectors:
        mask |= resolver.resolve(as_selector(sel, "param_groups(): no_decay"))[1]
    return mask


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 rules: list[tuple[Selector | str, dict[str, float]]] | tuple = (),
                 layer_decay: float | None = None, no_decay: Any = "auto") -> list[dict[str, Any]]:
    """Torch parameter groups of ``model``'s trainable parameters, each parameter once.

    Args:
        lr, weight_decay: the base learning rate and weight decay.
        rules: ``(selector, {"lr_mult" | "lr" | "wd_mult" | "weight_decay": value})`` pairs; for each
            parameter the last rule that speaks about its learning rate decides it (``lr`` absolute,
            ``lr_mult`` times the base and layer scale), and likewise for weight decay.
        layer_decay: layer-wise learning-rate decay: layer ``i`` of ``n`` gets
            ``layer_decay ** (n - 1 - i)`` (the head 1, the embeddings the least).
        no_decay: ``"auto"`` (biases, 1-D parameters, position/class tokens, and what the model's
            ``no_weight_decay()`` names), a selector / pattern or list of them, or None.

    Every group carries ``name``, ``lr``, ``weight_decay``, ``lr_scale`` (its rate over the base
    rate) and ``base_weight_decay``, which :func:`sync_optimizer` reads to add groups consistently.
    """
    _check_number("param_groups(): lr", lr, positive=True)
    _check_number("param_groups(): weight_decay", weight_decay)
    if layer_decay is not None:
        _check_number("param_groups(): layer_decay", layer_decay, positive=True)
    if not isinstance(rules, (list, tuple)):
        raise TypeError(f"param_groups(): rules: expected a list of (selector, {{'lr_mult': ...}}) pairs, got "
                        f"{type(rules).__name__}")
    index = ModelIndex(model)
    trainable = index.requires_grad.copy()
    layer = np.zeros(index.n_params, dtype=np.int64)
    scale = np.ones(index.n_params)
    if layer_decay is not None:
        ids, n = layer_ids(model)
        layer = np.array([ids.get(name, n - 1) for name in index.param_names], dtype=np.int64)
        scale = float(layer_decay) ** (n - 1 - layer)
    lrs = lr * scale
    decays = np.where(_no_decay_mask(model, index, no_decay), 0.0, float(weight_decay))
    lr_rule = np.full(index.n_params, -1, dtype=np.int64)
    resolver = Resolver(index)
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[1], dict):
            raise TypeError(f"param_groups(): rules[{i}]: expected (selector, {{'lr_mult': ...}}), got {rule!r}")
        selector, options = rule
        unknown = set(options) - set(_RULE_KEYS)
        if unknown:
            raise ValueError(f"param_groups(): rules[{i}]: unknown keys {sorted(unknown)} (expected "
                             f"{', '.join(_RULE_KEYS)})")
        for key, value in options.items():
            _check_number(f"param_groups(): rules[{i}].{key}", value, positive=key == "lr")
        chosen = resolver.resolve(as_selector(selector, f"param_groups(): rules[{i}]"))[1]
        if "lr" in options:
            lrs[chosen] = options["lr"]
        elif "lr_mult" in options:
            lrs[chosen] = lr * scale[chosen] * options["lr_mult"]
        if "lr" in options or "lr_mult" in options:
            lr_rule[chosen] = i
        if "weight_decay" in options:
            decays[chosen] = options["weight_decay"]
        elif "wd_mult" in options:
            decays[chosen] = weight_decay * options["wd_mult"]
    groups: dict[tuple, dict[str, Any]] = {}
    for p in trainable.nonzero()[0].tolist():
        key = (float(lrs[p]), float(decays[p]), int(layer[p]), int(lr_rule[p]))
        if key not in groups:
            parts = ([f"layer{layer[p]}"] if layer_decay is not None else []) + \
                    ([f"rule{lr_rule[p]}"] if lr_rule[p] >= 0 else []) + ["decay" if decays[p] else "no_decay"]
            groups[key] = {"name": ".".join(parts), "params": [], "lr": key[0], "weight_decay": key[1],
                           "lr_scale": key[0] / lr, "base_weight_decay": float(weight_decay)}
        groups[key]["params"].append(index.params[p])
    return list(groups.values())


def _check_number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf or \
            (positive and value == 0):
        raise ValueError(f"{name}: expected a {'positive' if positive else 'non-negative'} number, got {value!r}")


@dataclass
class SyncReport:
    """What :func:`sync_optimizer` did."""

    added: list[str] = field(default_factory=list)  # parameters added to the optimizer
    groups: list[str] = field(default_factory=list)  # names of the groups added
    cleared: list[str] = field(default_factory=list)  # frozen parameters whose .grad was cleared
    dropped: list[str] = field(default_factory=list)  # frozen parameters whose optimizer state was dropped

    def __bool__(self) -> bool:
        return bool(self.added or self.cleared or self.dropped)

    def __str__(self) -> str:
        parts = [f"added {len(self.added)} parameters in {', '.join(self.groups)}" if self.added else "",
                 f"cleared .grad of {len(self.cleared)} frozen parameters" if self.cleared else "",
                 f"dropped optimizer state of {len(self.dropped)}" if self.dropped else ""]
        return "; ".join(p for p in parts if p) or "optimizer already in step"


def sync_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, lr_mult: float = 1.0,
                   scheduler: Any = None, drop_state: bool = False,
                   rules: list[tuple[Selector | str, dict[str, float]]] | tuple = (),
                   layer_decay: float | None = None) -> SyncReport:
    """Bring ``optimizer`` in step with what trains in ``model`` now (modifies both in place).

    Newly trainable parameters (by identity: never twice) join as new groups built like
    :func:`param_groups` builds them (weight decay split, and the same ``rules`` and
    ``layer_decay`` if given), at ``lr_mult`` times the base rate, and at the point of the schedule
    the other groups are at. The base rate and that point are read off the first group: its
    ``initial_lr`` (set by a scheduler) or ``lr``, over its ``lr_scale`` (set by
    :func:`param_groups`; 1 otherwise); a scheduler's ``max_lr`` / ``min_lr`` scale alike. The weight
    decay is :func:`param_groups`' (recorded in the first group), else the largest of the groups'.
    Frozen parameters lose their ``.grad`` (and, with ``drop_state``, their optimizer state).
    ``scheduler`` (a torch LR scheduler, ``SequentialLR`` and ``ReduceLROnPlateau`` included)
    learns about the new groups.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"sync_optimizer(): optimizer: expected a torch.optim.Optimizer, "
                        f"got {type(optimizer).__name__}")
    _check_number("sync_optimizer(): lr_mult", lr_mult, positive=True)
    if not isinstance(drop_state, bool):
        raise TypeError(f"sync_optimizer(): drop_state: expected True or False, got {drop_state!r}")
    track_optimizer(optimizer, model)
    index = ModelIndex(model)
    report = SyncReport()
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p, rg in zip(index.param_names, index.params, index.requires_grad.tolist()):
        if rg:
            continue
        if p.grad is not None:
            p.grad = None
            report.cleared.append(name)
        if drop_state and id(p) in held and optimizer.state.pop(p, None) is not None:
            report.dropped.append(name)
    new = {id(index.params[i]) for i, rg in enumerate(index.requires_grad.tolist()) if rg}
    new -= held
    if not new:
        return report
    first = optimizer.param_groups[0]
    initial = first.get("initial_lr", first["lr"])
    base = initial / first.get("lr_scale", 1.0)  # the rate before multipliers and schedule
    progress = first["lr"] / initial if initial else 1.0  # where the schedule is now
    # The weight decay of the split: param_groups' own record, else the largest of the groups' (an
    # optimizer built elsewhere, Hugging Face's: the decay group and the no-decay one; its defaults
    # may not hold the decay at all).
    decay = first.get("base_weight_decay", max(g.get("weight_decay", 0.0) for g in optimizer.param_groups))
    start = len(optimizer.param_groups)
    for fresh in param_groups(model, lr=base, weight_decay=decay, rules=rules, layer_decay=layer_decay):
        params = [p for p in fresh["params"] if id(p) in new]
        if not params:
            continue
        rate = fresh["lr"] * lr_mult
        group = {"name": f"sync{start}.{fresh['name']}", "params": params, "lr": rate * progress,
                 "lr_scale": rate / base, "base_weight_decay": decay, "weight_decay": fresh["weight_decay"]}
        if "initial_lr" in first:
            for key in ("initial_lr", "max_lr", "min_lr"):  # set by schedulers (the last two: OneCycleLR)
                if key in first:
                    group[key] = first[key] * rate / initial
        for key in ("max_momentum", "base_momentum"):  # OneCycleLR's momentum cycle
            if key in first:
                group[key] = first[key]
        optimizer.add_param_group(group)
        report.groups.append(group["name"])
    report.added = [n for n, p in zip(index.param_names, index.params) if id(p) in new]
    if scheduler is not None:
        _extend_scheduler(scheduler, optimizer, start)
    return report


def _extend_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, start: int) -> None:
    """Make a torch LR scheduler cover the optimizer's groups from ``start`` on, like group 0."""
    new = optimizer.param_groups[start:]
    for child in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        _extend_scheduler(child, optimizer, start)
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = list(scheduler.base_lrs)[:start] + [g.get("initial_lr", g["lr"]) for g in new]
    if hasattr(scheduler, "lr_lambdas"):  # LambdaLR, MultiplicativeLR: the first group's shape
        scheduler.lr_lambdas = list(scheduler.lr_lambdas)[:start] + [scheduler.lr_lambdas[0]] * len(new)
    if hasattr(scheduler, "min_lrs"):  # ReduceLROnPlateau
        scheduler.min_lrs = list(scheduler.min_lrs)[:start] + [scheduler.min_lrs[0]] * len(new)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
