"""Matching patterns against many names at once.

:class:`NameList` holds a model's qualified names and answers "which of them fully match this
glob / regex" with a boolean mask. The names are joined into one string, a name per line, so that
the regex engine scans them in C instead of being called once per name from Python; a glob's
literal head or tail is compared at every line's start or end at once, and a pattern's longest
literal narrows the names the regex must check. Globs follow
``fnmatch.fnmatchcase`` exactly (``*`` crosses dots); regexes ``re.fullmatch``. Names holding a
newline or NUL (possible, if odd) fall back to matching one name at a time.
"""

from __future__ import annotations

import fnmatch
import re
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

try:
    from re import _parser as _sre_parse  # Python 3.11+
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse

__all__ = ["NameList", "glob_to_regex", "is_literal"]

_ANY = "[^\n]*"


@lru_cache(maxsize=4096)
def _glob_tokens(pattern: str) -> tuple[str, ...]:
    """Regex pieces, one per token of a shell-style pattern (``fnmatch`` rules), none matching ``\\n``.

    ``*`` matches any run of characters, dots included; ``?`` one character; ``[seq]`` / ``[!seq]``
    a character (not) in ``seq``; an unclosed ``[`` is literal -- exactly ``fnmatch.fnmatchcase``.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1] != _ANY:
                out.append(_ANY)
        elif c == "?":
            out.append("[^\n]")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
                continue
            out.append(_bracket(pattern[i:j]))
            i = j + 1
        else:
            out.append(re.escape(c))
    return tuple(out)


def _bracket(body: str) -> str:
    """A regex for one character of ``[body]``, never ``\\n``, read as ``fnmatch.translate`` reads it
    (the same steps): ranges that run backwards are dropped, and what is left is negated if it
    then starts with ``!`` -- so ``[?-1!]`` is any character, as ``fnmatch`` has it."""
    if "-" not in body:
        stuff = body.replace("\\", r"\\")
    else:
        chunks, i, k = [], 0, 2 if body[:1] == "!" else 1
        while (k := body.find("-", k)) >= 0:
            chunks.append(body[i:k])
            i, k = k + 1, k + 3
        if body[i:]:
            chunks.append(body[i:])
        else:
            chunks[-1] += "-"
        for k in range(len(chunks) - 1, 0, -1):  # drop ranges that run backwards
            if chunks[k - 1][-1] > chunks[k][0]:
                chunks[k - 1] = chunks[k - 1][:-1] + chunks[k][1:]
                del chunks[k]
        stuff = "-".join(c.replace("\\", r"\\").replace("-", r"\-") for c in chunks)
    stuff = re.sub(r"([&~|])", r"\\\1", stuff)  # set operations
    if not stuff:
        return "(?!)"
    if stuff[0] == "!":  # the newline last: a "]" right after "^" stays literal
        return f"[^{stuff[1:]}\n]"
    if stuff[0] in "^[":
        stuff = "\\" + stuff
    return f"(?!\n)[{stuff}]"


def glob_to_regex(pattern: str) -> str:
    """A regex body equivalent to ``fnmatch.fnmatchcase`` with ``pattern``, never matching ``\\n``."""
    return "".join(_glob_tokens(pattern))


def is_literal(pattern: str) -> bool:
    """True if a glob pattern has no wildcard and so names exactly one thing."""
    return not any(c in pattern for c in "*?[")


@lru_cache(maxsize=4096)
def _glob_plan(pattern: str) -> tuple[str, Any, str]:
    """How :meth:`NameList.glob` answers ``pattern``, worked out once per pattern: ``("all", "", "")``;
    ``("exact", name, "")``; ``("each", "", "")``, name by name; ``("holding", LIT, "")`` for
    ``*LIT*``; ``("ends", HEAD, TAIL)`` for ``HEAD*TAIL`` (either may be empty); else
    ``("regex", line regex, its longest literal)``."""
    pattern = _STARS.sub("*", pattern)  # "**" is "*"
    if pattern == "*":
        return "all", "", ""
    if is_literal(pattern):
        return "exact", pattern, ""
    if "\n" in pattern:
        return "each", "", ""
    parts = pattern.split("*")
    if not any(c in pattern for c in "?[") and len(parts) <= 3:
        if len(parts) == 3 and not parts[0] and not parts[2]:
            return "holding", parts[1], ""
        if len(parts) == 2:
            return "ends", parts[0], parts[1]
    return "regex", _line_regex(glob_to_regex(pattern), 0), _longest_literal(pattern)


def glob_spans_subtrees(pattern: str) -> bool:
    """True if a glob that matches a module's name matches every name below it: it ends in ``*``,
    which takes any ``.child.param`` after a match."""
    return pattern.endswith("*")


@lru_cache(maxsize=4096)
def regex_spans_subtrees(pattern: str) -> bool:
    """:func:`glob_spans_subtrees` for a regex, on names without newlines: it ends in an unescaped
    ``.*``, and nothing (an alternation, an anchor, a lookaround) can see past a match's end."""
    if not pattern.endswith(".*") or "|" in pattern or "(?(" in pattern or _LOOKS_AROUND.search(pattern):
        return False
    body = pattern[:-2]
    return (len(body) - len(body.rstrip("\\"))) % 2 == 0  # an even run of backslashes escapes no dot


