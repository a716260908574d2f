"""``summary``: what will train and what will not, at a glance, without a forward pass.

Rows are modules down to a depth (chosen automatically so the table fits about 40 lines), with
runs of identical sibling blocks collapsed (``blocks.0-9``); each row gives the module's type, its
parameters, how many train, its status (``trainable``, ``frozen``, ``partial``, ``detached``) and
its mode (``train``, ``eval``, ``eval-locked``). The totals count each tensor once, however many
names it has, and give the memory that freezing saves: gradients plus Adam-style optimizer state
(two moments) for every parameter that will not train, at the parameters' own dtype. Works on
meta-device models; ``policy=`` previews a policy without changing the model.

Example:
    >>> import timm, freezekit as fk
    >>> vit = timm.create_model("test_vit", pretrained=False)
    >>> s = fk.summary(vit, policy=fk.Policy(fk.freeze("*"), fk.unfreeze("head")))
    >>> s.totals["trainable"] < s.totals["total"], [r.name for r in s.rows][:3]
    (True, ['cls_token', 'pos_embed', 'patch_embed'])
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch.nn as nn

from .index import ModelIndex
from .plan import Plan
from .policy import Policy

__all__ = ["Row", "Summary", "summary"]

MAX_ROWS = 40
STATUS = ("trainable", "frozen", "detached")  # codes 0, 1, 2 per parameter


@dataclass(frozen=True)
class Row:
    """One line of the table: a module, a run of identical sibling modules, or a root parameter."""

    name: str
    type: str
    parameters: int
    trainable: int
    status: str  # "trainable", "frozen", "partial", "detached", or "-" without parameters
    mode: str  # "train", "eval", "eval-locked", or "-" for a parameter
    depth: int = 1
    count: int = 1  # modules in a collapsed run
    tied: str = ""  # for a module all of whose parameters are tensors first named elsewhere: that module


class Summary:
    """The summary of a model: :attr:`rows`, :attr:`totals`, printable three ways."""

    def __init__(self, model: str, rows: list[Row], totals: dict[str, Any], depth: int):
        self.model = model
        self.rows = rows
        self.totals = totals
        self.depth = depth

    def to_dict(self) -> dict[str, Any]:
        """``{"model", "rows": [{name, type, parameters, trainable, status, mode, tied}], "totals": {total,
        trainable, frozen, detached, trainable_pct, saved_bytes}}``: JSON-ready, stable."""
        keys = ("name", "type", "parameters", "trainable", "status", "mode", "tied")
        return {"model": self.model, "rows": [{k: asdict(r)[k] for k in keys} for r in self.rows],
                "totals": dict(self.totals)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _cells(self) -> list[list[str]]:
        return [["  " * (r.depth - 1) + r.name + (f" (tied to {r.tied})" if r.tied else ""),
                 r.type + (f" x{r.count}" if r.count > 1 else ""),
                 f"{r.parameters:,}", f"{r.trainable:,}", r.status, r.mode] for r in self.rows]

    def _footer(self) -> str:
        t = self.totals
        return (f"total {t['total']:,} parameters: {t['trainable']:,} trainable ({t['trainable_pct']:.2f}%), "
                f"{t['frozen']:,} frozen, {t['detached']:,} detached; freezing saves {_bytes(t['saved_bytes'])} "
                f"of gradients and optimizer state")

    def __str__(self) -> str:
        header = ["name", "type", "parameters", "trainable", "status", "mode"]
        cells = self._cells()
        widths = [max(len(header[i]), *(len(c[i]) for c in cells)) if cells else len(header[i]) for i in range(6)]
        right = {2, 3}

        def line(values: list[str]) -> str:
            return "  ".join(v.rjust(w) if i in right else v.ljust(w)
                             for i, (v, w) in enumerate(zip(values, widths))).rstrip()

        rule = "-" * len(line(header))
        return "\n".join([f"{self.model} (depth {self.depth})", line(header), rule, *map(line, cells), rule,
                          self._footer()])

    def to_markdown(self) -> str:
        lines = [f"**{self.model}**", "", "| name | type | parameters | trainable | status | mode |",
                 "| --- | --- | ---: | ---: | --- | --- |"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in [c0.strip(), *rest]) + " |"
                  for c0, *rest in self._cells()]
        return "\n".join([*lines, "", self._footer()])

    def __repr__(self) -> str:
        return f"<Summary {self.model}: {len(self.rows)} rows, {self.totals['total']:,} parameters>"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Table:
    """Per-occurrence numbers for building rows: subtree sums by prefix sums over pre-order."""

    def __init__(self, index: ModelIndex, status: np.ndarray, locked: np.ndarray,
                 swapped: dict[int, type] | None = None):
        self.index = index
        first = np.zeros(len(index.par_uid), dtype=bool)  # each tensor counted at its first name only
        first[np.unique(index.par_uid, return_index=True)[1]] = True
        numel = np.fromiter((p.numel() for p in index.params), dtype=np.int64, count=index.n_params)
        size = np.fromiter((p.element_size() for p in index.params), dtype=np.int64, count=index.n_params)
        occ_numel = numel[index.par_uid] * first
        occ_status = status[index.par_uid]
        seen = numel[index.par_uid]  # every name: a module whose tensors are tied has their status
        starts, ends = index.mod_pstart[:-1], index.mod_pstart[index.mod_end]

        def subtree(values: np.ndarray) -> np.ndarray:  # per module occurrence
            prefix = np.concatenate(([0], np.cumsum(values)))
            return prefix[ends] - prefix[starts]

        self.total = subtree(occ_numel)
        self.by_status = [subtree(occ_numel * (occ_status == code)) for code in range(len(STATUS))]
        self.seen_by_status = [subtree(seen * (occ_status == code)) for code in range(len(STATUS))]
        # the module that holds each tensor's first name, for rows whose tensors are all named before
        first_names = np.array(index.par_names, dtype=object)[first.nonzero()[0]][np.argsort(index.par_uid[first])]
        self.holder = [name.rpartition(".")[0] for name in first_names.tolist()]
        classes, class_of = list(index.classes), index.class_of
        if swapped:  # a preview: the classes a policy swaps in (FrozenBatchNorm, or back)
            class_of = class_of.copy()
            for u, cls in swapped.items():
                if cls not in classes:
                    classes.append(cls)
                class_of[u] = classes.index(cls)
        self.class_of = class_of[index.mod_uid]
        self.class_names = [c.__name__ for c in classes]
        mode = np.where(locked, 2, index.training.astype(np.int64))
        self.mode_of = mode[index.mod_uid]
        # Two sibling modules are "identical" for collapsing if all of these agree.
        self.signature = np.stack([self.class_of, index.mod_end - np.arange(len(index.mod_end)), self.mode_of,
                                   self.total, *self.by_status], axis=1)
        self.numel, self.size, self.status = numel, size, status

    def row(self, members: np.ndarray, name: str, depth: int) -> Row:
        def total_of(values: np.ndarray) -> int:
            return int(values[members[0]]) if len(members) == 1 else int(values[members].sum())  # most rows: one

        total, trainable = total_of(self.total), total_of(self.by_status[0])
        seen = [total_of(c) for c in self.seen_by_status]  # the status counts every name of a tied tensor
        tied = ""
        if total == 0 and sum(seen):  # every tensor here is tied to one named before: show those
            total, trainable = sum(seen), seen[0]
            tied = self.holder[int(self.index.par_uid[self.index.mod_pstart[members[0]]])]
        status = "-" if not sum(seen) else next((s for s, c in zip(STATUS, seen) if c == sum(seen)), "partial")
        modes = set(self.mode_of[members].tolist())
        mode = "eval-locked" if modes == {2} else ("train" if modes == {1} else ("eval" if modes == {0} else "mixed"))
        return Row(name, self.class_names[self.class_of[members[0]]], total, trainable, status, mode, depth,
                   len(members), tied)


def _children_groups(table: _Table, members: np.ndarray, label: str) -> list[tuple[np.ndarray, str]]:
    """The child groups of a group of identical modules, with runs of identical siblings collapsed.

    Identical modules have identical layouts, so the children of every member sit at the same
    offsets from it as the first member's children do from the first member."""
    idx = table.index
    first = int(members[0])
    kids = np.asarray(idx.children(first), dtype=np.int64)
    if not len(kids):
        return []
    per_member = np.add.outer(members - first, kids)  # [member, child]
    names = [idx.mod_names[k].rpartition(".")[2] for k in kids.tolist()]
    numbers = np.array([int(n) if n.isdigit() else -2 for n in names], dtype=np.int64)
    same = (table.signature[kids[1:]] == table.signature[kids[:-1]]).all(axis=1)
    continues = np.concatenate(([False], same & (numbers[1:] == numbers[:-1] + 1) & (numbers[:-1] >= 0)))
    heads = [*(~continues).nonzero()[0].tolist(), len(kids)]
    groups = []
    for start, stop in pairwise(heads):
        name = names[start] if stop - start == 1 else f"{names[start]}-{names[stop - 1]}"
        groups.append((per_member[:, start:stop].reshape(-1), f"{label}.{name}" if label else name))
    return groups


