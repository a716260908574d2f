"""Property-based tests: random models, random policies, and the invariants that must always hold.

Models are drawn as data (:class:`ModelSpec`) and built deterministically: nested ``Sequential`` /
``ModuleList`` / ``ModuleDict`` / custom containers of Conv2d, BatchNorm2d (with and without affine
parameters or running statistics), GroupNorm, LayerNorm, Dropout and ReLU blocks that each map
``(N, C, H, W) -> (N, C, H, W)``, a head with Linear / BatchNorm1d / LayerNorm, an optional root
parameter, a module reachable under two names, and tied parameters. Policies are drawn from the real
names, types and containers of the model: every rule kind and ``norm=`` mode, every selector kind
and combinator, with ``strict=False`` (strictness is tested in test_policy.py).

The properties, each checked against plain PyTorch state read off the model by hand:

1. ``policy.plan(model)`` changes nothing, agrees with a small independent re-implementation of the
   rules (last rule wins, per decision), and predicts exactly what ``apply`` does -- flags, statuses,
   eval locks, frozen-BatchNorm swaps, boundaries, cleared gradients, and the list of changes --
   also on a model that a first policy already changed.
2. ``undo`` (two stacked handles, undone LIFO) restores flags, modes, module objects, tensors,
   instance attributes and state_dict values bit for bit; after a ``model.train()`` in between,
   the model equals one that only saw that call, down to its outputs and gradients.
3. Training with SGD (momentum, weight decay) or AdamW (weight decay) over *all* of
   ``model.parameters()`` leaves frozen parameters and the statistics of eval-locked and frozen
   BatchNorms bit-identical.
4. ``fk.summary`` totals add up (tied parameters once), agree with the model after apply, and a
   ``policy=`` preview equals the summary after applying.
5. ``Policy.from_config(policy.to_config())`` (through YAML) round-trips and plans the same.

Example counts are kept small so the file runs in well under a minute on two cores, with a fixed
derandomized seed so CI is deterministic. For a long, randomized run set
``FREEZEKIT_HYPOTHESIS_EXAMPLES`` to the number of examples per test, e.g.
``FREEZEKIT_HYPOTHESIS_EXAMPLES=2000 python -m pytest tests/test_properties.py``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import freezekit as fk
from freezekit import boundary as _boundary
from freezekit import lock as _lock
from freezekit import select as _select
from freezekit import select_structure as _structure

pytestmark = pytest.mark.filterwarnings("ignore::freezekit.DeadRuleWarning")

_LONG = os.environ.get("FREEZEKIT_HYPOTHESIS_EXAMPLES")


def examples(n: int) -> settings:
    """``n`` derandomized examples by default; ``FREEZEKIT_HYPOTHESIS_EXAMPLES`` random ones if set."""
    return settings(max_examples=int(_LONG) if _LONG else n, derandomize=not _LONG, deadline=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


C, H, W, N, K = 4, 4, 4, 4, 3  # channels, height, width, batch, classes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds waits (100x slower on a busy two-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ models


class Stack(nn.Module):
    """Blocks in a ModuleList, run in order."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Branches(nn.Module):
    """Blocks in a ModuleDict, run side by side and summed."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.paths = nn.ModuleDict({key: b for key, b in zip("abc", blocks)})

    def forward(self, x):
        return sum(path(x) for path in self.paths.values())


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Net(nn.Module):
    """Stages in order (one may be an earlier stage again), a global pool and a head."""

    def __init__(self, stages: list[tuple[str, nn.Module]], head: nn.Module, scale: bool):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(C, 1, 1)) if scale else None
        self.order = [name for name, _ in stages]
        for name, module in stages:
            self.add_module(name, module)
        self.head = head

    def forward(self, x):
        if self.scale is not None:
            x = x * self.scale
        for name in self.order:
            x = self._modules[name](x)
        return self.head(x.mean((2, 3)))


@dataclass(frozen=True)
class ModelSpec:
    """A model as data, so that a failing example prints readably and builds again identically."""

    stages: tuple[tuple[str, Any], ...]  # (name, block) or (name, ("again", earlier stage index))
    head: tuple[str, ...]  # layers before the final Linear
    scale: bool  # a parameter on the root module itself
    ties: tuple[tuple[int, int], ...]  # (i, j): parameter j becomes parameter i where the shapes agree
    frozen: tuple[int, ...]  # parameters frozen by hand before any policy
    evals: tuple[int, ...]  # modules put in eval mode by hand before any policy


def block(spec: tuple) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        return nn.Conv2d(C, C, spec[1], padding=spec[1] // 2, bias=spec[2])
    if kind == "bn":
        return nn.BatchNorm2d(C, affine=spec[1], track_running_stats=spec[2])
    if kind == "gn":
        return nn.GroupNorm(2, C)
    if kind == "ln":
        return nn.LayerNorm([C, H, W])
    if kind == "drop":
        return nn.Dropout(0.5)
    if kind == "relu":
        return nn.ReLU()
    if kind == "seq":
        return nn.Sequential(*map(block, spec[1]))
    if kind == "stack":
        return Stack(list(map(block, spec[1])))
    if kind == "branches":
        return Branches(list(map(block, spec[1])))
    if kind == "residual":
        return Residual(block(spec[1]))
    raise AssertionError(spec)


HEAD_LAYERS = {"linear": lambda: nn.Linear(C, C), "bn1d": lambda: nn.BatchNorm1d(C), "ln": lambda: nn.LayerNorm(C),
               "drop": lambda: nn.Dropout(0.5), "relu": nn.ReLU}


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, H, W, generator=g), torch.randint(0, K, (N,), generator=g)


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = batch(seed)
    torch.manual_seed(seed)  # the same dropout masks in twin models
    return F.cross_entropy(model(x), y)


def build(spec: ModelSpec) -> Net:
    """The model of ``spec``: seeded weights, warmed-up statistics, the hand-made frozen flags and
    eval modes of the spec, and stale gradients on everything trainable."""
    torch.manual_seed(0)
    stages: list[tuple[str, nn.Module]] = []
    for name, s in spec.stages:
        stages.append((name, stages[s[1]][1] if s[0] == "again" else block(s)))
    head = nn.Sequential(*(HEAD_LAYERS[k]() for k in spec.head), nn.Linear(C, K))
    model = Net(stages, head, spec.scale)
    for i, j in spec.ties:
        slots = [(m, k, p) for m in model.modules() for k, p in m._parameters.items() if p is not None]
        (_, _, a), (holder, key, b) = slots[i % len(slots)], slots[j % len(slots)]
        if a is not b and a.shape == b.shape:
            setattr(holder, key, a)
    with torch.no_grad():
        for seed in (100, 101):
            model(batch(seed)[0] * 2 + 1)  # running statistics away from their initial values
    params = list(model.parameters())
    for i in spec.frozen:
        params[i % len(params)].requires_grad_(False)
    loss = loss_of(model, 102)
    if loss.requires_grad:
        loss.backward()
    modules = list(model.modules())
    for i in spec.evals:
        modules[i % len(modules)].eval()
    return model


def blocks() -> st.SearchStrategy:
    leaves = st.one_of(
        st.tuples(st.just("conv"), st.sampled_from([1, 3]), st.booleans()),
        st.tuples(st.just("bn"), st.booleans(), st.booleans()),
        st.just(("bn", True, True)),
        st.sampled_from([("gn",), ("ln",), ("drop",), ("relu",)]),
    )

    def nest(children: st.SearchStrategy) -> st.SearchStrategy:
        some = st.lists(children, min_size=1, max_size=3).map(tuple)
        return st.one_of(st.tuples(st.just("seq"), some), st.tuples(st.just("stack"), some),
                         st.tuples(st.just("branches"), some), st.tuples(st.just("residual"), children))

    return st.recursive(leaves, nest, max_leaves=5)


@st.composite
def model_specs(draw) -> ModelSpec:
    n = draw(st.integers(1, 3))
    if draw(st.booleans()):
        names = [f"layer{i + 1}" for i in range(n)]  # a numbered family, as in ResNets
    else:
        names = draw(st.permutations(["stem", "blocks", "features", "neck"]))[:n]
    stages = []
    for i, name in enumerate(names):
        again = i and not any(s[0] == "again" for _, s in stages) and draw(st.integers(0, 4)) == 0
        stages.append((name, ("again", draw(st.integers(0, i - 1))) if again else draw(blocks())))
    return ModelSpec(
        stages=tuple(stages),
        head=tuple(draw(st.lists(st.sampled_from(sorted(HEAD_LAYERS)), max_size=3))),
        scale=draw(st.booleans()),
        ties=tuple(draw(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 63)), max_size=2))),
        frozen=tuple(draw(st.lists(st.integers(0, 63), max_size=3))),
        evals=tuple(draw(st.lists(st.integers(0, 63), max_size=2))),
    )


# ---------------------------------------------------------------------------------------- policies


def _is_vector(name: str, obj: Any) -> bool:
    return isinstance(obj, nn.Parameter) and obj.dim() == 1


def _is_conv(name: str, obj: Any) -> bool:
    return isinstance(obj, nn.Conv2d)


WHERE = [fk.where(_is_vector), fk.where(_is_conv)]  # name-blind: a shared object has several names


class Vocabulary:
    """What selectors can be drawn from: a model's real names, types and containers."""

    def __init__(self, model: nn.Module):
        mods = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n]
        self.names = [n for n, _ in mods] + [n for n, _ in model.named_parameters(remove_duplicate=False)]
        self.suffixes = sorted({n.rpartition(".")[2] for n in self.names})
        stems = {re.sub(r"\d+$", "", n) for n, _ in mods if "." not in n and re.search(r"\d$", n)}
        sizes = Reference(model)
        self.containers = {c: len(sizes.members(c)) for c in sorted({n for n, m in mods if m._modules} | stems)}
        self.classes = sorted({type(m) for m in model.modules()}, key=lambda c: c.__name__)


