"""Every Python block in docs/*.md and the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks():
    for path in sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"]):
        for i, match in enumerate(BLOCK.finditer(path.read_text())):
            yield pytest.param(match.group(1), id=f"{path.name}[{i}]")


@pytest.mark.parametrize("code", list(blocks()))
def test_block_runs(code):
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_block__"})
