"""The repository's own promises: lint-clean, the public API as declared, the README's commands."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import freezekit as fk

ROOT = Path(__file__).resolve().parents[1]


def test_all_lists_exactly_the_public_names():
    public = {n for n in vars(fk) if not n.startswith("_") and not isinstance(getattr(fk, n), type(sys))}
    assert sorted(fk.__all__) == fk.__all__
    assert set(fk.__all__) - {"__version__"} == public


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is part of the test extra")
def test_ruff_is_clean():
    result = subprocess.run(["ruff", "check", "freezekit", "tests", "scripts"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in lines[:6] if line.startswith("pip install")]
    assert len(commands) == 2
    assert commands[0] == "pip install -e . && freezekit run recipes/quickstart.yaml"
    assert re.search(r"python -m pytest", commands[1])
    assert "grep -m1 -E '^pip install .*pytest' README.md" in (ROOT / ".ci/run").read_text()


def test_readme_has_the_recipe_reference_for_every_key():
    from freezekit.recipe.reference import reference

    assert reference() in (ROOT / "README.md").read_text()


PAGES = ["README.md", "SECURITY.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_leads_to_a_file(page):
    text = (ROOT / page).read_text()
    links = [link for link in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in link]
    missing = [link for link in links if not (ROOT / page).parent.joinpath(link).exists()]
    assert not missing, f"{page} links to missing files: {missing}"


def test_every_test_named_in_the_guarantees_exists():
    text = (ROOT / "docs" / "guarantees.md").read_text()
    missing = []
    for file, name in re.findall(r"`(test_\w+\.py)(?:::(\w+))?`", text):
        source = ROOT / "tests" / file
        if not source.exists() or (name and not re.search(rf"^def {name}\(", source.read_text(), re.M)):
            missing.append(f"{file}::{name}" if name else file)
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


def test_no_public_name_hides_a_submodule():
    # ``import freezekit.summary as m`` must give the module, not the function fk.summary
    assert [n for n in fk.__all__ if importlib.util.find_spec(f"freezekit.{n}") is not None] == []


def _imports(path: Path) -> set[str]:
    """The freezekit modules that the module at ``path`` imports, anywhere in it."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            out |= {f"{target}.{a.name}" if (ROOT / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                    else target for a in node.names}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out |= {n for n in names if n.startswith("freezekit")}
    return {m.removesuffix(".__init__") for m in out}


def test_modules_import_each_other_top_down():
    # no import cycle between freezekit's modules, nor between its subpackages (recipe -> train, not back):
    # each file can be read knowing only what it imports
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "freezekit").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imported = _imports(path)
        graph.setdefault(module, set()).update(imported)

        def unit(name: str) -> str:  # a top-level module, or a subpackage as a whole
            return ".".join(name.split(".")[:2]) + ":"

        graph.setdefault(unit(module), set()).update({unit(m) for m in imported} - {unit(module)})
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, cycles[:5]


def test_importing_freezekit_imports_no_framework():
    # the integrations are optional: only importing freezekit.integrations.<framework> imports it
    code = ("import sys, freezekit, freezekit.integrations.loop; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'peft') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
