"""Bad input everywhere: fuzzed recipes, nonsense on the command line, wrong types to the library.

1. Thousands of YAML documents -- the bundled recipes mutated (keys deleted, duplicated, renamed;
   values swapped for lists, mappings, null, huge and negative numbers, NaN, unicode, long strings;
   indentation broken, tabs, Python tags, anchors, aliases and alias bombs, truncation, random bytes)
   and fully random text -- go through the recipe loader and ``check`` (what ``freezekit check``
   runs), and some through the CLI. Each ends in a successful load or a ``RecipeError`` whose every
   problem says ``file:line``; never another exception; the CLI exits 1 with ``error: ...``.
2. Every command and option of the CLI gets nonsense: a non-zero exit, a usage or ``error:`` message,
   never a traceback.
3. Every public callable of ``freezekit`` given wrong types or values raises ``TypeError`` /
   ``ValueError`` whose message names the argument.

The fuzzing is deterministic (a seeded mutator, hypothesis derandomized) and sized for CI (well
under 30 s on two cores). For a long run, raise the count of documents (and hypothesis examples)::

    FREEZEKIT_FUZZ_EXAMPLES=200000 python -m pytest tests/test_fuzz.py -q

``FREEZEKIT_FUZZ_SEED`` (an int) starts the mutator elsewhere, to explore new documents.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import random
import re
import subprocess
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import freezekit as fk
from freezekit.cli import app
from freezekit.recipe import RecipeError, check, load, loads
from freezekit.recipe.bundled import bundled

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FREEZEKIT_FUZZ_EXAMPLES") or 0)  # 0: the CI sizes below
SEED = int(os.environ.get("FREEZEKIT_FUZZ_SEED") or 0)
DOCUMENTS = EXAMPLES or 1000  # mutated recipes, through load and check
RANDOM_TEXTS = EXAMPLES or 800  # fully random documents, through load
HYPOTHESIS = settings(max_examples=max(EXAMPLES // 10, 150), derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))
runner = CliRunner()

BUNDLED = {path.stem: path.read_text() for path, _ in bundled()}
LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")

# --------------------------------------------------------------------------------------- the mutator

LONG = "a" * 100_000
JUNK = [
    None, [], {}, [None], [[[]]], {"a": {"b": [1]}}, 0, 1, -1, -3, 10**40, -(10**40), 2**63, 2**64 + 1, 1.5, -0.0,
    1e308, -1e-308, math.nan, math.inf, -math.inf, True, False, "", " ", "\t", "x", "*", "re:(", "re:.*",
    "re:" + "(a" * 400,
    "☃", "名前", "\u202e\u0301", "\U0001f600", "\x00", "\x1b[31m", LONG, "*" * 5000, "timm:", ":", "timm:nope",
    "torchvision:resnet18", "os:system", "torch:zeros", "../../../../etc/passwd", "/", "/dev/null", ".", "~", "null",
    "%s%n", "{", "[", "'", "\\", "0x10", "1e400", ".inf", "yes", "2001-12-14", b"\x00\xff", {1, 2},
    {"glob": 3}, {"norms": False}, {"first": {"of": 1, "n": -1}}, {"last": {"of": "layer", "n": 10**30}},
    {"union": ["a"]}, {"complement": None}, {"types": ["torch.nn.Nope", ""]}, {"regex": "("}, ["*", None],
    {"freeze": "*"}, [{"freeze": None}], [{"unfreeze": [], "norm": "x"}], {"at": -1, "policy": 3},
    {"gradual_unfreeze": {"groups": [], "every": 0}}, [{"at": 1, "policy": [{"detach": "*", "at": "nowhere"}]}],
    # plausible values in the wrong place, to get past the schema into check
    "layer4", "fc", "nomatch", "blocks.*", "re:layer[", "eval", "frozen_bn", "input", {"norms": True},
    {"first": {"of": "layer", "n": 2}}, {"types": ["BatchNorm2d"]}, {"difference": ["*", "fc"]}, ["fc", "layer1"],
    {"unfreeze": "layer4"}, [{"at": 0, "policy": [{"eval_mode": "*"}], "unit": "step"}],
]
KEYS = ["name", "seed", "model", "data", "policy", "schedule", "optimizer", "train", "output", "kwargs", "path",
        "num_classes", "freeze", "unfreeze", "detach", "eval_mode", "norm", "at", "lr_mult", "select", "groups",
        "<<", "", "nope", "Model", "épochs", "a" * 1000, "1", "null", "true", "strict", "no_grad"]
TAGS = ["!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "!!python/object:object {}",
        "!!python/tuple [1]", "!!binary", "!!set", "!!omap", "!!timestamp", "!!float", "!!int", "!!str", "!!null",
        "!!bool", "!!map", "!!seq", "!custom", "!<tag:yaml.org,2002:python/none>", "!!merge"]
TOKENS = ["{", "}", "[", "]", ":", ": ", "- ", "? ", "|", ">", "'", '"', "%", "@", "`", "#", "&", "*", ",", "!",
          "&a", "*a", "*nope", "<<: *a", "---", "...", "%YAML 1.1", "%TAG ! tag:x,2000:", "\t", "\ufeff", "\r",
          "\x00", "\x7f", "\u2028", "\ud800", "\\", "~", "=", "<<"]


def bomb(levels: int) -> str:
    """A billion-laughs document fragment: ``b{levels}`` stands for 9 ** levels strings."""
    rows = ["b0: &b0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(rows)


def _paths(data, prefix=()):
    """Every (path to a value) in nested dicts and lists."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, (*prefix, i))