class NameList:
    """A list of names with fast exact lookup and fast whole-list regex matching."""

    def __init__(self, names: list[str]):
        self.names = names

    def find(self, name: str, stop: int | None = None) -> int | None:
        """Position of ``name`` (among the first ``stop`` names), or None."""
        if "blob" in self.__dict__ and self.blob is not None and "\n" not in name:
            at = self.blob.find(f"\n{name}\n")  # names are unique: the first is the one
            k = int(self.newlines.searchsorted(at)) if at >= 0 else None
            return k if k is not None and (stop is None or k < stop) else None
        try:  # a C scan: cheaper than joining the blob for a few lookups
            return self.names.index(name, 0, len(self.names) if stop is None else stop)
        except ValueError:
            return None

    def positions(self, names: tuple[str, ...] | list[str]) -> list[int | None]:
        """Position of each of ``names``, or None where absent."""
        if len(names) <= 8:
            return [self.find(name) for name in names]
        position = {name: i for i, name in enumerate(self.names)}
        return [position.get(name) for name in names]

    def exact(self, name: str) -> np.ndarray:
        """Boolean mask of the names equal to ``name``."""
        mask = np.zeros(len(self.names), dtype=bool)
        i = self.find(name)
        if i is not None:
            mask[i] = True
        return mask

    @cached_property
    def blob(self) -> str | None:
        # One string with a name per line: a regex scans it in C instead of once per name in
        # Python. Names are arbitrary strings; if one holds a newline the per-name path is used.
        blob = "\n".join(["", *self.names, ""])
        if not blob.isascii():
            return blob if blob.count("\n") == len(self.names) + 1 else None
        # ASCII: a character per byte, which numpy can compare; 8 NULs on either side, so that a
        # word read at any line's start or end stays inside. Its newlines are found by numpy.
        data = b"".join((_PAD, blob.encode("ascii"), _PAD))
        newlines = (np.frombuffer(data, dtype=np.uint8, offset=len(_PAD)) == 10).nonzero()[0]
        if len(newlines) != len(self.names) + 1:
            return None
        self._ascii, self.newlines = data, newlines
        return blob

    def glob(self, pattern: str) -> np.ndarray:
        """Boolean mask of the names that fully match the shell-style ``pattern``."""
        how, a, b = _glob_plan(pattern)
        if how == "all":
            every = np.empty(len(self.names), dtype=bool)
            every.fill(True)  # np.ones is a Python function around these calls
            return every
        if how == "exact":
            return self.exact(a)
        if how == "each" or self.blob is None:
            return self._each(re.compile(fnmatch.translate(pattern)))
        if how == "holding":
            return self._holding(a)
        if how == "ends":  # "HEAD*", "*TAIL", "HEAD*TAIL"
            starts = self._holding("\n" + a) if a else None
            ends = self._holding(b + "\n") if b else None
            if starts is None or ends is None:
                return ends if starts is None else starts
            return starts & ends & (np.diff(self.newlines) > len(a) + len(b))  # not overlapping
        return self._check(a, b)

    def regex(self, compiled: re.Pattern[str]) -> np.ndarray:
        """Boolean mask of the names that ``compiled.fullmatch``."""
        line, literal = _regex_plan(compiled.pattern, compiled.flags)
        if line is None or self.blob is None:
            return self._each(compiled)
        return self._check(line, literal)

    def _each(self, compiled: re.Pattern[str]) -> np.ndarray:
        return np.fromiter(map(bool, map(compiled.fullmatch, self.names)), dtype=bool, count=len(self.names))

    @cached_property
    def newlines(self) -> np.ndarray:
        """Character offset in the blob of the newline before each name, and of the last newline."""
        if self._ascii is not None:  # found with the blob
            return self.__dict__["newlines"]
        lengths = np.fromiter(map(len, self.names), dtype=np.int64, count=len(self.names)) + 1
        return np.concatenate(([0], lengths.cumsum()))

    @cached_property
    def _ascii(self) -> bytes | None:
        """The blob as bytes between 8 NULs each side, where it is ASCII (set with the blob); else None."""
        self.blob  # noqa: B018 -- sets it if there is one
        return self.__dict__.get("_ascii")

    @cached_property
    def _words(self) -> np.ndarray:
        """The 8 characters from every offset of :attr:`_ascii`, as one little-endian integer each:
        8 characters compare in one operation. The blob's character ``k`` starts word ``k + 8``."""
        return np.ndarray((len(self._ascii) - 7,), dtype=_WORD, buffer=self._ascii, strides=(1,))

    @cached_property
    def _line_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The word of each line's first character, and of the newline that ends it."""
        at = self.newlines + len(_PAD)
        return at[:-1] + 1, at[1:]

    def _window(self, at_end: bool, distance: int) -> np.ndarray:
        """The word ``distance`` characters after every line's start (before its end), as an
        aligned array: gathering unaligned words is slow, and several literals use the same ones.
        Clamped to the bytes: a window that would leave them reads the NULs on that side."""
        key = (at_end, distance)
        if key not in self._windows:
            starts, ends = self._line_bounds
            if at_end:  # 8 NULs before the first line: no clamp needed up to 8
                at = ends - distance if distance <= 8 else np.maximum(ends - distance, 0)
            else:
                at = np.minimum(starts + distance, len(self._words) - 1) if distance else starts
            self._windows[key] = self._words[at]
        return self._windows[key]

    @cached_property
    def _windows(self) -> dict[tuple[bool, int], np.ndarray]:
        return {}

    def _holding(self, literal: str) -> np.ndarray:
        """Mask of the names whose line holds ``literal``. One that starts (or ends) with the
        newline is compared at every line's start (end) at once; others are searched for."""
        anchored = _anchored(literal) if self._ascii is not None and len(literal) <= len(self.blob) else None
        if anchored is None:
            return self._lines_at(self._occurrences(literal))
        at_end, pieces = anchored
        # A window too long for its line holds a newline or NULs, which the literal does not.
        same = None
        for distance, value, mask in pieces:
            word = self._window(at_end, distance)
            here = (word if mask is None else word & mask) == value
            same = here if same is None else same & here
        return same

    def _occurrences(self, literal: str) -> np.ndarray:
        """Blob offsets of the non-overlapping occurrences of ``literal``, found in C by one split."""
        pieces = self.blob.split(literal)
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces) - 1) + len(literal)
        return lengths.cumsum() - len(literal)

    def _lines_at(self, offsets: np.ndarray) -> np.ndarray:
        """Mask of the names whose line holds any of the blob ``offsets`` (a name's line starts at
        the newline before it)."""
        mask = np.zeros(len(self.names), dtype=bool)
        mask[self.newlines.searchsorted(offsets, side="right") - 1] = True
        return mask

    def _check(self, line: re.Pattern[str], literal: str) -> np.ndarray:
        """Mask of the names that the line regex ``line``, which cannot match a newline, matches
        whole: a match cannot run into the next name.

        The names that hold ``literal``, a piece of the blob every match holds, are found first;
        if they are few, the regex is tried at their lines only. Otherwise it scans the blob once,
        from the first of their lines to the last."""
        blob, mask = self.blob, np.zeros(len(self.names), dtype=bool)
        start, stop = 0, len(blob)
        if literal:
            candidates = self._holding(literal).nonzero()[0]
            if len(candidates) * 8 < len(self.names):
                starts = self.newlines[candidates].tolist()
                mask.put([k for k, at in zip(candidates.tolist(), starts) if line.match(blob, at)], True)
                return mask
            start, stop = int(self.newlines[candidates[0]]), int(self.newlines[candidates[-1] + 1]) + 1
        starts = [m.start() for m in line.finditer(blob, start, stop)]
        if starts:
            mask[self.newlines.searchsorted(starts)] = True  # each starts at the newline before its name
        return mask