def selectors(v: Vocabulary, configurable: bool) -> st.SearchStrategy:
    name = st.sampled_from(v.names)
    leaves = [
        name.map(fk.glob),
        name.map(lambda n: fk.glob(n + "*")),
        st.sampled_from(v.suffixes).map(lambda s: fk.glob("*." + s)),
        st.just(fk.glob("*")),
        name.map(lambda n: fk.regex(re.escape(n))),
        name.map(lambda n: fk.regex(re.escape(n) + r"(\..*)?")),
        name.map(fk.names),
        st.tuples(st.sampled_from(v.classes), st.booleans()).map(lambda t: fk.types(t[0] if t[1] else t[0].__name__)),
        st.just(fk.norms()),
    ]
    # plain strings stand for globs ("re:..." for regexes) wherever a selector is expected
    leaves += [name, name.map(lambda n: "re:" + re.escape(n) + ".*")]
    if v.containers:  # n from none to more than there are
        position = st.sampled_from(sorted(v.containers.items())).flatmap(
            lambda c: st.tuples(st.sampled_from([fk.first, fk.last]), st.just(c[0]), st.integers(0, c[1] + 2)))
        leaves += [position.map(lambda t: t[0](t[1], t[2]))] * 2
    if not configurable:
        leaves.append(st.sampled_from(WHERE))

    def combine(s: st.SearchStrategy) -> st.SearchStrategy:
        left = s.map(_select.as_selector)  # a pattern string on the right is turned by the operator
        return st.one_of(st.tuples(left, s).map(lambda t: t[0] | t[1]), st.tuples(left, s).map(lambda t: t[0] & t[1]),
                         st.tuples(left, s).map(lambda t: t[0] - t[1]), left.map(lambda s: ~s))

    return st.recursive(st.one_of(leaves), combine, max_leaves=3)