def _parent(data, path):
    for part in path[:-1]:
        data = data[part]
    return data


def _junk(rng: random.Random):
    value = rng.choice(JUNK)
    return copy.deepcopy(value) if isinstance(value, (dict, list, set)) else value


def mutate_data(data, rng: random.Random):
    """One structural change to parsed YAML data (in place); returns the data (maybe replaced)."""
    paths = [p for p in _paths(data) if p]
    op = rng.randrange(9)
    if not paths or op == 0:
        return _junk(rng) if rng.random() < 0.2 else {rng.choice(KEYS): _junk(rng)}
    free = [p for p in paths if p[0] in ("policy", "schedule") or p[:2] in (("optimizer", "groups"),
                                                                             ("model", "kwargs"))]
    path = rng.choice(free if free and rng.random() < 0.5 else paths)  # free-form: past the schema, into check
    parent, last = _parent(data, path), path[-1]
    if op == 1:  # delete
        del parent[last]
    elif op == 2 and isinstance(parent, dict):  # rename the key: a typo, or junk
        key = str(last)
        new = rng.choice([key[:-1], key[1:], key.upper(), key + "s", key[::-1], rng.choice(KEYS), 7, None, 1.5])
        if new not in parent:
            parent[new] = parent.pop(last)
    elif op == 3:  # wrap
        parent[last] = rng.choice([[parent[last]], {rng.choice(KEYS): parent[last]}])
    elif op == 4 and isinstance(parent[last], list) and parent[last]:  # unwrap
        parent[last] = parent[last][0]
    elif op == 5 and isinstance(parent, list):  # duplicate an item
        parent.insert(last, copy.deepcopy(parent[last]))
    elif op == 6 and isinstance(parent[last], dict):  # a new key
        parent[last][rng.choice(KEYS)] = _junk(rng)
    elif op == 7:  # swap two values
        other = rng.choice(paths)
        other_parent = _parent(data, other)
        if path[:len(other)] != other and other[:len(path)] != path:
            parent[last], other_parent[other[-1]] = other_parent[other[-1]], parent[last]
    else:
        parent[last] = _junk(rng)
    return data


def mutate_text(text: str, rng: random.Random) -> str:
    """One textual change: lines, indentation, tags, anchors and aliases, tokens, truncation."""
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    op = rng.randrange(14)
    if op == 0 and len(lines) > 1:
        del lines[i]
    elif op == 1:  # a duplicate line: a duplicate key, mostly
        lines.insert(i, lines[i])
    elif op == 2:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == 3:  # indentation
        stripped = lines[i].lstrip(" ")
        indent = len(lines[i]) - len(stripped)
        lines[i] = " " * max(0, indent + rng.choice([-4, -2, -1, 1, 2, 3])) + stripped
    elif op == 4:  # tabs
        lines[i] = lines[i].replace("  ", "\t", rng.randint(1, 3)) if rng.random() < 0.7 else "\t" + lines[i]
    elif op == 5 and ": " in lines[i]:  # a tag before a value
        key, _, value = lines[i].partition(": ")
        lines[i] = f"{key}: {rng.choice(TAGS)} {value}"
    elif op == 6 and ": " in lines[i]:  # an anchor here, an alias elsewhere, or a merge
        key, _, value = lines[i].partition(": ")
        lines[i] = f"{key}: &a {value}"
        j = rng.randrange(len(lines))
        if ": " in lines[j]:
            k, _, _ = lines[j].partition(": ")
            lines[j] = f"{k}: {rng.choice(['*a', '[*a, *a]', '{<<: *a}', '*nope', '&r [*r]', '&a *a'])}"
    elif op == 7:  # an alias bomb, at the top or under a section
        levels = rng.randint(3, 10)
        where = rng.choice(["top", "kwargs", "policy", "seed"])
        if where == "top":
            lines.insert(0, bomb(levels))
        else:
            lines.insert(0, "x:\n" + "\n".join("  " + r for r in bomb(levels).split("\n")))
            lines = [ln for ln in lines if not ln.startswith(f"{where}:")] + \
                [f"{where}: *b{levels - 1}" if where != "kwargs" else f"model: {{name: 'timm:test_resnet', "
                                                                     f"kwargs: {{x: *b{levels - 1}}}}}"]
    elif op == 8:  # a token
        at = rng.randint(0, len(lines[i]))
        lines[i] = lines[i][:at] + rng.choice(TOKENS) + lines[i][at:]
    elif op == 9:  # a value replaced by junk text
        key, sep, _ = lines[i].partition(": ")
        if sep:
            lines[i] = key + ": " + "".join(rng.choice([*TOKENS, "x", "1", " ", "-1", "1e999", "null"])
                                            for _ in range(rng.randint(1, 6)))
    elif op == 10:  # deep nesting
        depth = rng.choice([10, 70, 300, 3000])
        lines[i] += rng.choice([" " + "[" * depth, " " + "{a: " * depth + "1" + "}" * depth, " " + "[" * depth
                                + "]" * depth, "\n" + "\n".join("  " * d + "- " for d in range(min(depth, 300)))])
    elif op == 11:  # line endings
        return rng.choice(["\r\n", "\r", "\x85", "\u2028"]).join(lines)
    elif op == 12:  # a very long line
        lines.insert(i, rng.choice(["a: ", "- ", "", "#"]) + rng.choice(["x", "[1, ", "{a: 1, ", "'"]) * 20_000)
    else:  # truncated
        text = "\n".join(lines)
        return text[:rng.randrange(len(text) + 1)]
    return "\n".join(lines)