@lru_cache(maxsize=4096)
def _anchored(literal: str) -> tuple[bool, tuple[tuple[int, int, int | None], ...]] | None:
    """A literal that starts (or ends) with the newline, as :meth:`NameList._holding` compares it at
    every line's start (end): whether at the end, and its 8-character pieces as little-endian words
    ``(distance, value, mask)``, the last 8 overlapping (mask None: the whole word). A piece's
    distance is from the line's start to it, or from it to the line's end. None for other
    literals, and those a word cannot hold (not ASCII, or with a NUL)."""
    at_end = literal.endswith("\n")
    if literal.startswith("\n") == at_end or not literal.isascii() or "\0" in literal:
        return None
    text = literal.strip("\n").encode("ascii")
    n = len(text)
    if n < 8:  # at the end: the high bytes of the word that ends the line
        shift = 8 * (8 - n) if at_end else 0
        return at_end, ((8 if at_end else 0, int.from_bytes(text, "little") << shift, ((1 << 8 * n) - 1) << shift),)
    offsets = [*range(0, n - 7, 8), *([n - 8] if n % 8 else [])]
    return at_end, tuple((n - k if at_end else k, int.from_bytes(text[k: k + 8], "little"), None) for k in offsets)


def _longest_literal(pattern: str) -> str:
    """The longest run of plain characters in a glob, with a newline on the side where it is the
    pattern's start or end: a piece of the blob that holds every match's line."""
    best, run, start, i, n = "", "", 0, 0, len(pattern)
    while i <= n:
        end = i  # where the wildcard at i ends
        if i < n and pattern[i] == "[":  # one character; an unclosed bracket is literal, as in fnmatch
            j = i + 1
            j += pattern[j: j + 1] == "!"
            j += pattern[j: j + 1] == "]"
            end = pattern.find("]", j)
        if i == n or pattern[i] in "*?" or end > i:
            if run:
                piece = ("\n" if start == 0 else "") + run + ("\n" if i == n else "")
                best = max(best, piece, key=len)
            run, i = "", end + 1
            start = i
        else:
            run += pattern[i]
            i += 1
    return best