def _rows(table: _Table, depth: int, limit: int | None = None, memo: dict[str, Any] | None = None) -> list[Row] | None:
    """Rows down to ``depth``; None once more than ``limit`` rows would be needed. ``memo`` keeps
    each group's row and children between calls at growing depths."""
    idx = table.index
    memo = {} if memo is None else memo

    def children(members: np.ndarray, name: str) -> list[tuple[np.ndarray, str]]:
        key = "children:" + name
        if key not in memo:
            memo[key] = _children_groups(table, members, name)
        return memo[key]

    rows: list[Row] = []
    for p in range(int(idx.mod_pstart[1]) if len(idx.mod_pstart) > 1 else 0):  # the root's own parameters
        u = int(idx.par_uid[p])
        status = STATUS[int(table.status[u])]
        n = int(table.numel[u])
        rows.append(Row(idx.par_names[p], "Parameter", n, n if status == "trainable" else 0, status, "-", 1, 1))
    stack = [(g, 1) for g in reversed(children(np.zeros(1, dtype=np.int64), ""))]
    while stack:
        (members, name), level = stack.pop()
        key = "row:" + name
        if key not in memo:
            memo[key] = table.row(members, name, level)
        rows.append(memo[key])
        if limit is not None and len(rows) > limit:
            return None
        if level < depth:
            stack += [(g, level + 1) for g in reversed(children(members, name))]
    return rows