def mutated(rng: random.Random) -> bytes:
    """A bundled recipe, changed one to four times, structurally and/or textually; or random bytes."""
    text = BUNDLED[rng.choice(sorted(BUNDLED))]
    kind = rng.random()
    if kind < 0.6:
        data = yaml.safe_load(text)
        for _ in range(rng.randint(1, 3)):
            data = mutate_data(data, rng)
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=rng.random() < 0.5,
                              default_flow_style=rng.choice([None, True, False]), width=rng.choice([80, 10**6]))
    for _ in range(0 if kind < 0.4 else 1 if kind < 0.6 else rng.randint(1, 3)):
        text = mutate_text(text, rng)
    raw = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:  # random bytes, spliced in
        at = rng.randrange(len(raw) + 1)
        raw = raw[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + raw[at:]
    return raw


def random_text(rng: random.Random) -> str:
    """Lines of YAML-ish noise: indentation, keys, punctuation, scalars, unicode."""
    alphabet = "abcxyz019 :-[]{},#&*!|>'\"%@`?\t\\.~=<\n"
    out = []
    for _ in range(rng.randint(0, 12)):
        indent = " " * rng.choice([0, 0, 2, 4, 1, 3])
        if rng.random() < 0.5:
            key = rng.choice([*KEYS[:20], "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))])
            value = "".join(rng.choice(alphabet + "☃\u00e9\x00\x85") for _ in range(rng.randint(0, 20)))
            out.append(f"{indent}{key}: {value}")
        else:
            out.append(indent + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
    return "\n".join(out)


# ------------------------------------------------------------------------------------ the property


def _lines(raw: bytes) -> int:
    return len(LINE_BREAK.split(raw.decode("utf-8", "replace")))


def assert_located(error: RecipeError, file: str, raw: bytes) -> None:
    """Every problem of ``error`` is at ``file:LINE`` with a line of the document."""
    assert error.problems, error
    text = str(error)
    for problem in error.problems:
        assert problem.file == file and isinstance(problem.line, int), problem
        assert 1 <= problem.line <= _lines(raw) + 1, (problem, _lines(raw))
        assert f"{file}:{problem.line}: " in text


def load_and_check(path: Path, raw: bytes, deep: bool = True) -> str:
    """Load (and check) the document ``raw`` as the file ``path``: ``"ok"``, ``"load"`` or ``"check"``
    (where the RecipeError came from); anything else raised is a bug."""
    path.write_bytes(raw)
    try:
        recipe = load(path)
    except RecipeError as e:
        assert_located(e, str(path), raw)
        return "load"
    if not deep:
        return "ok"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(recipe)
    except RecipeError as e:
        assert_located(e, str(path), raw)
        return "check"
    return "ok"


def _shown(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) < 3000 else text[:1500] + f"\n...[{len(text) - 3000} characters]...\n" + text[-1500:]


def test_mutated_recipes_load_or_fail_at_a_line(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "fuzz.yaml"
    outcomes = {"ok": 0, "load": 0, "check": 0}
    for i in range(DOCUMENTS):
        raw = mutated(rng)
        try:
            outcomes[load_and_check(path, raw)] += 1
        except BaseException as e:
            raise AssertionError(f"document {i} (seed {SEED}) raised {type(e).__name__}: {e}\n"
                                 f"--- document ---\n{_shown(raw)}") from e
    # the mutator reaches every stage: some documents load and check, some fail in each
    assert min(outcomes.values()) >= DOCUMENTS // 50, outcomes


def test_random_text_and_bytes_fail_at_a_line(tmp_path):
    rng = random.Random(SEED + 1)
    path = tmp_path / "noise.yaml"
    for i in range(RANDOM_TEXTS):
        raw = random_text(rng).encode("utf-8") if i % 4 else bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        try:
            load_and_check(path, raw)
        except BaseException as e:
            raise AssertionError(f"document {i} raised {type(e).__name__}: {e}\n--- document ---\n{_shown(raw)}") \
                from e


@HYPOTHESIS
@given(st.text(alphabet=st.sampled_from(list("ab1 :-[]{},#&*!|>'\"%@`?\t\n\r\x00\ufeff☃")), max_size=200))
def test_hypothesis_text_loads_or_fails_at_a_line(text):
    try:
        loads(text, "h.yaml")
    except RecipeError as e:
        assert_located(e, "h.yaml", text.encode("utf-8"))


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.sampled_from(["*", "fc", "layer4", "re:(", "timm:test_resnet", "eval", "frozen_bn", "output"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(KEYS[:-10]) | st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["name", "seed", "model", "model.name", "model.num_classes", "model.kwargs", "model.checkpoint",
          "model.pretrained", "data", "data.kind", "data.path", "data.image_size", "policy", "policy.0",
          "policy.0.freeze", "policy.0.norm", "schedule", "optimizer.lr", "optimizer.groups", "optimizer.layer_decay",
          "optimizer.name", "train.epochs", "train.device", "train.cache_features", "output.dir", "extra"]


@HYPOTHESIS
@given(base=st.sampled_from(sorted(BUNDLED)), field=st.sampled_from(FIELDS), value=JSONISH)
def test_hypothesis_values_in_every_field(base, field, value, tmp_path_factory):
    data = yaml.safe_load(BUNDLED[base])
    if field.startswith("policy."):
        data["policy"] = data.get("policy") or [{"freeze": "*"}]
    node = data
    *parents, last = [int(p) if p.isdigit() else p for p in field.split(".")]
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    if isinstance(node, list) and not node:
        node.append(None)
    node[last] = value
    raw = yaml.safe_dump(data, sort_keys=False).encode("utf-8")
    load_and_check(tmp_path_factory.mktemp("h") / "field.yaml", raw)


def test_some_mutated_recipes_through_the_cli(tmp_path):
    rng = random.Random(SEED + 2)
    path = tmp_path / "cli.yaml"
    codes = set()
    for _ in range(24):
        raw = mutated(rng)
        path.write_bytes(raw)
        result = runner.invoke(app, ["check", str(path)])
        codes.add(result.exit_code)
        assert result.exit_code in (0, 1), (result.exit_code, result.output, _shown(raw))
        assert result.exception is None or isinstance(result.exception, SystemExit), (result.exception, _shown(raw))
        assert "Traceback" not in result.output
        if result.exit_code == 1:
            assert result.stderr.startswith("error: ") and re.search(rf"{re.escape(str(path))}:\d+: ", result.stderr), \
                (result.stderr, _shown(raw))
    assert codes == {0, 1}


FOUND = [
    ("", "model: required, but missing"),
    ("# only a comment\n", "model: required, but missing"),
    ("model: " + "[" * 3000, "nested more than 64 levels deep"),
    ("model:\n" + "".join("  " * d + "- \n" for d in range(200)), "nested more than 64 levels deep"),
    ("model: {name: 'timm:test_resnet'}\n" + bomb(9) + "\npolicy: *b8\n", "an alias bomb?"),
    ("model: {name: 'timm:test_resnet'}\nx: &a [*a]\n", "recursive"),
    ("model: {name: 'timm:test_resnet'}\na0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 400))
     + "policy: *a399\n", "a399: YAML: nested more than 64 levels deep"),  # each alias shallow, together deep
    ("model: {name: 'timm:test_resnet'}\n? [a, b]\n: 1\n", "a mapping or list as a key"),
    ("model: {name: timm:test_resnet}\x00\n", "unacceptable character '\\x00'"),
    ("model:\n  name: timm:test_vit\n  kwargs: {depth: -3}\n", "model.kwargs: building the model failed: "
                                                                "RuntimeError"),
    ("model: {name: 'timm:test_resnet'}\noptimizer: {lr: .inf}\n", "optimizer.lr: Input should be a finite number"),
    ("model: {name: 'timm:test_resnet'}\nschedule: [{at: 1, policy: [{unfreeze: fc}], lr_mult: .nan}]\n",
     "lr_mult: expected a positive finite number"),
    ("model: {name: 'timm:test_resnet'}\npolicy: [{freeze: 're:" + "(a" * 500 + ")" * 500 + "'}]\n",
     "bad regular expression"),
    ("model: {name: 'timm:test_resnet'}\npolicy: [{freeze: {types: ['']}}]\n", "'' is not a class name"),
    ("model: !!seq {name: x}\n", "expected a sequence for tag:yaml.org,2002:seq"),
    ("model: {name: !!timestamp 2001-13-45}\n", "cannot read '2001-13-45' as tag:yaml.org,2002:timestamp"),
    ("model: {name: 'timm:test_resnet'}\nx: !!int 0x\n", "cannot read '0x' as tag:yaml.org,2002:int"),
]


@pytest.mark.parametrize("text,message", FOUND, ids=[re.sub(r"\W+", "-", m).strip("-") for _, m in FOUND])
def test_found_by_fuzzing(tmp_path, text, message):
    """Each of these once escaped as a traceback, or failed without a line; now each is a located problem."""
    raw = text.encode("utf-8")
    with pytest.raises(RecipeError, match=re.escape(message)) as e:
        path = tmp_path / "found.yaml"
        path.write_bytes(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(load(path))
    assert_located(e.value, str(tmp_path / "found.yaml"), raw)


def test_not_utf8_is_located(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(RecipeError, match=r"latin1\.yaml:2: not UTF-8 text \(byte 0xe9 at offset 18\)"):
        load(path)


# ------------------------------------------------------------------------------------ the CLI, argument by argument

QUICK = str(ROOT / "recipes" / "quickstart.yaml")
TINY = ["--set", "train.epochs=1", "--set", "data.train_size=8", "--set", "data.val_size=8", "--set",
        "data.image_size=16"]
SETS = ["=", "a", "=1", " =1", "train.epochs=x", "train.epochs=-3", "train.epochs=1e400", "nope.nope=1",
        "[0]=1", "policy[99]=x", "policy.x=1", "train.epochs[0]=1", "model=3", "model.name=", "seed=&a [*a]",
        "train.epochs=" + "[" * 3000, "optimizer.lr=.nan", "optimizer.lr=.inf", "x=!!python/name:os.system",
        "policy=[{freeze: nomatch}]", "schedule=[{at: 1, policy: [{freeze: nomatch}]}]", "data.kind=☃",
        "model.name=timm:" + "x" * 10_000, "train=" + "{a: " * 100 + "}" * 100, "\x00=1", "train.epochs=\x00"]


def _nonsense(tmp_path: Path) -> dict[str, list[list[str]]]:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "empty.yaml").write_text("")
    afile = tmp_path / "a-file"
    afile.write_text("x")
    missing = str(tmp_path / "missing.yaml")
    recipes = ["", missing, str(folder), str(tmp_path / "binary.yaml"), str(tmp_path / "empty.yaml"), "-", "x" * 5000]
    return {
        "check": [["check"], *(["check", r] for r in recipes), *(["check", QUICK, "--set", s] for s in SETS),
                  ["check", QUICK, "--set"], ["check", QUICK, "--allow-import"], ["check", QUICK, "--nope"],
                  ["check", QUICK, QUICK]],
        "run": [["run"], *(["run", r] for r in recipes), *(["run", QUICK, "--set", s] for s in SETS[:12]),
                ["run", QUICK, *TINY, "--output", str(afile)], ["run", QUICK, *TINY, "--output", str(afile / "sub")],
                ["run", QUICK, "--output", str(folder), "--resume"], ["run", QUICK, "--output"],
                ["run", QUICK, "--resume=x"], ["run", QUICK, "--quiet", "--quiet", "--nope"],
                ["run", missing, "--output", "", "--resume"]],
        "summary": [["summary"], ["summary", "timm:test_resnet", "--recipe", QUICK],
                    *(["summary", m] for m in ["", ":", "timm:", "test_resnet", "timm:nope", "torchvision:nope",
                                                "os:system", "torch:zeros", "torch.nn:Linear", "x" * 5000, "☃:☃"]),
                    *(["summary", "--recipe", r] for r in recipes),
                    *(["summary", "timm:test_resnet", option, p] for option in ("--freeze", "--unfreeze", "--detach")
                      for p in ["", "re:(", "nomatch", "re:" + "(a" * 500]),
                    *(["summary", "timm:test_resnet", "--depth", d] for d in ["-3", "0", "x", "1.5", "", "1e9" * 3]),
                    *(["summary", "timm:test_resnet", "--format", f] for f in ["xml", "", "JSON"]),
                    ["summary", "timm:test_resnet", "--allow-import"], ["summary", "timm:test_resnet", "extra"]],
        "recipes": [["recipes", "extra"], ["recipes", "--nope"], ["recipes", "--set", "a=1"]],
        "root": [["--nope"], ["nope"], ["--nope", "--version"], [""]],
    }


@pytest.mark.parametrize("command", ["check", "run", "summary", "recipes", "root"])
def test_every_option_given_nonsense_fails_cleanly(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in _nonsense(tmp_path)[command]:
        result = runner.invoke(app, args)
        shown = [a[:80] for a in args]
        assert result.exit_code not in (0, None), (shown, result.output[-2000:])
        assert "Traceback" not in result.output, (shown, result.output[-2000:])
        assert result.exception is None or isinstance(result.exception, SystemExit), (shown, result.exception)
        output = result.output.lower()
        assert "error" in output or "usage" in output, (shown, result.output[-2000:])
        if result.exit_code == 1:  # a user error the command reported itself: one clear line first
            assert result.stderr.startswith("error: "), (shown, result.stderr[-2000:])
    assert not (tmp_path / "runs").exists()  # nothing was trained


@pytest.mark.parametrize("args", [
    ["check", QUICK, "--set", "train.epochs=" + "[" * 3000],
    ["summary", "timm:test_resnet", "--depth", "-3"],
    ["run", "missing.yaml"],
], ids=["check", "summary", "run"])
def test_real_processes_fail_without_traceback(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "freezekit", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr and ("error" in result.stderr.lower() or "usage" in result.stderr.lower())


# -------------------------------------------------------------------------- the library, argument by argument

Pair = namedtuple("Pair", "a b")


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))


def _misuse():
    """(call, exception type, the argument its message must name) for every public callable."""
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    policy = fk.Policy(fk.freeze("0"))
    phase = fk.Phase(0, policy)
    loss = m(torch.ones(2, 2)).sum()
    return [
        # selectors
        (lambda: fk.glob(3), TypeError, "glob()"),
        (lambda: fk.glob(), TypeError, "glob()"),
        (lambda: fk.glob(None), TypeError, "glob()"),
        (lambda: fk.glob(""), fk.PatternError, "glob(): an empty pattern"),
        (lambda: fk.regex(1), TypeError, "regex()"),
        (lambda: fk.regex("("), fk.PatternError, "'('"),
        (lambda: fk.regex("(a" * 500 + ")" * 500), fk.PatternError, "regular expression"),
        (lambda: fk.names(1), TypeError, "names()"),
        (lambda: fk.names(), TypeError, "names()"),
        (lambda: fk.types(3), TypeError, "types()"),
        (lambda: fk.types(), TypeError, "types()"),
        (lambda: fk.types(int), TypeError, "int"),
        (lambda: fk.types(""), fk.PatternError, "types()"),
        (lambda: fk.types("torch.nn.Nope"), fk.PatternError, "torch.nn.Nope"),
        (lambda: fk.norms(1), TypeError, "norms()"),
        (lambda: fk.first("x"), TypeError, "'n'"),
        (lambda: fk.first(1, 2), TypeError, "container"),
        (lambda: fk.first("a", "2"), TypeError, "n:"),
        (lambda: fk.last(-1), TypeError, "'n'"),
        (lambda: fk.last("a", -1), ValueError, "n:"),
        (lambda: fk.first("a", 1.5), TypeError, "n:"),
        (lambda: fk.first("a", True), TypeError, "n:"),
        (lambda: fk.where(3), TypeError, "fn"),
        (lambda: fk.glob("a") | 3, TypeError, "operand"),
        (lambda: 3 - fk.glob("a"), TypeError, "operand"),
        (lambda: fk.glob("a") & None, TypeError, "operand"),
        (lambda: fk.glob("a").select("x"), TypeError, "model"),
        # rules and policies
        (lambda: fk.freeze(None), TypeError, "argument 1"),
        (lambda: fk.freeze(), TypeError, "freeze()"),
        (lambda: fk.freeze(["a"]), TypeError, "argument 1"),
        (lambda: fk.freeze("*", ""), fk.PatternError, "argument 2: an empty pattern"),
        (lambda: fk.freeze("*", norm="x"), ValueError, "norm"),
        (lambda: fk.freeze("*", norm=None), ValueError, "norm"),
        (lambda: fk.freeze("*", strict=1), TypeError, "strict"),
        (lambda: fk.unfreeze(1), TypeError, "argument 1"),
        (lambda: fk.unfreeze("*", strict="no"), TypeError, "strict"),
        (lambda: fk.detach("*", at="x"), ValueError, "at"),
        (lambda: fk.detach("*", at=None), ValueError, "at"),
        (lambda: fk.detach("*", no_grad="y"), TypeError, "no_grad"),
        (lambda: fk.eval_mode(3.0), TypeError, "argument 1"),
        (lambda: fk.Policy([1, 2]), TypeError, "argument 1"),
        (lambda: fk.Policy("x"), TypeError, "argument 1"),
        (lambda: fk.Policy(fk.freeze("*"), 3), TypeError, "argument 2"),
        (lambda: fk.Policy(strict=0), TypeError, "strict"),
        (lambda: policy.apply("not a model"), TypeError, "model"),
        (lambda: policy.plan(None), TypeError, "model"),
        (lambda: policy.applied(3), TypeError, "model"),
        (lambda: policy + 3, TypeError, "+"),
        (lambda: fk.Policy.from_config(3), fk.ConfigError, "policy"),
        (lambda: fk.Policy.from_config([3]), fk.ConfigError, "policy[0]"),
        (lambda: fk.Policy.from_config([{"freeze": "*", "norm": "x"}]), fk.ConfigError, "norm"),
        (lambda: fk.Rule.from_config({"freeze": None}), fk.ConfigError, "rule.freeze"),
        (lambda: fk.Rule.from_config({"frieze": "*"}), fk.ConfigError, "did you mean 'freeze'"),
        # inspecting
        (lambda: fk.summary(42), TypeError, "model"),
        (lambda: fk.summary(m, depth=-3), ValueError, "depth"),
        (lambda: fk.summary(m, depth="x"), ValueError, "depth"),
        (lambda: fk.summary(m, depth=True), ValueError, "depth"),
        (lambda: fk.summary(m, policy=3), TypeError, "policy"),
        (lambda: fk.summary(m, policy=[fk.freeze("*")]), TypeError, "policy"),
        (lambda: fk.state(3), TypeError, "model"),
        (lambda: fk.state_dict("m"), TypeError, "model"),
        (lambda: fk.load_state(3, fk.state_dict(m)), TypeError, "model"),
        (lambda: fk.load_state(m, 3), fk.StateError, "state"),
        (lambda: fk.load_state(m, {}), fk.StateError, "state"),
        (lambda: fk.State.from_dict([]), fk.StateError, "state"),
        (lambda: fk.audit(3), TypeError, "model"),
        (lambda: fk.audit(m, 3), TypeError, "optimizer"),
        (lambda: fk.assert_frozen(3).__enter__(), TypeError, "model"),
        (lambda: fk.assert_frozen(m, values=3).__enter__(), TypeError, "values"),
        (lambda: fk.unwrap(3), TypeError, "model"),
        (lambda: fk.FrozenBatchNorm(3), TypeError, "original"),
        (lambda: fk.FrozenBatchNorm(nn.Linear(1, 1)), TypeError, "original"),
        (lambda: fk.FrozenBatchNormAct(nn.BatchNorm2d(2)), TypeError, "original"),
        # values and targets
        (lambda: fk.detached(torch.zeros(1), clone=1), TypeError, "clone"),
        (lambda: fk.frozen_copy(3), TypeError, "module"),
        (lambda: fk.polyak_update(3, m, 0.1), TypeError, "target"),
        (lambda: fk.polyak_update(m, 3, 0.1), TypeError, "source"),
        (lambda: fk.polyak_update(m, m, 2), ValueError, "tau"),
        (lambda: fk.polyak_update(m, m, math.nan), ValueError, "tau"),
        (lambda: fk.polyak_update(m, m, "x"), ValueError, "tau"),
        (lambda: fk.polyak_update(m, _net()[:2], 0.5), fk.ModuleMismatchError, "in source"),
        (lambda: fk.hard_update(3, m), TypeError, "target"),
        (lambda: fk.hard_update(m, "x"), TypeError, "source"),
        (lambda: fk.grads(3, m), TypeError, "loss"),
        (lambda: fk.grads(torch.ones(2), m), TypeError, "loss"),
        (lambda: fk.grads(loss, 3), TypeError, "model"),
        (lambda: fk.grads(loss, m, select=3), TypeError, "select"),
        (lambda: fk.grads(loss, m, select="nomatch"), ValueError, "select"),
        (lambda: fk.grads(loss, m, retain_graph="x"), TypeError, "retain_graph"),
        (lambda: fk.grads(loss, m, create_graph=None), TypeError, "create_graph"),
        # optimizers and schedules
        (lambda: fk.param_groups(m, lr="x"), ValueError, "lr"),
        (lambda: fk.param_groups(m, lr=-1), ValueError, "lr"),
        (lambda: fk.param_groups(m, lr=math.nan), ValueError, "lr"),
        (lambda: fk.param_groups(m, lr=math.inf), ValueError, "lr"),
        (lambda: fk.param_groups(m), TypeError, "lr"),
        (lambda: fk.param_groups("m", 1.0), TypeError, "model"),
        (lambda: fk.param_groups(m, 1.0, weight_decay=-1), ValueError, "weight_decay"),
        (lambda: fk.param_groups(m, 1.0, weight_decay=math.nan), ValueError, "weight_decay"),
        (lambda: fk.param_groups(m, 1.0, rules=3), TypeError, "rules"),
        (lambda: fk.param_groups(m, 1.0, rules=[3]), TypeError, "rules[0]"),
        (lambda: fk.param_groups(m, 1.0, rules=[(3, {})]), TypeError, "rules[0]"),
        (lambda: fk.param_groups(m, 1.0, rules=[("*", {"lr": "x"})]), ValueError, "rules[0].lr"),
        (lambda: fk.param_groups(m, 1.0, rules=[("*", {"lr_mul": 2})]), ValueError, "rules[0]"),
        (lambda: fk.param_groups(m, 1.0, layer_decay="x"), ValueError, "layer_decay"),
        (lambda: fk.param_groups(m, 1.0, layer_decay=0), ValueError, "layer_decay"),
        (lambda: fk.param_groups(m, 1.0, no_decay=3), TypeError, "no_decay"),
        (lambda: fk.sync_optimizer(3, m), TypeError, "optimizer"),
        (lambda: fk.sync_optimizer(opt, 3), TypeError, "model"),
        (lambda: fk.sync_optimizer(opt, m, lr_mult=0), ValueError, "lr_mult"),
        (lambda: fk.sync_optimizer(opt, m, lr_mult=math.inf), ValueError, "lr_mult"),
        (lambda: fk.sync_optimizer(opt, m, drop_state="x"), TypeError, "drop_state"),
        (lambda: fk.track_optimizer(3, m), TypeError, "optimizer"),
        (lambda: fk.track_optimizer(opt, 3), TypeError, "model"),
        (lambda: fk.rebuild_ddp(m), TypeError, "wrapper"),
        (lambda: fk.out_of_sync(3), TypeError, "model"),
        (lambda: fk.Phase(-1, policy), ValueError, "at"),
        (lambda: fk.Phase("1", policy), ValueError, "at"),
        (lambda: fk.Phase(1, 3), TypeError, "policy"),
        (lambda: fk.Phase(1, [fk.freeze("*")]), TypeError, "policy"),
        (lambda: fk.Phase(1, policy, "x"), ValueError, "unit"),
        (lambda: fk.Phase(1, policy, lr_mult=0), ValueError, "lr_mult"),
        (lambda: fk.Phase(1, policy, lr_mult=math.nan), ValueError, "lr_mult"),
        (lambda: fk.Phase(1, policy, lr_mult=math.inf), ValueError, "lr_mult"),
        (lambda: fk.Schedule(3), TypeError, "argument 1"),
        (lambda: fk.Schedule(phase, policy), TypeError, "argument 2"),
        (lambda: fk.Schedule(phase).update(m), TypeError, "epoch"),
        (lambda: fk.Schedule(phase).update(3, epoch=1), TypeError, "model"),
        (lambda: fk.Schedule(phase).update(m, 3, epoch=1), TypeError, "optimizer"),
        (lambda: fk.Schedule(phase).update(m, epoch="x"), TypeError, "epoch"),
        (lambda: fk.Schedule(phase).update(m, step=[1]), TypeError, "step"),
        (lambda: fk.Schedule(phase).load_state_dict(3), fk.ConfigError, "load_state_dict"),
        (lambda: fk.Schedule.from_config(3), fk.ConfigError, "schedule"),
        (lambda: fk.gradual_unfreeze(3), ValueError, "groups"),
        (lambda: fk.gradual_unfreeze([]), ValueError, "groups"),
        (lambda: fk.gradual_unfreeze("abc"), ValueError, "groups"),
        (lambda: fk.gradual_unfreeze(["a"], start=-1), ValueError, "start"),
        (lambda: fk.gradual_unfreeze(["a"], every=0), ValueError, "every"),
        (lambda: fk.gradual_unfreeze(["a"], start="1"), ValueError, "start"),
        (lambda: fk.gradual_unfreeze([3]), TypeError, "groups[0]"),
        (lambda: fk.gradual_unfreeze(["a"], lr_mult=0), ValueError, "lr_mult"),
        (lambda: fk.gradual_unfreeze(["a"], unit="x"), ValueError, "unit"),
    ]


def test_every_public_callable_is_covered():
    """A new public function or class gets its misuse cases here too."""
    covered = {"glob", "regex", "names", "types", "norms", "first", "last", "where", "freeze", "unfreeze", "detach",
               "eval_mode", "Policy", "Rule", "summary", "state", "state_dict", "load_state", "State", "audit",
               "assert_frozen", "unwrap", "FrozenBatchNorm", "FrozenBatchNormAct", "detached", "frozen_copy",
               "polyak_update", "hard_update", "grads", "param_groups", "sync_optimizer", "Phase", "Schedule",
               "gradual_unfreeze", "track_optimizer", "rebuild_ddp", "out_of_sync"}
    # records, results and errors: built by freezekit, not called with user input
    built = {"Applied", "Change", "Event", "Finding", "Findings", "ModulePlan", "ParamPlan", "Plan", "Selection",
             "Selector", "Summary", "SyncReport"}
    errors = {n for n in fk.__all__ if isinstance(getattr(fk, n), type) and issubclass(getattr(fk, n),
                                                                                       (Warning, Exception))}
    anything = {"stop_gradient", "to_cpu", "to_numpy", "to_python"}  # any value: see the test below
    callables = {n for n in fk.__all__ if callable(getattr(fk, n))} - errors
    assert callables - built - anything == covered


def _call_text(case: tuple) -> str:
    return re.sub(r"^\(lambda: |, [\w.]+, .*$", "", inspect.getsource(case[0]).strip())


@pytest.mark.parametrize("case", range(len(_misuse())), ids=[_call_text(c) for c in _misuse()])
def test_wrong_arguments_name_themselves(case):
    call, kind, named = _misuse()[case]
    with pytest.raises(kind) as e:
        call()
    assert named in str(e.value), (kind, str(e.value))
    assert not isinstance(e.value, (AttributeError, KeyError, IndexError))


def test_values_pass_non_tensors_through():
    """Not misuse: the value helpers take any nesting and leave what is not a tensor as it is."""
    value = {"a": [1, "x", None], "b": Pair(torch.ones(1), object)}
    for helper in (fk.detached, fk.stop_gradient, fk.to_cpu, fk.to_python):
        out = helper(value)
        assert out["a"] == [1, "x", None] and out["b"].b is object
    assert fk.to_numpy("s") == "s" and fk.types("Linear").select(_net()).modules == ("0", "2")
