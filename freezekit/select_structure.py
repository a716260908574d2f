"""Selectors by structure: module classes (:func:`types`, :func:`norms`), positions among a
container's children (:func:`first`, :func:`last`), and any test on names and objects
(:func:`where`). Pure: nothing here changes a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn

from .errors import PatternError
from .index import ModelIndex
from .select import Resolver, Selector, Unmatched
from .type_names import type_name, type_test

__all__ = ["first", "last", "norms", "types", "where"]


@dataclass(frozen=True)
class Types(Selector):
    selects_what_matched = True
    classes: tuple[type | str, ...]
    tests: tuple[Callable[[type], bool], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for spec in self.classes:
            if isinstance(spec, type) and not issubclass(spec, nn.Module):
                raise TypeError(f"types(): {spec.__name__} is not a torch.nn.Module class")
            if not isinstance(spec, (type, str)):
                raise TypeError(f"types(): expected module classes or class names, got {type(spec).__name__} "
                                f"{spec!r}")
            if isinstance(spec, str) and (not spec or "" in spec.split(".")):
                raise PatternError(f"types(): {spec!r} is not a class name")
        object.__setattr__(self, "tests", tuple(type_test(spec) for spec in self.classes))

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        idx, hits = r.index, None
        for spec, test in zip(self.classes, self.tests):
            mask = idx.class_mask(test)
            if not np.count_nonzero(mask):
                r.unmatched.append(Unmatched(self, type_name(spec), "type"))
            hits = mask if hits is None else hits | mask
        return idx.expand_modules(hits)

    def to_config(self) -> Any:
        return {"types": [type_name(spec) for spec in self.classes]}

    def __repr__(self) -> str:
        return f"types({', '.join(type_name(c) for c in self.classes)})"


@dataclass(frozen=True)
class Norms(Selector):
    selects_what_matched = True

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        idx = r.index
        hits = idx.norms
        if not np.count_nonzero(hits):
            r.unmatched.append(Unmatched(self, "norms()", "type"))
        return idx.expand_modules(hits)

    def to_config(self) -> Any:
        return {"norms": True}

    def __repr__(self) -> str:
        return "norms()"


@dataclass(frozen=True)
class Position(Selector):
    """The first or last ``n`` children of a container (``first``/``last``)."""

    container: str
    n: int
    which: str  # "first" or "last"

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        idx = r.index
        members = self._members(idx)
        hits = np.zeros(len(idx.names.names), dtype=bool)
        if members is None:
            r.unmatched.append(Unmatched(self, self.container, "module"))
        else:
            chosen = members[: self.n] if self.which == "first" else members[max(len(members) - self.n, 0):]
            hits.put(chosen, True)
        return idx.expand(hits)

    def _members(self, idx: ModelIndex) -> list[int] | None:
        """Occurrences of the container's children, in order; or of its numbered siblings
        (``layer`` -> ``layer1, layer2, ...``); None if there is no such container."""
        at = idx.names.find(self.container, idx.n_mod_occ)
        if at is not None and (children := idx.children(at)):
            return children
        parent_name, _, stem = self.container.rpartition(".")
        parent = idx.names.find(parent_name, idx.n_mod_occ)
        if parent is None:
            return None
        numbered = re.compile(re.escape(stem) + r"(\d+)")
        found = []
        for child in idx.children(parent):
            m = numbered.fullmatch(idx.mod_names[child].rpartition(".")[2])
            if m:
                found.append((int(m.group(1)), child))
        return [child for _, child in sorted(found)] or None

    def to_config(self) -> Any:
        return {self.which: {"of": self.container, "n": self.n}}

    def __repr__(self) -> str:
        return f"{self.which}({self.container!r}, {self.n})"


@dataclass(frozen=True)
class Where(Selector):
    selects_what_matched = True
    fn: Callable[[str, Any], bool]

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        idx, fn = r.index, self.fn
        mods = np.fromiter((bool(fn(n, m)) for n, m in zip(idx.module_names, idx.modules)),
                           dtype=bool, count=idx.n_modules)
        pars = np.fromiter((bool(fn(n, p)) for n, p in zip(idx.param_names, idx.params)),
                           dtype=bool, count=idx.n_params)
        if not (np.count_nonzero(mods) or np.count_nonzero(pars)):
            r.unmatched.append(Unmatched(self, repr(self), "name"))
        return idx.expand(np.concatenate([mods[idx.mod_uid], pars[idx.par_uid]]))

    def to_config(self) -> Any:
        raise TypeError("where() selects with a Python function and has no config form; "
                        "use glob, regex, names, types, norms, first or last in configs")

    def __repr__(self) -> str:
        return f"where({getattr(self.fn, '__name__', 'fn')})"


@dataclass(frozen=True)
class Exactly(Selector):
    """Exactly the named modules: not their submodules, not their parameters. Internal: it lets a
    saved state lock or swap one module without speaking for its children."""
    selects_what_matched = True

    modules: tuple[str, ...]

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        idx = r.index
        found = idx.names.positions(self.modules)
        unique = np.zeros(idx.n_modules, dtype=bool)
        for name, at in zip(self.modules, found):
            if at is None or at >= idx.n_mod_occ:
                r.unmatched.append(Unmatched(self, name, "module"))
            else:
                unique[idx.mod_uid[at]] = True
        return unique, np.zeros(idx.n_params, dtype=bool)

    def to_config(self) -> Any:
        raise TypeError("Exactly() is internal to saved states and has no config form")

    def __repr__(self) -> str:
        return f"exactly({', '.join(map(repr, self.modules))})"


def types(*classes: type | str) -> Selector:
    """Modules that are instances of the classes (or of classes with those names:
    ``"BatchNorm2d"``, ``"torch.nn.LayerNorm"``, ``"timm.layers.BatchNormAct2d"``)."""
    if not classes:
        raise TypeError("types() needs at least one class")
    return Types(tuple(classes))


def norms() -> Selector:
    """Every normalization layer: torch's BatchNorm / SyncBatchNorm / InstanceNorm / GroupNorm /
    LayerNorm / RMSNorm and subclasses, and timm's norm layers (RmsNorm, EvoNorm, ...)."""
    return Norms()


def position(which: str, container: str, n: int) -> Selector:
    if not isinstance(container, str):
        raise TypeError(f"{which}(): container: expected a module name, got {type(container).__name__}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{which}(): n: expected an int, got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"{which}(): n: expected n >= 0, got {n}")
    return Position(container, n, which)


def first(container: str, n: int) -> Selector:
    """The first ``n`` children of the ``ModuleList`` / ``Sequential`` named ``container``, or of the
    numbered siblings ``container1, container2, ...`` (``first("layer", 2)`` on a ResNet)."""
    return position("first", container, n)


def last(container: str, n: int) -> Selector:
    """The last ``n`` children of ``container`` (see :func:`first`)."""
    return position("last", container, n)


def where(fn: Callable[[str, Any], bool]) -> Selector:
    """Modules and parameters for which ``fn(name, module_or_parameter)`` is true."""
    if not callable(fn):
        raise TypeError(f"where(): fn: expected a callable, got {type(fn).__name__}")
    return Where(fn)
