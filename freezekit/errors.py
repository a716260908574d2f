"""Errors and warnings raised by freezekit.

Every error is a :class:`FreezekitError` and also the builtin it refines, so code that already
catches ``ValueError`` or ``TypeError`` keeps working::

    FreezekitError(Exception)
    ├── NoMatchError(FreezekitError, ValueError)            a selector matched nothing
    ├── PatternError(FreezekitError, ValueError)            a pattern, regex or type name is malformed
    ├── ConfigError(FreezekitError, ValueError)             a policy config (list of rules) is malformed
    ├── StateError(FreezekitError, ValueError)              a saved freeze state is malformed or does not fit
    ├── ModuleMismatchError(FreezekitError, ValueError)     target and source networks differ
    └── FrozenParameterChanged(FreezekitError, AssertionError)  something frozen moved (fk.assert_frozen)

    FreezekitWarning(UserWarning)
    └── DeadRuleWarning(FreezekitWarning)            a rule that later rules fully override
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "ConfigError",
    "DeadRuleWarning",
    "FreezekitError",
    "FreezekitWarning",
    "FrozenParameterChanged",
    "ModuleMismatchError",
    "NoMatchError",
    "PatternError",
    "StateError",
    "closest",
]


class FreezekitError(Exception):
    """Base class of every error freezekit raises on purpose."""


class NoMatchError(FreezekitError, ValueError):
    """A selector of a strict rule matched nothing in the model.

    Attributes:
        problems: one line per selector that matched nothing, each naming the rule, the pattern
            and the closest real names.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PatternError(FreezekitError, ValueError):
    """A pattern, regular expression, type name or selector argument is malformed."""


class ConfigError(FreezekitError, ValueError):
    """A policy or rule config (the recipe form) is malformed; the message names the field."""


class StateError(FreezekitError, ValueError):
    """A saved state that is malformed or does not fit the model it is loaded into."""


class ModuleMismatchError(FreezekitError, ValueError):
    """Two modules that should have the same parameters and buffers do not."""


class FrozenParameterChanged(FreezekitError, AssertionError):
    """Frozen parameters or locked norm statistics changed inside an ``assert_frozen`` block.

    Attributes:
        names: qualified names of the tensors that changed, in model order.
    """

    def __init__(self, names: list[str], model: str):
        self.names = names
        shown = some(names, 20)
        super().__init__(f"{len(names)} frozen tensor{'s' if len(names) != 1 else ''} of {model} changed inside "
                         f"assert_frozen: {shown}")


class FreezekitWarning(UserWarning):
    """Base class of freezekit's warnings."""


class DeadRuleWarning(FreezekitWarning):
    """A rule decides nothing because later rules override every one of its selections."""


class TiedWeightsWarning(FreezekitWarning):
    """A tensor reachable under several names (tied weights) is decided through some of its names,
    and the others follow: what one name's rule decides, every name gets."""


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def some(names: Sequence[str], n: int, total: int | None = None) -> str:
    """The first ``n`` of ``names``, then how many more (of ``total``, by default all of them)."""
    total = len(names) if total is None else total
    return ", ".join(names[:n]) + (f", ... ({total - n} more)" if total > n else "")


def closest(query: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The real names nearest to ``query`` (difflib), at most ``n``, best first.

    Names that differ only in numeric path components (``blocks.0.attn`` / ``blocks.7.attn``)
    are compared once, so this stays fast on models with ~100k names.
    """
    shapes: dict[str, list[str]] = {}
    for name in names:
        members = shapes.setdefault(_INDEX.sub("#", name), [])
        if len(members) < n:
            members.append(name)
    query_shape = _INDEX.sub("#", query)
    best = difflib.get_close_matches(query_shape, list(shapes), n=n, cutoff=0.4)
    if not best:
        # A wildcard-heavy pattern compares badly as a whole; try its literal pieces.
        pieces = [p for p in re.split(r"[*?\[\]]+", query_shape) if p.strip(".")]
        if pieces:
            longest = max(pieces, key=len).strip(".")
            best = [s for s in shapes if longest in s][:n]
    out: list[str] = []
    for shape in best:
        for name in shapes[shape]:
            if len(out) < n:
                out.append(name)
    return out