def summary(model: nn.Module, depth: int | None = None, policy: Policy | None = None) -> Summary:
    """Summarize what trains in ``model``, as it is or as ``policy`` would leave it (the model is not
    changed). No forward pass; meta-device models are welcome.

    Args:
        model: any module (DDP / compile / FSDP wrappers are seen through).
        depth: how deep the rows go (1: the model's children); None picks the deepest that keeps
            the table within about 40 rows.
        policy: a policy to preview.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"summary(): model: expected a torch.nn.Module, got {type(model).__name__}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"summary(): depth: expected a positive int or None, got {depth!r}")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"summary(): policy: expected a freezekit Policy, got {type(policy).__name__}")
    index = ModelIndex(model)
    swapped: dict[int, type] = {}
    if policy is not None:
        plan = Plan(policy.rules, index)
        swapped = {u: type(m) for u, m in plan.placed.items()}
        requires_grad, detached, locked = plan.requires_grad_after, plan.detached, plan.eval_locked
    else:
        requires_grad, detached = index.requires_grad, index.behind_output_boundaries()
        locked = np.zeros(index.n_modules, dtype=bool)
        locked[index.eval_locked()] = True
    status = np.where(~requires_grad, 1, np.where(detached, 2, 0))
    table = _Table(index, status, locked, swapped)
    if depth is None:
        memo: dict[str, Any] = {}
        depth, rows = 1, _rows(table, 1, memo=memo)
        while True:
            deeper = _rows(table, depth + 1, MAX_ROWS, memo)
            if deeper is None or deeper == rows:
                break
            depth, rows = depth + 1, deeper
    else:
        rows = _rows(table, depth)
    total = int(table.numel.sum())
    by = {s: int(table.numel[status == code].sum()) for code, s in enumerate(STATUS)}
    saved = int((table.numel * table.size)[status != 0].sum()) * 3  # gradient + two Adam moments
    totals = {"total": total, "trainable": by["trainable"], "frozen": by["frozen"], "detached": by["detached"],
              "trainable_pct": round(100.0 * by["trainable"] / total, 2) if total else 0.0, "saved_bytes": saved}
    return Summary(index.model_name, rows, totals, depth)
