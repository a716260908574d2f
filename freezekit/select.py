"""Selectors: which modules and parameters of a model a rule speaks about. Pure: nothing here
changes a model.

A selector resolves, on a :class:`~freezekit.index.ModelIndex`, to a set of modules and a set of
parameters. A selected module brings its submodules and every parameter beneath it; a parameter
reachable under several names (tied weights) is one parameter. ``|``, ``&``, ``-`` and ``~`` work
on these resolved sets and never re-expand them.

Example:
    >>> import timm, freezekit as fk
    >>> vit = timm.create_model("test_vit", pretrained=False)
    >>> sel = fk.glob("blocks.*.attn.qkv") | fk.names("head")
    >>> sel.select(vit).parameters[:2]
    ('blocks.0.attn.qkv.weight', 'blocks.0.attn.qkv.bias')
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn

from .errors import ConfigError, PatternError, closest
from .index import ModelIndex
from .names import glob_spans_subtrees, regex_spans_subtrees

__all__ = [
    "Selection",
    "Selector",
    "as_selector",
    "first",
    "glob",
    "last",
    "names",
    "norms",
    "regex",
    "types",
    "where",
]

# Type names in configs import only from these packages (a recipe must not run other code).
IMPORTABLE = frozenset({"torch", "torchvision", "timm", "freezekit"})


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
    _selects_what_matched = False

    def select(self, model: nn.Module) -> Selection:
        """The modules and parameters this selector picks in ``model``, by qualified name.

        Example:
            >>> import torch.nn as nn, freezekit as fk
            >>> fk.glob("0").select(nn.Sequential(nn.Linear(2, 2))).parameters
            ('0.weight', '0.bias')
        """
        index = ModelIndex(model)
        modules, params = Resolver(index).resolve(self)
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
            r.cache[key] = match(pattern)
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
    _selects_what_matched = True
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
    _selects_what_matched = True
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
        hits = _hits(r, self, self.patterns, lambda p: r.index.names.regex(by_pattern[p]), "re:")
        spans = r.index.names.blob is not None and all(map(regex_spans_subtrees, self.patterns))
        return r.index.expand(hits, spans)

    def to_config(self) -> Any:
        if len(self.patterns) == 1:
            return "re:" + self.patterns[0]
        return {"regex": list(self.patterns)}

    def __repr__(self) -> str:
        return f"regex({', '.join(map(repr, self.patterns))})"


@dataclass(frozen=True)
class Names(Selector):
    _selects_what_matched = True
    names: tuple[str, ...]

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        idx = r.index
        found = idx.names.positions(self.names)
        r.unmatched += [Unmatched(self, name, "name") for name, at in zip(self.names, found) if at is None]
        hits = np.zeros(len(idx.names.names), dtype=bool)
        hits.put([at for at in found if at is not None], True)
        return idx.expand(hits)

    def to_config(self) -> Any:
        return {"names": list(self.names)}

    def __repr__(self) -> str:
        return f"names({', '.join(map(repr, self.names))})"


def _resolve_type(spec: str) -> type | None:
    """The class a dotted type name under an importable package names, or None."""
    module_name, _, attr = spec.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        # "torch.nn.LayerNorm": a class in a module; "pkg.Outer.Inner": nested -- walk attributes.
        head, _, rest = spec.partition(".")
        obj = importlib.import_module(head)
        attr = rest
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) else None


def _type_test(spec: type | str) -> Callable[[type], bool]:
    """A test on module classes for one ``types()`` argument."""
    if isinstance(spec, type):
        return lambda cls: issubclass(cls, spec)
    if "." not in spec:  # a bare class name: the class or any base class of that name
        return lambda cls: any(c.__name__ == spec for c in cls.__mro__)
    if spec.partition(".")[0] in IMPORTABLE:
        try:
            resolved = _resolve_type(spec)
        except ImportError:
            resolved = None
        if resolved is None or not issubclass(resolved, nn.Module):
            raise PatternError(f"types(): {spec!r} is not a torch.nn.Module class")
        return lambda cls: issubclass(cls, resolved)
    # Another package: compare full names along the MRO, importing nothing.
    return lambda cls: any(f"{c.__module__}.{c.__qualname__}" == spec for c in cls.__mro__)


def _type_name(spec: type | str) -> str:
    if isinstance(spec, str):
        return spec
    if spec.__module__.startswith("torch.nn.modules.") and getattr(nn, spec.__name__, None) is spec:
        return spec.__name__
    for public in ("timm.layers", "freezekit"):
        if spec.__module__.startswith(public + "."):
            module = importlib.import_module(public)
            if getattr(module, spec.__name__, None) is spec:
                return f"{public}.{spec.__name__}"
    return f"{spec.__module__}.{spec.__qualname__}"


@dataclass(frozen=True)
class Types(Selector):
    _selects_what_matched = True
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
        object.__setattr__(self, "tests", tuple(_type_test(spec) for spec in self.classes))

    def _resolve(self, r: Resolver) -> tuple[np.ndarray, np.ndarray]:
        idx, hits = r.index, None
        for spec, test in zip(self.classes, self.tests):
            mask = idx.class_mask(test)
            if not np.count_nonzero(mask):
                r.unmatched.append(Unmatched(self, _type_name(spec), "type"))
            hits = mask if hits is None else hits | mask
        return idx.expand_modules(hits)

    def to_config(self) -> Any:
        return {"types": [_type_name(spec) for spec in self.classes]}

    def __repr__(self) -> str:
        return f"types({', '.join(_type_name(c) for c in self.classes)})"


@dataclass(frozen=True)
class Norms(Selector):
    _selects_what_matched = True

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
    _selects_what_matched = True
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
    _selects_what_matched = True

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


# ------------------------------------------------------------------------------------ combinators


def _leaves(selector: Selector) -> Iterator[Selector]:
    if isinstance(selector, (Union, Intersection)):
        for part in selector.parts:
            yield from _leaves(part)
    elif isinstance(selector, Difference):
        yield from _leaves(selector.left)
        yield from _leaves(selector.right)
    elif isinstance(selector, Complement):
        yield from _leaves(selector.inner)
    else:
        yield selector


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


def _position(which: str, container: str, n: int) -> Selector:
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
    return _position("first", container, n)


def last(container: str, n: int) -> Selector:
    """The last ``n`` children of ``container`` (see :func:`first`)."""
    return _position("last", container, n)


def where(fn: Callable[[str, Any], bool]) -> Selector:
    """Modules and parameters for which ``fn(name, module_or_parameter)`` is true."""
    if not callable(fn):
        raise TypeError(f"where(): fn: expected a callable, got {type(fn).__name__}")
    return Where(fn)


def leaves(selector: Selector) -> list[Selector]:
    """The leaf selectors inside a (combined) selector."""
    return list(_leaves(selector))


# ------------------------------------------------------------------------------------------ config

_LEAF_KEYS = ("glob", "regex", "names", "types", "norms", "first", "last")
_COMBINATOR_KEYS = ("union", "intersection", "difference", "complement")
SELECTOR_KEYS = _LEAF_KEYS + _COMBINATOR_KEYS


def from_config(value: Any, where_: str = "selector") -> Selector:
    """A selector from its recipe form: a pattern string or a one-key mapping
    (``{regex: ...}``, ``{types: [...]}``, ``{norms: true}``, ``{first: {of: blocks, n: 6}}``, ...).

    Raises:
        ConfigError, PatternError: naming ``where_`` and the bad value.
    """
    try:
        return _from_config(value, where_)
    except PatternError as e:
        if str(e).startswith(where_):
            raise
        raise PatternError(f"{where_}: {e}") from None


def _from_config(value: Any, where_: str) -> Selector:
    if isinstance(value, str):
        return as_selector(value, where_)
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{where_}: expected a pattern string or a mapping with one of "
                          f"{', '.join(SELECTOR_KEYS)}; got {value!r}")
    (key, arg), = value.items()
    here = f"{where_}.{key}"

    def strings(v: Any) -> tuple[str, ...]:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
            raise ConfigError(f"{here}: expected a string or a non-empty list of strings, got {v!r}")
        return tuple(items)

    if key == "glob":
        return glob(*strings(arg))
    if key == "regex":
        return regex(*strings(arg))
    if key == "names":
        return names(*strings(arg))
    if key == "types":
        return types(*strings(arg))
    if key == "norms":
        if arg is not True:
            raise ConfigError(f"{here}: expected true, got {arg!r}")
        return norms()
    if key in ("first", "last"):
        if not isinstance(arg, dict) or set(arg) != {"of", "n"}:
            raise ConfigError(f"{here}: expected {{of: CONTAINER, n: COUNT}}, got {arg!r}")
        try:
            return _position(key, arg["of"], arg["n"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{here}: {e}") from None
    if key in ("union", "intersection"):
        if not isinstance(arg, list) or len(arg) < 2:
            raise ConfigError(f"{here}: expected a list of at least two selectors, got {arg!r}")
        parts = tuple(from_config(v, f"{here}[{i}]") for i, v in enumerate(arg))
        return Union(parts) if key == "union" else Intersection(parts)
    if key == "difference":
        if not isinstance(arg, list) or len(arg) != 2:
            raise ConfigError(f"{here}: expected a list of two selectors [KEEP, REMOVE], got {arg!r}")
        return Difference(from_config(arg[0], f"{here}[0]"), from_config(arg[1], f"{here}[1]"))
    if key == "complement":
        return Complement(_from_config(arg, here))
    hint = closest(str(key), SELECTOR_KEYS, n=1)
    raise ConfigError(f"{where_}: unknown selector {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                      + f" (expected one of {', '.join(SELECTOR_KEYS)})")
