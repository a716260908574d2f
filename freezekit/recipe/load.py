"""Reading a recipe: safe YAML that remembers line numbers, ``--set`` overrides, and errors that
say ``file:line: field: problem`` -- all of them at once, with "did you mean" for unknown keys.

Example:
    >>> from freezekit.recipe import loads
    >>> loads("model: {name: timm:test_resnet}\\ntrain: {epochs: 2}").train.epochs
    2
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import FreezekitError, closest
from .schema import Recipe

__all__ = ["Problem", "RecipeError", "apply_overrides", "load", "loads", "locate"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, where it is."""

    file: str
    line: int | None  # None: the key is absent, or the value came from --set
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class RecipeError(FreezekitError, ValueError):
    """A recipe with problems; the message lists every one, ``file:line: field: problem``."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


# ------------------------------------------------------------------------------------- YAML, with lines


class Lines(dict):
    """A YAML mapping that remembers the line of each key (1-based) and its own."""

    line: int = 0
    lines: dict[Any, int]


class LinesList(list):
    """A YAML sequence that remembers the line of each item."""

    line: int = 0
    lines: list[int]


# A recipe nests a few levels deep; far deeper nesting is refused before Python's recursion limit is.
MAX_DEPTH = 64


class _Guarded(yaml.SafeLoader):
    """``yaml.safe_load`` semantics (no Python tags), refusing nesting deeper than :data:`MAX_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # PyYAML's own constructors on a bad explicit tag: !!int x, !!timestamp 2001-13-45
            what = f"{node.value!r} " if isinstance(node, yaml.ScalarNode) and len(node.value) < 80 else ""
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {what}as {node.tag} ({e})",
                                                    node.start_mark) from None


class _Loader(_Guarded):
    """:class:`_Guarded`, keeping line numbers and refusing duplicate keys."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> Lines:
    if not isinstance(node, yaml.MappingNode):  # !!map on a list or a scalar
        raise yaml.constructor.ConstructorError(None, None, f"expected a mapping for {node.tag}, found {node.id}",
                                                node.start_mark)
    loader.flatten_mapping(node)
    out = Lines()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (dict, list)):
            raise yaml.constructor.ConstructorError(None, None, "a mapping or list as a key", key_node.start_mark)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LinesList:
    if not isinstance(node, yaml.SequenceNode):  # !!seq on a mapping or a scalar
        raise yaml.constructor.ConstructorError(None, None, f"expected a sequence for {node.tag}, found {node.id}",
                                                node.start_mark)
    out = LinesList(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def _parse(text: str, file: str) -> Any:
    loader = None
    try:
        loader = _Loader(text)  # a character YAML does not allow raises here already
        data = loader.get_single_data()
    except RecursionError:  # aliases nested past the composer's guard
        line = (loader.line if loader else 0) + 1
        raise RecipeError([Problem(file, line, "", f"YAML: nested more than {MAX_DEPTH} levels deep")]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or str(e)
        if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            problem += f" ({e.context} from line {e.context_mark.line + 1})"
        if isinstance(e, yaml.constructor.ConstructorError) and "python" in str(e):
            problem = f"{problem} (recipes are plain YAML: Python tags are refused)"
        raise RecipeError([Problem(file, mark.line + 1 if mark else None, "", f"YAML: {problem}")]) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow: a position, not a mark
        line = text.count("\n", 0, e.position) + 1
        character = chr(e.character) if isinstance(e.character, int) else e.character
        raise RecipeError([Problem(file, line, "", f"YAML: unacceptable character {character!r}")]) from None
    except yaml.YAMLError as e:
        raise RecipeError([Problem(file, loader.line + 1 if loader else None, "", f"YAML: {e}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    fault = _too_big(data, len(text))
    if fault is not None:
        key, problem = fault
        line = data.lines.get(key) if isinstance(data, Lines) and key is not None else getattr(data, "line", 1)
        raise RecipeError([Problem(file, line or 1, "" if key is None else str(key), f"YAML: {problem}")])
    return data


def _too_big(data: Any, size: int) -> tuple[Any, str] | None:
    """``(top-level key or None, problem)`` if aliases make ``data`` nest deeper than :data:`MAX_DEPTH`
    or expand far beyond the ``size`` of its text (an "alias bomb"), or an alias refers to what holds
    it. Each node is walked once, without recursion, and counted as often as aliases use it."""
    measured: dict[int, tuple[int, int]] = {}  # id -> (values and characters, depth), aliases expanded
    active: set[int] = set()  # the nodes on the path being walked
    stack = [(data, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in measured:
            continue
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node if isinstance(node, list) \
            else ()
        if children and not ready:
            if any(id(c) in active for c in children):
                key = next((k for k, v in data.items() if id(v) in active or v is node), None) \
                    if isinstance(data, dict) else None
                return key, "an alias refers to the node that holds it (a recursive structure)"
            active.add(id(node))
            stack.append((node, True))
            stack += [(c, False) for c in children if id(c) not in measured]
            continue
        parts = [measured[id(c)] for c in children]
        active.discard(id(node))
        measured[id(node)] = (1 + (len(node) if isinstance(node, (str, bytes)) else 0) + sum(n for n, _ in parts),
                              1 + max((d for _, d in parts), default=0))
    total, depth = measured[id(data)]
    if depth <= MAX_DEPTH and total <= 10 * size + 10_000:
        return None
    worst = 1 if depth > MAX_DEPTH else 0
    key = max(data, key=lambda k: measured[id(data[k])][worst]) if isinstance(data, dict) and data else None
    return key, (f"nested more than {MAX_DEPTH} levels deep" if depth > MAX_DEPTH else
                 f"aliases expand it to {total:,} values and characters, from {size:,} characters (an alias bomb?)")


# ----------------------------------------------------------------------------------------- locating


_PART = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def split_path(path: str) -> list[str | int]:
    """``"policy[1].freeze"`` -> ``["policy", 1, "freeze"]``."""
    return [int(index) if index else key for index, key in _PART.findall(path)]


def locate(data: Any, path: list[str | int]) -> int | None:
    """The line of the deepest part of ``path`` found in the YAML data."""
    line = getattr(data, "line", None)
    node = data
    for part in path:
        found = part in node if isinstance(node, Lines) else \
            isinstance(node, LinesList) and isinstance(part, int) and 0 <= part < len(node)
        if not found:
            break
        line, node = node.lines[part] if isinstance(node, LinesList) else node.lines.get(part, line), node[part]
    return line


def _field_names(model: type[BaseModel], path: list[str | int]) -> list[str]:
    """The keys allowed where ``path`` points, for "did you mean"."""
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            inner = getattr(candidate, "__args__", (candidate,))[0] if getattr(candidate, "__origin__", None) is list \
                else candidate
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                model = inner
                break
    return list(model.model_fields)


def _problems(error: ValidationError, data: Any, file: str, overridden: set[str]) -> list[Problem]:
    out = []
    for err in error.errors():
        loc = [p for p in err["loc"] if not isinstance(p, str) or not p.startswith(("function-", "literal["))]
        field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
        line = None if _from_override(field, overridden) else locate(data, loc)
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            near = closest(key, _field_names(Recipe, loc[:-1]), n=1)
            message = f"unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
        elif err["type"] == "missing":
            message = "required, but missing"
        else:
            message = f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
        out.append(Problem(file, line, field, message))
    return out


def _from_override(field: str, overridden: set[str]) -> bool:
    """True if ``field`` was set by ``--set`` (it, a part of it, or what holds it): it has no line."""
    return any(a == b or a.startswith((b + ".", b + "[")) for o in overridden for a, b in ((field, o), (o, field)))


# ------------------------------------------------------------------------------------------ loading


def _value(raw: str) -> Any:
    """An override's value, read like a recipe (no Python tags, no alias bombs); plain dicts and lists."""
    loader = _Guarded(raw)
    try:
        value = loader.get_single_data()
    finally:
        loader.dispose()
    fault = _too_big(value, len(raw))
    if fault is not None:
        raise yaml.YAMLError(fault[1])
    return value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], file: str) -> set[str]:
    """Apply ``key.path=value`` overrides (values read as YAML) to ``data``; returns the paths set."""
    done = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError([Problem(file, None, "--set", f"expected key.path=value, got {item!r}")])
        try:
            value = _value(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError) as e:
            problem = f"nested more than {MAX_DEPTH} levels deep" if isinstance(e, RecursionError) else \
                getattr(e, "problem", None) or str(e)
            raise RecipeError([Problem(file, None, f"--set {key}", f"the value is not YAML: {problem}")]) from None
        parts = split_path(key.strip())
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, dict):
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                raise RecipeError([Problem(file, None, f"--set {key}", "no such place in the recipe")])
        last = parts[-1]
        if isinstance(node, list) and isinstance(last, int) and 0 <= last <= len(node):
            node[last:last + 1] = [value]
        elif isinstance(node, dict) and isinstance(last, str):
            node[last] = value
        else:
            raise RecipeError([Problem(file, None, f"--set {key}", "no such place in the recipe")])
        done.add(key.strip())
    return done


def loads(text: str, file: str = "<recipe>", overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Parse and validate a recipe from YAML text. Raises :class:`RecipeError`."""
    data = _parse(text, file)
    if data is None:  # an empty file, or comments only
        data = Lines()
        data.line, data.lines = 1, {}
    if not isinstance(data, dict):
        raise RecipeError([Problem(file, getattr(data, "line", 1), "", "a recipe is a mapping of sections "
                                                                       "(model, data, policy, ...)")])
    overridden = apply_overrides(data, overrides, file)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_problems(e, data, file, overridden)) from None
    if recipe.name is None:
        recipe.name = Path(file).stem if file != "<recipe>" else "recipe"
    recipe._source = (file, data, overridden)
    return recipe


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, parse and validate the recipe at ``path``. Raises :class:`RecipeError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise RecipeError([Problem(str(path), None, "", f"cannot read the recipe: "
                                                        f"{getattr(e, 'strerror', None) or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([Problem(str(path), raw.count(b"\n", 0, e.start) + 1, "",
                                   f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})")]) from None
    return loads(text, str(path), overrides)