def rules(v: Vocabulary, configurable: bool) -> st.SearchStrategy:
    sels = st.lists(selectors(v, configurable), min_size=1, max_size=2)
    freeze = st.tuples(sels, st.sampled_from(["eval", "frozen_bn", "train", "trainable"])).map(
        lambda t: fk.freeze(*t[0], norm=t[1]))
    return st.one_of(
        freeze, freeze,
        sels.map(lambda s: fk.unfreeze(*s)),
        sels.map(lambda s: fk.eval_mode(*s)),
        st.tuples(sels, st.sampled_from(["output", "input"]), st.booleans()).map(
            lambda t: fk.detach(*t[0], at=t[1], no_grad=t[2])),
    )


def policies(v: Vocabulary, configurable: bool = False) -> st.SearchStrategy:
    return st.lists(rules(v, configurable), min_size=1, max_size=5).map(lambda r: fk.Policy(*r, strict=False))


@dataclass(frozen=True)
class Case:
    spec: ModelSpec
    policy: fk.Policy
    before: fk.Policy | None = None  # applied first, when the case stacks two policies


@st.composite
def cases(draw, configurable: bool = False, stacked: bool = False) -> Case:
    spec = draw(model_specs())
    v = Vocabulary(build(spec))
    before = draw(policies(v, configurable)) if stacked else None
    return Case(spec, draw(policies(v, configurable)), before)


# --------------------------------------------------------------------- the model, read off by hand


