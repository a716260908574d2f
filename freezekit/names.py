"""Matching patterns against many names at once.

:class:`NameList` holds a model's qualified names and answers "which of them fully match this
glob / regex" with a boolean mask. The names are joined into one string, a name per line, so that
the regex engine scans them in C instead of being called once per name from Python; a pattern
with a fixed start is found with ``str.find`` and checked only where it occurs. Globs follow
``fnmatch.fnmatchcase`` exactly (``*`` crosses dots); regexes ``re.fullmatch``. Names holding a
newline or NUL (possible, if odd) fall back to matching one name at a time.
"""

from __future__ import annotations

import fnmatch
import re
from functools import cached_property, lru_cache

import numpy as np

__all__ = ["NameList", "fixed_start", "glob_to_regex", "is_literal"]

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
            body, i = pattern[i:j], j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            items, k = [], 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    lo, hi = body[k], body[k + 2]
                    if lo <= hi:  # fnmatch drops reversed ranges
                        items.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    k += 3
                else:
                    items.append(re.escape(body[k]))
                    k += 1
            chars = "".join(items)
            if negate:
                out.append(f"[^\n{chars}]")
            else:
                out.append(f"[{chars}]" if chars else "(?!)")
        else:
            out.append(re.escape(c))
    return tuple(out)


def glob_to_regex(pattern: str) -> str:
    """A regex body equivalent to ``fnmatch.fnmatchcase`` with ``pattern``, never matching ``\\n``."""
    return "".join(_glob_tokens(pattern))


def fixed_start(pattern: str) -> str:
    """The characters of a glob before its first wildcard or bracket."""
    cut = [i for i in (pattern.find(c) for c in "*?[]") if i >= 0]
    return pattern[: min(cut)] if cut else pattern


def is_literal(pattern: str) -> bool:
    """True if a glob pattern has no wildcard and so names exactly one thing."""
    return not any(c in pattern for c in "*?[")


class NameList:
    """A list of names with fast exact lookup and fast whole-list regex matching."""

    def __init__(self, names: list[str]):
        self.names = names

    def find(self, name: str, stop: int | None = None) -> int | None:
        """Position of ``name`` (among the first ``stop`` names), or None."""
        try:  # a C scan: cheaper than building a dict for a few lookups
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
        # Python. Names are arbitrary strings; if one holds a newline or NUL the per-name path is used.
        blob = "\n" + "\n".join(self.names) + "\n"
        if blob.count("\n") != len(self.names) + 1 or "\0" in blob:
            return None
        return blob

    def glob(self, pattern: str) -> np.ndarray:
        """Boolean mask of the names that fully match the shell-style ``pattern``."""
        if pattern == "*":
            return np.ones(len(self.names), dtype=bool)
        if is_literal(pattern):
            return self.exact(pattern)
        tokens = _glob_tokens(pattern)
        if tokens[0] == _ANY and tokens[-1] != _ANY and self.blob is not None:
            # "*.bias": scan the reversed names for "saib.*", which starts with a literal.
            mask = self._lines("".join(reversed(tokens)), reverse=True, literal=fixed_start(pattern[::-1]))
        else:
            mask = self._lines("".join(tokens), literal=fixed_start(pattern))
        return mask if mask is not None else self._each(re.compile(fnmatch.translate(pattern)))

    def regex(self, compiled: re.Pattern[str]) -> np.ndarray:
        """Boolean mask of the names that ``compiled.fullmatch``."""
        mask = None
        if not _LOOKS_AROUND.search(compiled.pattern):
            try:
                mask = self._lines(f"(?:{compiled.pattern})", compiled.flags)
            except re.error:  # e.g. global inline flags, which cannot sit inside a group
                mask = None
        return mask if mask is not None else self._each(compiled)

    def _each(self, compiled: re.Pattern[str]) -> np.ndarray:
        return np.fromiter(map(bool, map(compiled.fullmatch, self.names)), dtype=bool, count=len(self.names))

    @cached_property
    def newlines(self) -> np.ndarray:
        """Character offset in the blob of the newline before each name, and of the last newline."""
        lengths = np.fromiter(map(len, self.names), dtype=np.int64, count=len(self.names)) + 1
        return np.concatenate(([0], np.cumsum(lengths)))

    @cached_property
    def _reversed_blob(self) -> str:
        return self.blob[::-1]  # the names reversed, last first

    def _lines(self, body: str, flags: int = 0, reverse: bool = False, literal: str = "") -> np.ndarray | None:
        """Mask of the names that ``body`` matches whole; None where the blob cannot answer (no blob,
        or a match ran across lines, which a user's ``\\s`` or ``[^x]`` can do).

        Names that start with ``literal`` (the pattern's fixed start) are few: ``str.find`` jumps
        to each and the regex checks it there. Otherwise one scan marks every matching line with a
        NUL and numpy finds the marked lines."""
        if self.blob is None:
            return None
        blob = self._reversed_blob if reverse else self.blob
        regex = _line_regex(body, flags)
        if literal:
            needle = "\n" + literal
            if blob.count(needle) * 32 < len(self.names):
                found, at = [], blob.find(needle)
                while at >= 0:
                    if regex.match(blob, at):
                        found.append(at)
                    at = blob.find(needle, at + 1)
                mask = np.zeros(len(self.names), dtype=bool)
                lines = (len(blob) - 1 - self.newlines)[::-1] if reverse else self.newlines
                mask[np.searchsorted(lines, found)] = True
                return mask[::-1] if reverse else mask
        chars = np.frombuffer(regex.sub("\n\0", blob).encode(), dtype=np.uint8)
        starts = (chars == 10).nonzero()[0][:-1] + 1
        if len(starts) != len(self.names):
            return None
        mask = chars[starts] == 0
        return mask[::-1] if reverse else mask


@lru_cache(maxsize=4096)
def _line_regex(body: str, flags: int) -> re.Pattern[str]:
    """``body`` as a whole line of the blob: after a newline, before the next."""
    return re.compile(f"\n{body}(?=\n)", flags)


# Regex syntax that looks past the name's own characters (anchors, lookarounds): such a regex
# must not run over the one-name-per-line blob, where it would see the neighbouring names.
_LOOKS_AROUND = re.compile(r"[$^]|\\[AZbB]|\(\?<?[=!]")
