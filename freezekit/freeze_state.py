"""The freeze map of a model, and carrying it through checkpoints.

:func:`state` reads what freezekit (or anyone) did to a model: each parameter's status
(``trainable``, ``frozen`` or ``detached``), the eval-locked modules, the frozen BatchNorms and the
gradient boundaries. :func:`state_dict` gives it as plain data (YAML / JSON / ``torch.save``
with ``weights_only=True``); :func:`load_state` re-creates it on a freshly built model.

Example:
    >>> import timm, freezekit as fk
    >>> model = timm.create_model("test_resnet", pretrained=False)
    >>> _ = fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze("fc")).apply(model)
    >>> fresh = timm.create_model("test_resnet", pretrained=False)
    >>> _ = fk.load_state(fresh, fk.state_dict(model))
    >>> fk.state(fresh) == fk.state(model)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from . import boundary as _boundary
from .errors import StateError, closest, some
from .index import ModelIndex
from .norm import is_frozen_bn
from .policy import Applied, Policy
from .rules import Rule, detach, eval_mode, freeze, unfreeze
from .select import names
from .select_structure import Exactly

__all__ = ["State", "load_state", "state", "state_dict"]

VERSION = 1
STATUSES = ("trainable", "frozen", "detached")


@dataclass(frozen=True)
class Boundary:
    module: str
    at: str
    no_grad: bool


@dataclass(frozen=True)
class State:
    """What is trainable, frozen, detached, locked, swapped and cut in a model.

    Attributes:
        model: the model's class name.
        parameters: qualified name -> ``"trainable"``, ``"frozen"`` or ``"detached"``, in model order.
        eval_locked: modules kept in eval mode.
        frozen_bn: modules that are a :class:`~freezekit.FrozenBatchNorm`.
        boundaries: gradient boundaries, in the order they were installed.
    """

    model: str
    parameters: dict[str, str]
    eval_locked: tuple[str, ...] = ()
    frozen_bn: tuple[str, ...] = ()
    boundaries: tuple[Boundary, ...] = ()

    def count(self, status: str) -> int:
        return sum(1 for s in self.parameters.values() if s == status)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: YAML / JSON ready, and loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": VERSION,
            "model": self.model,
            "parameters": dict(self.parameters),
            "eval_locked": list(self.eval_locked),
            "frozen_bn": list(self.frozen_bn),
            "boundaries": [{"module": b.module, "at": b.at, "no_grad": b.no_grad} for b in self.boundaries],
        }

    @classmethod
    def from_dict(cls, data: Any) -> State:
        """Read :meth:`to_dict`'s form back. Raises :class:`StateError` naming the bad field."""
        if not isinstance(data, dict):
            raise StateError(f"state: expected a mapping from fk.state_dict(), got {type(data).__name__}")
        if data.get("version") != VERSION:
            raise StateError(f"state.version: expected {VERSION}, got {data.get('version')!r}")
        unknown = set(data) - {"version", "model", "parameters", "eval_locked", "frozen_bn", "boundaries"}
        if unknown:
            raise StateError(f"state: unknown keys {sorted(unknown)}")
        params = data.get("parameters")
        if not isinstance(params, dict) or not all(isinstance(k, str) and v in STATUSES for k, v in params.items()):
            raise StateError(f"state.parameters: expected a mapping of names to one of {', '.join(STATUSES)}")
        lists = {}
        for key in ("eval_locked", "frozen_bn"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise StateError(f"state.{key}: expected a list of module names, got {value!r}")
            lists[key] = tuple(value)
        cuts = []
        for i, b in enumerate(data.get("boundaries", [])):
            if not isinstance(b, dict) or set(b) != {"module", "at", "no_grad"} or b["at"] not in ("output", "input") \
                    or not isinstance(b["no_grad"], bool) or not isinstance(b["module"], str):
                raise StateError(f"state.boundaries[{i}]: expected {{module: NAME, at: output|input, no_grad: BOOL}},"
                                 f" got {b!r}")
            cuts.append(Boundary(b["module"], b["at"], b["no_grad"]))
        return cls(str(data.get("model", "")), dict(params), lists["eval_locked"], lists["frozen_bn"], tuple(cuts))

    def __str__(self) -> str:
        lines = [f"{self.model}: {len(self.parameters)} parameter tensors: {self.count('trainable')} trainable, "
                 f"{self.count('frozen')} frozen, {self.count('detached')} detached"]
        for status in ("detached", "trainable"):
            chosen = [n for n, s in self.parameters.items() if s == status]
            if chosen and len(chosen) < len(self.parameters):
                lines.append(f"  {status}: " + some(chosen, 8))
        if self.eval_locked:
            lines.append(f"  eval-locked: {some(self.eval_locked, 8)}")
        if self.frozen_bn:
            lines.append(f"  frozen BatchNorm: {some(self.frozen_bn, 8)}")
        for b in self.boundaries:
            lines.append(f"  boundary at {b.at} of {b.module or '(root)'}" + (" (no_grad)" if b.no_grad else ""))
        return "\n".join(lines)


def state(model: nn.Module) -> State:
    """The current freeze map of ``model`` (through DDP / compile / FSDP wrappers, by inner names)."""
    index = ModelIndex(model)
    cuts = [Boundary(index.module_names[u], b.at, b.no_grad)
            for u in index.maybe_cut for b in reversed(_boundary.boundaries(index.modules[u]))]
    locked = [index.module_names[u] for u in index.eval_locked()]
    swapped = [index.module_names[u] for u in index.class_mask(is_frozen_bn).nonzero()[0]]
    behind = index.behind_output_boundaries()
    statuses = {name: "frozen" if not rg else ("detached" if det else "trainable")
                for name, rg, det in zip(index.param_names, index.requires_grad.tolist(), behind.tolist())}
    return State(index.model_name, statuses, tuple(locked), tuple(swapped), tuple(cuts))


def state_dict(model: nn.Module) -> dict[str, Any]:
    """:func:`state` as plain data, for checkpoints."""
    return state(model).to_dict()


def load_state(model: nn.Module, saved: dict[str, Any] | State) -> Applied:
    """Re-create a saved freeze map on ``model`` (modifies it in place); returns the undo handle.

    ``model`` is freshly built, or already carries a freeze map: the saved one, or an earlier point
    of the same schedule (a starting policy applied in the model's ``__init__``, say). Locks and
    frozen BatchNorms the saved map lacks are released and put back; gradient boundaries, which
    only accumulate, must be among the saved ones.

    Raises:
        StateError: the state is malformed, names parameters or modules the model lacks (or lacks
            parameters the model has), or the model has a boundary the state does not.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_state(): model: expected a torch.nn.Module, got {type(model).__name__}")
    target = saved if isinstance(saved, State) else State.from_dict(saved)
    current = state(model)
    if current == target:
        return Policy().apply(model)
    _check_fits(current, target, ModelIndex(model))
    extra = [b for b in current.boundaries if b not in target.boundaries]
    if extra:
        raise StateError(f"load_state: the model has {len(extra)} gradient boundaries the state lacks (at the "
                         f"{extra[0].at} of {extra[0].module or '(root)'!r}, ...); boundaries cannot be taken "
                         "away: load into a freshly built model, or undo the apply that added them")
    rules: list[Rule] = []
    # first what the saved map no longer has (an unfreeze releases a lock and puts a BatchNorm back;
    # the rules below decide every parameter again)
    gone = sorted({*current.eval_locked} - {*target.eval_locked} | {*current.frozen_bn} - {*target.frozen_bn})
    if gone:
        rules.append(unfreeze(Exactly(gone)))
    if target.frozen_bn:
        rules.append(freeze(Exactly(target.frozen_bn), norm="frozen_bn"))
    frozen = [n for n, s in target.parameters.items() if s == "frozen"]
    moving = [n for n, s in target.parameters.items() if s != "frozen"]
    if frozen:
        rules.append(freeze(names(*frozen), norm="train"))  # parameters only: no norm layer is touched
    if moving:
        rules.append(unfreeze(names(*moving)))
    if target.eval_locked:
        rules.append(eval_mode(Exactly(target.eval_locked)))
    rules += [detach(names(b.module), at=b.at, no_grad=b.no_grad)  # names(): the module and all below, so
              for b in target.boundaries if b not in current.boundaries]  # the boundary goes on it
    return Policy(*rules).apply(model)


def _check_fits(current: State, target: State, index: ModelIndex) -> None:
    problems = []
    missing = [n for n in target.parameters if n not in current.parameters]
    extra = [n for n in current.parameters if n not in target.parameters]
    for name in missing[:10]:
        near = closest(name, list(current.parameters))
        problems.append(f"parameter {name!r} is not in {current.model}" + (f" (closest: {near[0]!r})" if near else ""))
    if extra:
        problems.append(f"{len(extra)} parameters of {current.model} are not in the state: {some(extra, 5)}")
    modules = set(index.module_names)
    for key, listed in (("eval_locked", target.eval_locked), ("frozen_bn", target.frozen_bn),
                        ("boundaries", [b.module for b in target.boundaries])):
        for name in listed:
            if name not in modules:
                near = closest(name, index.module_names)
                problems.append(f"{key}: module {name!r} is not in {current.model}"
                                + (f" (closest: {near[0]!r})" if near else ""))
    if problems:
        raise StateError(f"the state does not fit {current.model}"
                         + (f" (saved from {target.model})" if target.model and target.model != current.model else "")
                         + ":\n  " + "\n  ".join(problems))