def boundary_sides(module: nn.Module) -> tuple[str, ...]:
    return tuple(b.at for b in _boundary.boundaries(module))


def observe(model: nn.Module) -> dict[str, Any]:
    """Everything a policy may change, read with plain PyTorch, by first name."""
    mods = list(model.named_modules(remove_duplicate=False))
    cut = [n for n, m in mods if "output" in boundary_sides(m)]
    behind: dict[int, bool] = {}  # parameter -> every name of it lies under an output boundary
    for n, m in mods:
        for k, p in m._parameters.items():
            if p is not None:
                name = f"{n}.{k}" if n else k
                behind[id(p)] = behind.get(id(p), True) and any(c == "" or name.startswith(c + ".") for c in cut)
    params = dict(model.named_parameters())
    return {
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "status": {n: "frozen" if not p.requires_grad else "detached" if behind[id(p)] else "trainable"
                   for n, p in params.items()},
        "grad": {n: p.grad for n, p in params.items()},
        "locked": {n: _lock.is_locked(m) for n, m in model.named_modules()},
        "frozen_bn": {n: isinstance(m, fk.FrozenBatchNorm) for n, m in model.named_modules()},
        "type": {n: type(m).__name__ for n, m in model.named_modules()},
        "boundaries": {n: boundary_sides(m) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def exact_state(model: nn.Module) -> dict[str, Any]:
    """Objects by identity and flags: what undo must give back, bit for bit."""
    return {
        "modules": [(n, m) for n, m in model.named_modules(remove_duplicate=False)],
        "attributes": [(n, {k: v for k, v in m.__dict__.items() if k != "training"}, dict(m._parameters),
                        dict(m._buffers), dict(m._modules))
                       for n, m in model.named_modules(remove_duplicate=False)],
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        "training": [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)],
    }


def assert_same_objects(now: dict[str, Any], then: dict[str, Any]) -> None:
    assert now["flags"] == then["flags"]
    assert now["training"] == then["training"]
    assert [n for n, _ in now["modules"]] == [n for n, _ in then["modules"]]
    for (name, a), (_, b) in zip(now["modules"], then["modules"]):
        assert a is b, f"{name}: {type(a).__name__} is not the original {type(b).__name__}"
    for now_parts, then_parts in zip(now["attributes"], then["attributes"]):
        name = now_parts[0]
        for a, b in zip(now_parts[1:], then_parts[1:]):
            assert a.keys() == b.keys(), f"{name}: {sorted(a.keys() ^ b.keys())}"
            assert all(a[k] is b[k] for k in a), f"{name}: {[k for k in a if a[k] is not b[k]]}"


def values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


def assert_equal_values(now: dict[str, torch.Tensor], then: dict[str, torch.Tensor]) -> None:
    assert now.keys() == then.keys()
    changed = [n for n in now if not torch.equal(now[n], then[n])]
    assert not changed, f"values changed: {changed}"


# ----------------------------------------------------------------------- an independent reference


NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, fk.FrozenBatchNorm)
SWAPPABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _under(prefix: str, name: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


class Reference:
    """The rules of SPEC.md section 2 written out plainly over every name of a model (a shared
    module or tied parameter under each of its names), deciding per object."""

    def __init__(self, model: nn.Module):
        self.root = model
        self.mods = list(model.named_modules(remove_duplicate=False))
        self.pars = [(f"{n}.{k}" if n else k, p) for n, m in self.mods for k, p in m._parameters.items()
                     if p is not None]
        self.modules = {id(m): m for _, m in self.mods}
        self.params = {id(p): p for _, p in self.pars}

    def expand(self, mod_names: set[str], par_names: set[str] = frozenset()) -> tuple[set[int], set[int]]:
        mods = {id(m) for n, m in self.mods if any(_under(h, n) for h in mod_names)}
        pars = {id(p) for n, p in self.pars if n in par_names or any(_under(h, n) for h in mod_names)}
        return mods, pars

    def by_name(self, test) -> tuple[set[int], set[int]]:
        return self.expand({n for n, _ in self.mods if test(n)}, {n for n, _ in self.pars if test(n)})

    def by_object(self, test) -> tuple[set[int], set[int]]:
        return self.expand({n for n, m in self.mods if test(m)})

    def members(self, container: str) -> list[str]:
        names = [n for n, _ in self.mods]
        children = [n for n in names if n and n.rpartition(".")[0] == container]
        if container in names and children:
            return children
        parent, _, stem = container.rpartition(".")
        if parent not in names:
            return []
        numbered = [(int(n.rpartition(".")[2][len(stem):]), n) for n in names
                    if n and n.rpartition(".")[0] == parent and re.fullmatch(re.escape(stem) + r"\d+",
                                                                              n.rpartition(".")[2])]
        return [n for _, n in sorted(numbered)]

    def resolve(self, sel: Any) -> tuple[set[int], set[int]]:
        sel = _select.as_selector(sel)
        if isinstance(sel, _select.Glob):
            return self.by_name(lambda n: any(fnmatchcase(n, p) for p in sel.patterns))
        if isinstance(sel, _select.Regex):
            return self.by_name(lambda n: any(re.fullmatch(p, n) for p in sel.patterns))
        if isinstance(sel, _select.Names):
            return self.by_name(lambda n: n in sel.names)
        if isinstance(sel, _structure.Types):
            return self.by_object(lambda m: any(isinstance(m, c) if isinstance(c, type)
                                                else any(k.__name__ == c for k in type(m).__mro__)
                                                for c in sel.classes))
        if isinstance(sel, _structure.Norms):
            return self.by_object(lambda m: isinstance(m, NORMS))
        if isinstance(sel, _structure.Position):
            members = self.members(sel.container)
            chosen = members[:sel.n] if sel.which == "first" else members[len(members) - min(sel.n, len(members)):]
            return self.expand(set(chosen))
        if isinstance(sel, _structure.Where):
            mods = {id(m) for m in self.modules.values() if sel.fn("", m)}
            pars = {id(p) for p in self.params.values() if sel.fn("", p)}
            return self.expand({n for n, m in self.mods if id(m) in mods}, {n for n, p in self.pars if id(p) in pars})
        if isinstance(sel, (_select.Union, _select.Intersection)):
            parts = [self.resolve(p) for p in sel.parts]
            join = set.union if isinstance(sel, _select.Union) else set.intersection
            return join(*(m for m, _ in parts)), join(*(p for _, p in parts))
        if isinstance(sel, _select.Difference):
            (lm, lp), (rm, rp) = self.resolve(sel.left), self.resolve(sel.right)
            return lm - rm, lp - rp
        if isinstance(sel, _select.Complement):
            m, p = self.resolve(sel.inner)
            return set(self.modules) - m, set(self.params) - p
        raise AssertionError(sel)

    def complete_roots(self, mods: set[int]) -> list[int]:
        """The outermost module objects whose every name's whole subtree is selected."""
        complete = {n: all(id(m2) in mods for n2, m2 in self.mods if _under(n, n2)) for n, _ in self.mods}
        roots = [id(m) for n, m in self.mods if complete[n] and (n == "" or not complete[n.rpartition(".")[0]])]
        return list(dict.fromkeys(roots))

    def decide(self, policy: fk.Policy) -> dict[str, Any]:
        """The state after ``policy`` on a model that no policy changed before, by first name."""
        requires_grad = {i: p.requires_grad for i, p in self.params.items()}
        locked = dict.fromkeys(self.modules, False)
        swapped = dict.fromkeys(self.modules, False)
        cuts: dict[int, list[tuple[str, bool]]] = {i: [] for i in self.modules}
        norm_params = {id(p) for _, m in self.mods if isinstance(m, NORMS) for p in m._parameters.values()
                       if p is not None}
        for rule in policy.rules:
            mods, pars = set(), set()
            for sel in rule.selectors:
                m, p = self.resolve(sel)
                mods |= m
                pars |= p
            stats = {i for i in mods if isinstance(self.modules[i], NORMS) and
                     (getattr(self.modules[i], "running_mean", None) is not None)}
            swap = {i for i in stats if type(self.modules[i]) in SWAPPABLE and self.modules[i] is not self.root}
            if rule.action == "freeze":
                requires_grad.update({i: rule.norm == "trainable" and i in norm_params for i in pars})
                if rule.norm == "eval":
                    locked.update(dict.fromkeys(stats, True))
                    swapped.update(dict.fromkeys(swap, False))
                elif rule.norm == "frozen_bn":
                    swapped.update(dict.fromkeys(swap, True))
                    locked.update(dict.fromkeys(stats, True))
                    locked.update(dict.fromkeys(swap, False))
                else:
                    locked.update(dict.fromkeys(stats, False))
                    swapped.update(dict.fromkeys(swap, False))
            elif rule.action == "unfreeze":
                requires_grad.update(dict.fromkeys(pars, True))
                locked.update(dict.fromkeys(mods, False))
                swapped.update(dict.fromkeys(mods & {i for i, m in self.modules.items() if type(m) in SWAPPABLE
                                                     and m is not self.root}, False))
            elif rule.action == "eval_mode":
                locked.update(dict.fromkeys(mods, True))
            else:
                for i in self.complete_roots(mods):
                    if (rule.at, rule.no_grad) not in cuts[i]:
                        cuts[i].append((rule.at, rule.no_grad))
        cut = [n for n, m in self.mods if any(at == "output" for at, _ in cuts[id(m)])]
        behind = {i: all(any(_under(c, n) for c in cut) for n, p in self.pars if id(p) == i) for i in self.params}
        params = dict(self.root.named_parameters())
        modules = dict(self.root.named_modules())
        return {
            "requires_grad": {n: requires_grad[id(p)] for n, p in params.items()},
            "status": {n: "frozen" if not requires_grad[id(p)] else "detached" if behind[id(p)] else "trainable"
                       for n, p in params.items()},
            "locked": {n: locked[id(m)] for n, m in modules.items()},
            "frozen_bn": {n: swapped[id(m)] for n, m in modules.items()},
            "boundaries": {n: tuple(at for at, _ in reversed(cuts[id(m)])) for n, m in modules.items()},
        }


def planned(plan: fk.Plan) -> dict[str, Any]:
    return {
        "requires_grad": {n: p.requires_grad for n, p in plan.parameters.items()},
        "status": {n: p.status for n, p in plan.parameters.items()},
        "locked": {n: m.eval_locked for n, m in plan.modules.items()},
        "frozen_bn": {n: m.frozen_bn for n, m in plan.modules.items()},
        "type": {n: m.type for n, m in plan.modules.items()},
        "boundaries": {n: m.boundaries for n, m in plan.modules.items()},
    }


def changes_between(before: dict[str, Any], after: dict[str, Any]) -> Counter:
    """What changed, as :class:`fk.Change` tuples, except eval-lock changes where a module was swapped:
    the swap is the change there; a lock stays with the module swapped out, and the plan's eval_lock
    change is relative to the module swapped in (its final state is checked in ``plan.modules``)."""
    out: Counter = Counter()
    for kind, key in (("requires_grad", "requires_grad"), ("eval_lock", "locked"), ("frozen_bn", "frozen_bn")):
        out.update((kind, n, before[key][n], after[key][n]) for n in after[key] if before[key][n] != after[key][n])
    for n, sides in after["boundaries"].items():
        added = sides[: len(sides) - len(before["boundaries"][n])]
        out.update(("boundary", n, None, at) for at in added)
    return swap_free(out)


def swap_free(changes: Counter) -> Counter:
    swapped = {name for kind, name, *_ in changes if kind == "frozen_bn"}
    return Counter({c: k for c, k in changes.items() if not (c[0] == "eval_lock" and c[1] in swapped)})


def apply(policy: fk.Policy, model: nn.Module) -> tuple[fk.Plan, fk.Applied]:
    """Plan, check that planning changed nothing, apply, and check that the plan came true."""
    before, exact, weights = observe(model), exact_state(model), values(model)
    plan = policy.plan(model)
    assert_same_objects(exact_state(model), exact)
    assert_equal_values(values(model), weights)
    applied = policy.apply(model)
    after = observe(model)
    predicted = planned(plan)
    for key in predicted:
        assert predicted[key] == after[key], key
    assert swap_free(Counter((c.kind, c.name, c.before, c.after) for c in plan.changes)) == \
        changes_between(before, after)
    state = fk.state(model)  # freezekit's own reading agrees with the one by hand
    assert state.parameters == after["status"]
    assert set(state.eval_locked) == {n for n, v in after["locked"].items() if v}
    assert set(state.frozen_bn) == {n for n, v in after["frozen_bn"].items() if v}
    for n, p in plan.parameters.items():  # frozen by a rule: no stale gradient; anything else: untouched
        if p.rule is not None and not p.requires_grad:
            assert after["grad"][n] is None, n
        else:
            assert after["grad"][n] is before["grad"][n], n
    return plan, applied


# -------------------------------------------------------------------------------------- properties


@examples(100)
@given(cases())
def test_plan_follows_the_rules_and_predicts_apply(case):
    model = build(case.spec)
    reference = Reference(model).decide(case.policy)
    plan, _ = apply(case.policy, model)
    got = planned(plan)
    for key, value in reference.items():
        assert got[key] == value, key
    model.train()  # locked modules stay in eval mode, every other module follows
    assert {n: m.training for n, m in model.named_modules()} == {n: not m.eval_locked for n, m in plan.modules.items()}
    model.eval()
    assert not any(m.training for m in model.modules())


@examples(60)
@given(cases(stacked=True), st.sampled_from([None, "train", "eval"]))
def test_undo_restores_everything(case, call):
    model, twin = build(case.spec), build(case.spec)
    exact, weights = exact_state(model), values(model)
    _, first = apply(case.before, model)
    plan, second = apply(case.policy, model)  # planned on a model the first policy changed
    if call is not None:
        getattr(model, call)()
        getattr(twin, call)()
        modes = {n: m.training for n, m in model.named_modules()}
        assert modes == {n: call == "train" and not m.eval_locked for n, m in plan.modules.items()}
    second.undo()
    first.undo()
    assert_equal_values(values(model), weights)
    if call is None:
        assert_same_objects(exact_state(model), exact)
    else:  # a released module takes the mode the model last asked for
        assert [(n, m.training) for n, m in model.named_modules()] == [(n, m.training) for n, m in twin.named_modules()]
        exact["training"] = exact_state(model)["training"]
        assert_same_objects(exact_state(model), exact)
    cleared = {n for h in (first, second) for n, p in h.plan.parameters.items() if p.rule and not p.requires_grad}
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert same_grad(p, None if n in cleared else q), n
    # the restored model computes and backpropagates exactly like one that never saw a policy
    losses = []
    for m in (model, twin):
        m.train()
        m.zero_grad(set_to_none=True)
        losses.append(loss_of(m, 7))
        if losses[-1].requires_grad:
            losses[-1].backward()
    assert torch.equal(*losses)
    assert torch.equal(loss_of(model.eval(), 8), loss_of(twin.eval(), 8))
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert same_grad(p, q), n


def same_grad(p: torch.Tensor, q: torch.Tensor | None) -> bool:
    """``p.grad`` equals ``q.grad`` (both None, or equal values); ``q`` None: ``p.grad`` is None."""
    if q is None or q.grad is None:
        return p.grad is None
    return p.grad is not None and torch.equal(p.grad, q.grad)


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    for i in range(steps):
        model.train()
        optimizer.zero_grad(set_to_none=False)  # zeroed, not dropped: weight decay and momentum still act
        loss = loss_of(model, seed + i)
        if loss.requires_grad:
            loss.backward()
        optimizer.step()


@examples(50)
@given(cases(), st.sampled_from(["sgd", "adamw"]))
def test_training_everything_moves_nothing_frozen(case, kind):
    model = build(case.spec)
    hand_frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in hand_frozen:  # every parameter gets optimizer state: momentum, Adam moments...
        p.requires_grad_(True)
    optimizer = make_optimizer(kind, model.parameters())  # ALL parameters, the classic trap
    train_steps(model, optimizer, 2, seed=10)
    loss_of(model, 12).backward()  # ...and a stale gradient, as when a freeze comes mid-training
    for p in hand_frozen:
        p.requires_grad_(False)
        p.grad = None
    plan, _ = apply(case.policy, model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen) == {n for n, p in plan.parameters.items() if p.status == "frozen"}
    fixed = {(n, b): t.clone() for n, m in model.named_modules()
             if _lock.is_locked(m) or isinstance(m, fk.FrozenBatchNorm) for b, t in m._buffers.items() if t is not None}
    train_steps(model, optimizer, 3, seed=20)
    now = dict(model.named_parameters())
    assert [n for n, t in frozen.items() if not torch.equal(now[n], t)] == []
    buffers = {(n, b): t for n, m in model.named_modules() for b, t in m._buffers.items()}
    assert [k for k, t in fixed.items() if not torch.equal(buffers[k], t)] == []


@examples(60)
@given(cases())
def test_summary_totals_add_up(case):
    model = build(case.spec)
    preview = fk.summary(model, policy=case.policy)
    apply(case.policy, model)
    s = fk.summary(model)
    status = observe(model)["status"]
    numel = {n: p.numel() for n, p in model.named_parameters()}  # each tensor once, tied or not
    by = Counter()
    for n, st_ in status.items():
        by[st_] += numel[n]
    t = s.totals
    assert t["total"] == sum(p.numel() for p in model.parameters()) == sum(numel.values())
    assert (t["trainable"], t["frozen"], t["detached"]) == (by["trainable"], by["frozen"], by["detached"])
    assert t["trainable"] + t["frozen"] + t["detached"] == t["total"]
    assert t["trainable_pct"] == round(100.0 * t["trainable"] / t["total"], 2)
    assert t["saved_bytes"] == 3 * 4 * (t["frozen"] + t["detached"])  # float32 gradient and two Adam moments
    top = [r for r in s.rows if r.depth == 1 and not r.tied]  # a tied row shows tensors counted where first named
    assert sum(r.parameters for r in top) == t["total"] and sum(r.trainable for r in top) == t["trainable"]
    assert preview.totals == t
    strip = [(r.name, r.parameters, r.trainable, r.status, r.mode) for r in s.rows]
    assert [(r.name, r.parameters, r.trainable, r.status, r.mode) for r in preview.rows] == strip


@examples(60)
@given(cases(configurable=True))
def test_config_round_trips(case):
    config = case.policy.to_config()
    again = fk.Policy.from_config(yaml.safe_load(yaml.safe_dump(config)))
    assert again.to_config() == config
    assert fk.Policy.from_config(again.to_config()) == again
    model = build(case.spec)
    plans = [p.plan(model) for p in (case.policy, again)]
    views = [planned(p) for p in plans]
    assert views[0] == views[1]
    by_rule = [[(n, p.rule and p.rule.action, p.changed) for n, p in plan.parameters.items()] for plan in plans]
    assert by_rule[0] == by_rule[1]
    assert [(c.kind, c.name, c.before, c.after) for c in plans[0].changes] == \
        [(c.kind, c.name, c.before, c.after) for c in plans[1].changes]


# ------------------------------------------------------------------- regressions found by the above


def test_last_takes_all_children_when_asked_for_more():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)))
    assert fk.last("0", 5).select(model).modules == fk.first("0", 5).select(model).modules == ("0.0", "0.1", "0.2")


