"""Matching patterns against all of a model's names at once: :class:`NameList` answers "which of
these names fully match this glob / regex" with a boolean mask. Globs mean exactly
``fnmatch.fnmatchcase`` (``*`` crosses dots), regexes ``re.fullmatch``.

The names are joined into one string, a name per line, and one compiled *line regex* scans them
all in C: it starts at the newline before a name and must be followed by the newline after it.
That is exact while the pattern cannot match a newline or look beyond its own name; a pattern that
might (``[^x]``, ``\\s``, anchors, lookarounds, inline flags...) is matched name by name, and so is
everything when a name holds a newline. ``*x`` and ``*x*`` globs are a plain substring search.
"""

from __future__ import annotations

import fnmatch
import re
from functools import cached_property

import numpy as np

__all__ = ["NameList", "glob_spans_subtrees", "regex_spans_subtrees"]

# What a regex may hold and still be scanned line by line: no "(?" (lookarounds, inline flags,
# conditionals), no "[^", no anchors, no escape that is a letter or digit other than \d \w \S
# (\s, \W, \D, \n, \x0a, \b, \A, \1... could match a newline or see past the name), no control
# character (a range that spans the newline). Anything else is matched name by name.
_NOT_PER_LINE = re.compile(r"\(\?(?!:)|\[\^|[$^]|\\[^dwS\W]|[\x00-\x1f]")
_TRANSLATED = re.compile(r"\(\?s:(.*)\)\\[Zz]", re.DOTALL)  # fnmatch.translate's form: (?s:BODY)\Z


def glob_to_regex(pattern: str) -> str | None:
    """A regex that matches what ``fnmatch.fnmatchcase(name, pattern)`` matches, and never a newline
    (None if ``fnmatch.translate`` wraps a bracket in a way not known here)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c, i = pattern[i], i + 1
        if c == "*":
            out.append("[^\n]*")
        elif c == "?":
            out.append("[^\n]")
        elif c == "[":  # where a bracket ends, read as fnmatch.translate reads it
            j = i + (pattern[i: i + 1] == "!")
            j += pattern[j: j + 1] == "]"
            j = pattern.find("]", j)
            if j < 0:  # unclosed: a literal "["
                out.append(r"\[")
            else:  # fnmatch's own reading of the bracket, kept off the newline
                bracket = _TRANSLATED.fullmatch(fnmatch.translate(pattern[i - 1: j + 1]))
                if bracket is None:
                    return None
                out.append("(?!\n)" + bracket[1])
                i = j + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


def glob_spans_subtrees(pattern: str) -> bool:
    """True if a glob that matches a module's name matches every name below it (it ends in ``*``)."""
    return pattern.endswith("*")


def regex_spans_subtrees(pattern: str) -> bool:
    """True if a regex that matches a module's name matches every name below it: it ends in an
    unescaped ``.*`` and nothing (an alternation, an anchor, a lookaround) sees past a match's end."""
    if not pattern.endswith(".*") or "|" in pattern or "(?" in pattern or re.search(r"[$^]|\\[AZbB]", pattern):
        return False
    body = pattern[:-2]
    return (len(body) - len(body.rstrip("\\"))) % 2 == 0  # an even run of backslashes escapes no dot


class NameList:
    """A list of names with exact lookup and whole-list glob and regex matching."""

    def __init__(self, names: list[str]):
        self.names = names

    def find(self, name: str, stop: int | None = None) -> int | None:
        """Position of ``name`` (among the first ``stop`` names), or None."""
        try:  # a scan in C: cheaper than a dict for the few names a policy looks up
            return self.names.index(name, 0, len(self.names) if stop is None else stop)
        except ValueError:
            return None

    def positions(self, names: tuple[str, ...] | list[str]) -> list[int | None]:
        """Position of each of ``names``, or None where absent."""
        position = {name: i for i, name in enumerate(self.names)}
        return [position.get(name) for name in names]

    @cached_property
    def _lines(self) -> tuple[str, np.ndarray] | None:
        """The names as one string, a name per line between newlines, and the offset of the newline
        before each name; None if a name holds a newline itself."""
        blob = "\n".join(["", *self.names, ""])
        # each character as one 32-bit number, so that numpy finds the newlines at character offsets
        newlines = (np.frombuffer(blob.encode("utf-32-le", "surrogatepass"), dtype=np.uint32) == 10).nonzero()[0]
        return (blob, newlines[:-1]) if len(newlines) == len(self.names) + 1 else None

    @property
    def has_newlines(self) -> bool:
        """True if a name holds a newline: then every pattern is matched name by name."""
        return self._lines is None

    def glob(self, pattern: str) -> np.ndarray:
        """Boolean mask of the names that ``fnmatch.fnmatchcase`` the shell-style ``pattern``."""
        pattern = re.sub(r"\*+", "*", pattern)  # "**" is "*"
        if pattern == "*":
            return np.ones(len(self.names), dtype=bool)
        literal = pattern.strip("*")
        plain = not any(c in literal for c in "*?[")
        if plain and literal == pattern:
            return self._exact(pattern)
        line = None if self._lines is None or "\n" in pattern else glob_to_regex(pattern)
        if line is None:
            return self._each(re.compile(fnmatch.translate(pattern)))
        if plain and pattern[0] == "*":  # "*x" or "*x*": search the literal, with the newline at its end for "*x"
            return self._lines_holding(literal + ("" if pattern[-1] == "*" else "\n"))
        return self._scan(line)

    def regex(self, compiled: re.Pattern[str]) -> np.ndarray:
        """Boolean mask of the names that ``compiled.fullmatch``."""
        if self._lines is None or compiled.flags & ~re.UNICODE or _NOT_PER_LINE.search(compiled.pattern):
            return self._each(compiled)
        return self._scan(compiled.pattern)

    def _exact(self, name: str) -> np.ndarray:
        mask = np.zeros(len(self.names), dtype=bool)
        i = self.find(name)
        if i is not None:
            mask[i] = True
        return mask

    def _each(self, compiled: re.Pattern[str]) -> np.ndarray:
        return np.fromiter(map(bool, map(compiled.fullmatch, self.names)), dtype=bool, count=len(self.names))

    def _scan(self, pattern: str) -> np.ndarray:
        """Names that the regex ``pattern``, which cannot match a newline, matches whole: one scan of
        the lines, each match taking a run of consecutive names (a subtree is one run, not one match
        per name)."""
        blob, starts = self._lines
        line = f"\n(?:{pattern})(?=\n)"  # spelled out first, so that re can look for its literal start
        spans = [m.span() for m in re.finditer(f"{line}(?:{line})*", blob)]
        if not spans:
            return np.zeros(len(self.names), dtype=bool)
        first, stop = np.searchsorted(starts, np.array(spans).T)  # each run's first name, and the name after it
        edges = np.zeros(len(self.names) + 1, dtype=np.int8)  # runs never touch: +1 where one opens, -1 after
        edges[first], edges[stop] = 1, -1
        return np.cumsum(edges[:-1]) > 0

    def _lines_holding(self, literal: str) -> np.ndarray:
        """Names whose line (with the newline before it, and the one after) holds ``literal``."""
        blob, starts = self._lines
        offsets = [m.start() for m in re.finditer(re.escape(literal), blob)]
        mask = np.zeros(len(self.names), dtype=bool)
        mask[np.searchsorted(starts, offsets, side="right") - 1] = True  # a line starts at the newline before it
        return mask
