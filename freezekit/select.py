"""Selectors: which modules and parameters of a model a rule speaks about. Pure: nothing here
changes a model.

A selector resolves, on a :class:`~freezekit.index.ModelIndex`, to a set of modules and a set of
parameters. A selected module brings its submodules and every parameter beneath it; a parameter
reachable under several names (tied weights) is one parameter. ``|``, ``&``, ``-`` and ``~`` work
on these resolved sets and never re-expand them.

Here: the selector algebra and the selectors by name (:func:`glob`, :func:`regex`, :func:`names`).
Selectors by structure (types, norms, positions, ``where``) are in :mod:`~freezekit.select_structure`,
their recipe form in :mod:`~freezekit.select_config`, class names in :mod:`~freezekit.type_names`.

Example:
    >>> import timm, freezekit as fk
    >>> vit = timm.create_model("test_vit", pretrained=False)
    >>> sel = fk.glob("blocks.*.attn.qkv") | fk.names("head")
    >>> sel.select(vit).parameters[:2]
    ('blocks.0.attn.qkv.weight', 'blocks.0.attn.qkv.bias')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn

from .errors import NoMatchError, PatternError
from .index import ModelIndex
from .matching import glob_spans_subtrees, regex_spans_subtrees
from .suggest import unmatched

__all__ = [
    "Selection",
    "Selector",
    "as_selector",
    "glob",
    "names",
    "regex",
]

@dataclass(frozen=True)
class Selection:
    """What a selector selected in a model: qualified names in model order."""

    modules: tuple[str, ...]
    parameters: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.modules or self.parameters)


@dataclass
class Unmatched:
    """A leaf pattern that matched nothing, for the error message."""

    selector: Selector
    pattern: str
    kind: str  # "name", "type" or "module": what the closest-name suggestions are drawn from


@dataclass
class Resolver:
    """Resolves selectors on one index, caching leaf results and noting what matched nothing."""

    index: ModelIndex
    unmatched: list[Unmatched] = field(default_factory=list)
    cache: dict[Any, np.ndarray] = field(default_factory=dict)

    def resolve(self, selector: Selector) -> tuple[np.ndarray, np.ndarray]:
        return selector._resolve(self)


class Selector:
    """Base class: something that picks modules and parameters of a model by name, type or position."""

    # True for a leaf that selects something whenever none of its patterns is unmatched (what
    # it matched, and what lies below): a strict rule need not count what it selected.
    selects_what_matched = False

    def select(self, model: nn.Module, strict: bool = True) -> Selection:
        """The modules and parameters this selector picks in ``model``, by qualified name.

        Raises:
            NoMatchError: a pattern matched nothing (as in a policy); ``strict=False`` allows it.

        Example:
            >>> import torch.nn as nn, freezekit as fk
            >>> fk.glob("0").select(nn.Sequential(nn.Linear(2, 2))).parameters
            ('0.weight', '0.bias')
        """
        index = ModelIndex(model)
        resolver = Resolver(index)
        modules, params = resolver.resolve(self)
        if strict and resolver.unmatched:
            raise NoMatchError([f"{self!r}: {u.pattern!r} {unmatched(u.pattern, u.kind, index)}"
                                for u in resolver.unmatched])
        return Selection(
            tuple(index.module_names[i] for i in modules.nonzero()[0]),
            tuple(index.param_names[i] for i in params.nonzero()[0]),
        )

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def to_config(self) -> Any:
        """The recipe form of this selector (plain strings, lists and dicts)."""
        raise NotImplementedError

    def __or__(self, other: Selector | str) -> Selector:
        return Union((self, as_selector(other, "right operand of |")))

    def __ror__(self, other: Selector | str) -> Selector:
        return Union((as_selector(other, "left operand of |"), self))

    def __and__(self, other: Selector | str) -> Selector:
        return Intersection((self, as_selector(other, "right operand of &")))

    def __rand__(self, other: Selector | str) -> Selector:
        return Intersection((as_selector(other, "left operand of &"), self))

    def __sub__(self, other: Selector | str) -> Selector:
        return Difference(self, as_selector(other, "right operand of -"))

    def __rsub__(self, other: Selector | str) -> Selector:
        return Difference(as_selector(other, "left operand of -"), self)

    def __invert__(self) -> Selector:
        return Complement(self)


def as_selector(value: Selector | str, what: str = "selector") -> Selector:
    """A selector from a selector or a pattern string (``"re:..."`` is a regex, anything else a glob)."""
    if isinstance(value, Selector):
        return value
    if isinstance(value, str):
        if not value:  # most likely an unset variable; as a glob it would select the root: everything
            raise PatternError(f"{what}: an empty pattern; use '*' for everything (or names('') for the root module)")
        return Regex((value[3:],)) if value.startswith("re:") else Glob((value,))
    raise TypeError(f"{what}: expected a pattern string or a freezekit selector, got {type(value).__name__} "
                    f"{value!r}")


def _patterns(kind: str, values: tuple, allow_empty: bool = False) -> tuple[str, ...]:
    if not values and not allow_empty:
        raise TypeError(f"{kind}() needs at least one pattern")
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"{kind}(): expected pattern strings, got {type(v).__name__} {v!r}")
        if not v and kind == "glob":
            as_selector(v, "glob()")  # refuses it
    return tuple(values)


def _hits(r: Resolver, selector: Selector, patterns: tuple[str, ...], match: Callable[[str], np.ndarray],
          prefix: str = "") -> np.ndarray:
    """Names matched by any of ``patterns`` (cached per resolver); notes each that matched nothing."""
    hits = None
    for pattern in patterns:
        key = (type(selector), pattern)
        if key not in r.cache:
            r.cache[key] = match(r.index.inner_spelling(pattern))
        mask = r.cache[key]
        if not np.count_nonzero(mask):
            r.unmatched.append(Unmatched(selector, prefix + pattern, "name"))
        hits = mask if hits is None else hits | mask  # the cached mask itself is never changed
    return hits


def _one_or_list(values: tuple[str, ...]) -> Any:
    return values[0] if len(values) == 1 else list(values)


# ----------------------------------------------------------------------------------------- leaves


@dataclass(frozen=True)
class Glob(Selector):
    selects_what_matched = True
    patterns: tuple[str, ...]

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        hits = _hits(r, self, self.patterns, r.index.names.glob)
        return r.index.expand(hits, all(map(glob_spans_subtrees, self.patterns)))

    def to_config(self) -> Any:
        if len(self.patterns) == 1 and not self.patterns[0].startswith("re:"):
            return self.patterns[0]
        return {"glob": _one_or_list(self.patterns)}

    def __repr__(self) -> str:
        return f"glob({', '.join(map(repr, self.patterns))})"


@dataclass(frozen=True)
class Regex(Selector):
    selects_what_matched = True
    patterns: tuple[str, ...]
    compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = []
        for pattern in self.patterns:
            try:
                compiled.append(re.compile(pattern))
            except (re.error, RecursionError, OverflowError) as e:  # RecursionError: nested too deeply
                raise PatternError(f"bad regular expression {pattern!r}: {e}") from None
        object.__setattr__(self, "compiled", tuple(compiled))

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        by_pattern = dict(zip(self.patterns, self.compiled))
        hits = _hits(r, self, self.patterns, lambda p: r.index.names.regex(by_pattern.get(p) or re.compile(p)), "re:")
        spans = not r.index.names.has_newlines and all(map(regex_spans_subtrees, self.patterns))
        return r.index.expand(hits, spans)

    def to_config(self) -> Any:
        if len(self.patterns) == 1:
            return "re:" + self.patterns[0]
        return {"regex": list(self.patterns)}

    def __repr__(self) -> str:
        return f"regex({', '.join(map(repr, self.patterns))})"


@dataclass(frozen=True)
class Names(Selector):
    selects_what_matched = True
    names: tuple[str, ...]

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        idx = r.index
        found = idx.names.positions([idx.inner_spelling(name) for name in self.names])
        r.unmatched += [Unmatched(self, name, "name") for name, at in zip(self.names, found) if at is None]
        hits = np.zeros(len(idx.names.names), dtype=bool)
        hits.put([at for at in found if at is not None], True)
        return idx.expand(hits)

    def to_config(self) -> Any:
        return {"names": list(self.names)}

    def __repr__(self) -> str:
        return f"names({', '.join(map(repr, self.names))})"


# ------------------------------------------------------------------------------------ combinators


def _paren(s: Selector) -> str:
    return f"({s!r})" if isinstance(s, (Union, Intersection, Difference)) else repr(s)


@dataclass(frozen=True)
class Union(Selector):
    parts: tuple[Selector, ...]

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        mods, pars = r.resolve(self.parts[0])
        for part in self.parts[1:]:
            m, p = r.resolve(part)
            mods, pars = mods | m, pars | p
        return mods, pars

    def to_config(self) -> Any:
        return {"union": [p.to_config() for p in self.parts]}

    def __repr__(self) -> str:
        return " | ".join(_paren(p) for p in self.parts)


@dataclass(frozen=True)
class Intersection(Selector):
    parts: tuple[Selector, ...]

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        mods, pars = r.resolve(self.parts[0])
        for part in self.parts[1:]:
            m, p = r.resolve(part)
            mods, pars = mods & m, pars & p
        return mods, pars

    def to_config(self) -> Any:
        return {"intersection": [p.to_config() for p in self.parts]}

    def __repr__(self) -> str:
        return " & ".join(_paren(p) for p in self.parts)


@dataclass(frozen=True)
class Difference(Selector):
    left: Selector
    right: Selector

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        lm, lp = r.resolve(self.left)
        rm, rp = r.resolve(self.right)
        return lm & ~rm, lp & ~rp

    def to_config(self) -> Any:
        return {"difference": [self.left.to_config(), self.right.to_config()]}

    def __repr__(self) -> str:
        return f"{_paren(self.left)} - {_paren(self.right)}"


@dataclass(frozen=True)
class Complement(Selector):
    inner: Selector

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        m, p = r.resolve(self.inner)
        return ~m, ~p

    def to_config(self) -> Any:
        return {"complement": self.inner.to_config()}

    def __repr__(self) -> str:
        return f"~{_paren(self.inner)}"


# ---------------------------------------------------------------------------------------- factories


def glob(*patterns: str) -> Selector:
    """Names that fully match a shell-style pattern; ``*`` also crosses dots.

    Example:
        >>> import torch.nn as nn, freezekit as fk
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> fk.glob("*.bias").select(net).parameters
        ('0.bias', '2.bias')
    """
    return Glob(_patterns("glob", patterns))


def regex(*patterns: str) -> Selector:
    """Names that ``re.fullmatch`` a regular expression (a bad one raises :class:`PatternError`)."""
    return Regex(_patterns("regex", patterns))


def names(*qualified: str) -> Selector:
    """Exact qualified names of modules or parameters."""
    return Names(_patterns("names", qualified))