def test_a_plan_read_after_apply_still_describes_the_apply():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    policy = fk.Policy(fk.detach("0"), fk.eval_mode("1"))
    plan = policy.plan(model)
    applied = policy.apply(model)
    assert applied.plan.modules["0"].boundaries == plan.modules["0"].boundaries == ("output",)  # not twice
    assert [c.kind for c in plan.changes] == [c.kind for c in applied.changes] == ["eval_lock", "boundary"]


def test_frozen_bn_swaps_a_batchnorm_under_a_shared_parent():
    body = nn.Sequential(nn.BatchNorm1d(2))
    model = nn.Sequential(body, body)
    applied = fk.Policy(fk.freeze("0", norm="frozen_bn")).apply(model)
    assert isinstance(model[0][0], fk.FrozenBatchNorm) and model[1][0] is model[0][0]
    applied.undo()
    assert type(model[0][0]) is nn.BatchNorm1d and model[1][0] is model[0][0]


def test_summary_preview_shows_the_swapped_in_types():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    policy = fk.Policy(fk.freeze("0", norm="frozen_bn"), fk.freeze("1", norm="train"))
    preview = fk.summary(model, policy=policy)
    policy.apply(model)
    assert [r.type for r in preview.rows] == [r.type for r in fk.summary(model).rows] == \
        ["FrozenBatchNorm", "BatchNorm1d"]


def test_frozen_bn_swap_keeps_a_boundary_on_the_batchnorm():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    first = fk.Policy(fk.detach("1", no_grad=False)).apply(model)
    second = fk.Policy(fk.freeze("1", norm="frozen_bn")).apply(model)
    model(torch.randn(4, 2)).sum().backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None  # still cut at the BatchNorm
    second.undo()
    first.undo()
    assert "forward" not in model[1].__dict__


@pytest.mark.parametrize("before,after", [
    (fk.freeze("1", norm="frozen_bn"), fk.freeze("1", norm="eval")),  # swapped, then swapped back and locked
    (fk.eval_mode("1"), fk.freeze("1", norm="frozen_bn")),  # locked, then swapped
])
def test_undo_across_swaps_gives_the_mode_last_asked(before, after):
    for call in (None, "train", "eval"):
        model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        handles = [fk.Policy(before).apply(model), fk.Policy(after).apply(model)]
        if call:
            getattr(model, call)()
        for handle in reversed(handles):
            handle.undo()
        assert model[1].training == (call != "eval") and not _lock.is_locked(model[1]), call