_STARS = re.compile(r"\*+")
_PAD = bytes(8)
_WORD = np.dtype("<u8")  # made once: numpy parses a dtype string at every use
_CHANGE_LITERALS = int(re.IGNORECASE | re.VERBOSE)  # flags under which a pattern's text is not its literal start
# Characters that stand for themselves in a regex; escaped, these do too: \. \- \_ \/
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-/:,;<>=!@#%&~`' \"")


def _regex_head(pattern: str) -> str:
    """The literal start that every match of a regex begins with ("" where none is sure)."""
    if "|" in pattern:
        return ""
    head, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c in _PLAIN:
            head.append(c)
            i += 1
        elif c == "\\" and pattern[i + 1: i + 2] in (".", "-", "_", "/"):
            head.append(pattern[i + 1])
            i += 2
        else:
            if c in "*?{" and head:  # the last character is optional or repeated
                head.pop()
            break
    return "".join(head)


def _line_regex(body: str, flags: int) -> re.Pattern[str]:
    """``body`` as a whole line of the blob: after a newline, before the next."""
    return re.compile(f"\n{body}(?=\n)", flags)


@lru_cache(maxsize=4096)
def _regex_plan(pattern: str, flags: int) -> tuple[re.Pattern[str] | None, str]:
    """How :meth:`NameList.regex` answers a regex, worked out once per regex: the line regex that
    finds its names in the blob, and a piece of the blob every match holds (its literal start);
    ``(None, "")`` where it must be matched name by name."""
    if _LOOKS_AROUND.search(pattern) or _may_match_newline(pattern, flags):
        return None, ""
    try:
        line = _line_regex(f"(?:{pattern})", flags)
    except re.error:  # e.g. global inline flags, which cannot sit inside a group
        return None, ""
    head = "" if flags & _CHANGE_LITERALS else _regex_head(pattern)
    return line, "\n" + head if head else ""


