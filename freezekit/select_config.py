"""Selectors from their recipe form: a pattern string or a one-key mapping (``{regex: ...}``,
``{types: [...]}``, ``{norms: true}``, ``{first: {of: blocks, n: 6}}``, ``{union: [...]}``, ...).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError, PatternError, closest
from .select import Complement, Difference, Intersection, Selector, Union, as_selector, glob, names, regex
from .select_structure import norms, position, types

__all__ = ["SELECTOR_KEYS", "from_config"]

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
            return position(key, arg["of"], arg["n"])
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