# Regex syntax that looks past the name's own characters (anchors, lookarounds): such a regex
# must not run over the one-name-per-line blob, where it would see the neighbouring names.
_LOOKS_AROUND = re.compile(r"[$^]|\\[AZbB]|\(\?<?[=!]")


def _may_match_newline(pattern: str, flags: int) -> bool:
    """True if a regex could match a newline (``\\s``, ``\\W``, ``[^x]``, ``(?s).``...): over the
    one-name-per-line blob it could then run into the next name, or, made possessive, fail a name
    it should match. Read from the parsed pattern; anything not understood counts as a yes."""
    try:
        tree = _sre_parse.parse(pattern, flags)
    except Exception:  # compiled already: a parser that differs counts as a yes
        return True
    return _newline_in(tree.data, tree.state.flags)


def _newline_in(items: list, flags: int) -> bool:
    for op, arg in items:
        kind = op.name
        if kind == "LITERAL":
            hit = arg == 10
        elif kind == "NOT_LITERAL":
            hit = arg != 10
        elif kind == "ANY":
            hit = bool(flags & re.DOTALL)
        elif kind == "IN":
            hit = _class_has_newline(arg)
        elif kind == "SUBPATTERN":  # (group, flags added, flags removed, body)
            hit = _newline_in(arg[3], (flags | arg[1]) & ~arg[2])
        elif kind == "BRANCH":
            hit = any(_newline_in(branch, flags) for branch in arg[1])
        elif kind in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            hit = _newline_in(arg[2], flags)
        elif kind == "ATOMIC_GROUP":
            hit = _newline_in(arg, flags)
        elif kind == "GROUPREF_EXISTS":  # (group, yes, no)
            hit = _newline_in(arg[1], flags) or (arg[2] is not None and _newline_in(arg[2], flags))
        else:  # a backreference repeats a group checked where it is defined
            hit = kind != "GROUPREF"
        if hit:
            return True
    return False


# character categories that hold no newline (\d, \S, \w); every other one holds it
_NO_NEWLINE = {f"CATEGORY{loc}_{c}" for loc in ("", "_UNI", "_LOC") for c in ("DIGIT", "NOT_SPACE", "WORD")}


def _class_has_newline(items: list) -> bool:
    negate = found = False
    for op, arg in items:
        kind = op.name
        if kind == "NEGATE":
            negate = True
        elif kind == "LITERAL":
            found |= arg == 10
        elif kind == "RANGE":
            found |= arg[0] <= 10 <= arg[1]
        elif kind == "CATEGORY":
            found |= arg.name not in _NO_NEWLINE
        else:
            return True
    return found != negate
