"""A model's modules and parameters by qualified name, seen through wrappers.

:class:`ModelIndex` walks a model once and keeps what selecting needs as flat arrays: the name of
every module and parameter *occurrence* (a module or tensor reachable under two names is listed
under both), which unique object each occurrence is, and where each module's subtree ends. A
selected module then stands for a contiguous range of occurrences, so expanding thousands of
selected modules into their submodules and parameters is a handful of numpy operations.

Wrappers are transparent: the names inside ``DistributedDataParallel`` / ``DataParallel``
(``module.``), ``torch.compile`` (``_orig_mod.``), FSDP1 (``_fsdp_wrapped_module.``) and
activation-checkpoint wrappers are the names of the wrapped model, wherever the wrapper sits.
FSDP2 (``fully_shard``) keeps the model's own names and needs nothing.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property

import numpy as np
import torch.nn as nn

from .names import NameList, fixed_start
from .norm import has_running_stats

__all__ = ["ModelIndex", "gc_paused", "unwrap"]

# (defining module, qualified name) of wrapper classes -> attribute that holds the wrapped module.
# Matched by name so that nothing (torch._dynamo, torch.distributed) is imported to recognise them.
_WRAPPERS = {
    ("torch.nn.parallel.distributed", "DistributedDataParallel"): "module",
    ("torch.nn.parallel.data_parallel", "DataParallel"): "module",
    ("torch._dynamo.eval_frame", "OptimizedModule"): "_orig_mod",
    ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel"): "_fsdp_wrapped_module",
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper"):
        "_checkpoint_wrapped_module",
}
_wrapper_attr_cache: dict[type, str | None] = {}


def _wrapper_attr(cls: type) -> str | None:
    try:
        return _wrapper_attr_cache[cls]
    except KeyError:
        attr = next((a for c in cls.__mro__ if (a := _WRAPPERS.get((c.__module__, c.__qualname__)))), None)
        _wrapper_attr_cache[cls] = attr
        return attr


def _inside_wrappers(module: nn.Module) -> nn.Module:
    while (attr := _wrapper_attr(type(module))) is not None:
        module = module._modules[attr]
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any DDP / DataParallel / ``torch.compile`` / FSDP1 wrappers.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap(torch.nn.DataParallel(net)) is net
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return _inside_wrappers(model)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a model is walked or changed.

    Walking 100k modules allocates a few hundred thousand short-lived objects; each generational
    collection they trigger also scans the model's own objects, which costs more than the walk.
    Whatever became garbage meanwhile is collected as usual once it resumes.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class ModelIndex:
    """The modules and parameters of ``model`` (unwrapped), as flat arrays in model order.

    Occurrence arrays list each module (``mod_*``) or parameter (``par_*``) once per name under
    which it is reachable, in ``named_modules()`` pre-order. Unique arrays (``modules``,
    ``params``) list each object once, under its first name, in ``named_modules()`` /
    ``named_parameters()`` order.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.root = root = unwrap(model)
        with gc_paused():
            self._walk(root)

    def _walk(self, root: nn.Module) -> None:
        # The walk is the hot loop of every apply: locals only, one iterator per container, no
        # per-module tuple (they would wake the garbage collector). Order is named_modules()'s.
        occ: list[nn.Module] = [root]
        mod_names: list[str] = [""]
        mod_parent: list[int] = [-1]
        mod_pstart: list[int] = [0]
        mod_cls: list[type] = [type(root)]
        mod_training: list[bool] = [root.training]
        with_train: list[int] = [0] if "train" in root.__dict__ else []  # may hold an eval lock
        with_forward: list[int] = [0] if "forward" in root.__dict__ else []  # may hold a boundary
        with_stats: list[int] = [0] if has_running_stats(root) else []
        par_occ: list[nn.Parameter] = [p for p in root._parameters.values() if p is not None]
        par_names: list[str] = [k for k, p in root._parameters.items() if p is not None]
        par_rg: list[bool] = [p.requires_grad for p in par_occ]
        with_grad: list[int] = [j for j, p in enumerate(par_occ) if p.grad is not None]
        add_mod, add_name, add_parent, add_pstart = occ.append, mod_names.append, mod_parent.append, mod_pstart.append
        add_cls, add_par, add_pname, add_rg = mod_cls.append, par_occ.append, par_names.append, par_rg.append
        wrapper_of = _wrapper_attr_cache.get
        n_par, i = len(par_occ), 1
        stack = [(iter(root._modules.items()), "", 0)]
        while stack:
            children, prefix, parent = stack[-1]
            for key, module in children:
                if module is None:
                    continue
                cls = module.__class__
                if wrapper_of(cls, 0) is not None:  # an unseen class (0), or a wrapper
                    module = _inside_wrappers(module)
                    cls = module.__class__
                # Read what planning needs now, while the module is in cache: a later pass over
                # 100k modules scattered in memory costs more than the whole walk.
                state = module.__dict__
                name = prefix + key
                add_mod(module)
                add_name(name)
                add_parent(parent)
                add_pstart(n_par)
                add_cls(cls)
                mod_training.append(state.get("training", True))
                if "train" in state:
                    with_train.append(i)
                if "forward" in state:
                    with_forward.append(i)
                buffers = state.get("_buffers")
                if buffers and (buffers.get("running_mean") is not None or buffers.get("running_var") is not None):
                    with_stats.append(i)  # what norm="eval" locks, see norm.has_running_stats
                own = state.get("_parameters")
                if own is None:
                    own = module._parameters
                if own:
                    for pname, p in own.items():
                        if p is not None:
                            add_par(p)
                            add_pname(f"{name}.{pname}")
                            add_rg(p.requires_grad)
                            if p.grad is not None:
                                with_grad.append(n_par)
                            n_par += 1
                i += 1
                sub = state.get("_modules")
                if sub is None:
                    sub = module._modules
                if sub:  # descend; this iterator resumes when that subtree is done
                    stack.append((iter(sub.items()), name + ".", i - 1))
                    break
            else:
                stack.pop()
        mod_pstart.append(n_par)

        self.mod_names, self.par_names = mod_names, par_names
        self.n_mod_occ = len(mod_names)
        self.names = NameList(mod_names + par_names)  # every name, modules first: one scan per pattern
        self.mod_parent = np.asarray(mod_parent, dtype=np.int64)
        self.mod_pstart = np.asarray(mod_pstart, dtype=np.int64)
        self.mod_end = np.arange(len(occ), dtype=np.int64) + _subtree_sizes(self.mod_parent)
        self.mod_uid, self.modules, self.module_names = _dedup(occ, mod_names)
        self.par_uid, self.params, self.param_names = _dedup(par_occ, par_names)
        # Per unique object, as read during the walk (shared objects: the same object each time).
        first_mod = np.zeros(self.n_modules, dtype=np.int64)
        first_mod[self.mod_uid[::-1]] = np.arange(len(occ) - 1, -1, -1)
        self._module_classes = mod_cls if len(occ) == self.n_modules else [mod_cls[i] for i in first_mod.tolist()]
        self.training = np.array(mod_training, dtype=bool)[first_mod]  # each module's mode, as walked
        first_par = np.zeros(self.n_params, dtype=np.int64)
        first_par[self.par_uid[::-1]] = np.arange(len(par_occ) - 1, -1, -1)
        self.requires_grad = np.array(par_rg, dtype=bool)[first_par]  # before any change
        self.has_grad = np.zeros(self.n_params, dtype=bool)
        self.has_grad[self.par_uid[with_grad]] = True
        self.maybe_locked = np.zeros(self.n_modules, dtype=bool)
        self.maybe_locked[self.mod_uid[with_train]] = True
        self.maybe_cut = np.zeros(self.n_modules, dtype=bool)
        self.maybe_cut[self.mod_uid[with_forward]] = True
        self.running_stats = np.zeros(self.n_modules, dtype=bool)
        self.running_stats[self.mod_uid[with_stats]] = True

    @property
    def n_modules(self) -> int:
        return len(self.modules)

    @property
    def n_params(self) -> int:
        return len(self.params)

    @property
    def model_name(self) -> str:
        return type(self.root).__name__

    def glob(self, pattern: str) -> np.ndarray:
        """Mask over :attr:`names` of the names that fully match a shell-style pattern."""
        head = fixed_start(pattern)
        if head and pattern == head + "*" and self.names.blob is not None:
            return self._starting_with(head)
        return self.names.glob(pattern)

    def _starting_with(self, head: str) -> np.ndarray:
        """Names that start with ``head`` (the glob ``head*``). A module that does brings its whole
        subtree, which is marked at once and jumped over in the blob instead of visited name by name."""
        names, blob, lines = self.names.names, self.names.blob, self.names.newlines
        needle, n_mod = "\n" + head, self.n_mod_occ
        hits = np.zeros(len(names), dtype=bool)
        params_from = int(lines[n_mod])  # the newline before the first parameter name
        covered: list[tuple[int, int]] = []  # parameter ranges marked with their modules, in order
        at = blob.find(needle)
        while 0 <= at < params_from:
            k = int(np.searchsorted(lines, at))
            end = int(self.mod_end[k])
            hits[k:end] = True
            first, stop = int(self.mod_pstart[k]), int(self.mod_pstart[end])
            if stop > first:
                hits[n_mod + first: n_mod + stop] = True
                covered.append((first, stop))
            at = blob.find(needle, int(lines[end]))
        at = blob.find(needle, params_from)
        ranges = iter(covered)
        current = next(ranges, None)
        while at >= 0:  # parameters whose module did not match, e.g. "fc.w*"
            j = int(np.searchsorted(lines, at)) - n_mod
            while current is not None and current[1] <= j:
                current = next(ranges, None)
            if current is not None and current[0] <= j:
                at = blob.find(needle, int(lines[n_mod + current[1]]))
                continue
            hits[n_mod + j] = True
            at = blob.find(needle, at + 1)
        return hits

    def expand(self, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Resolve matched names (a mask over :attr:`names`) to unique (module mask, parameter mask).

        A matched module occurrence selects itself, every module below it and every parameter
        below it; a matched parameter occurrence selects that parameter.
        """
        mod_hits, par_hits = hits[: self.n_mod_occ], hits[self.n_mod_occ:]
        if mod_hits[0]:  # the root: everything
            return np.ones(self.n_modules, dtype=bool), np.ones(self.n_params, dtype=bool)
        starts = mod_hits.nonzero()[0]
        ends = self.mod_end[starts]
        covered = _cover(starts, ends, len(mod_hits))
        par_covered = _cover(self.mod_pstart[starts], self.mod_pstart[ends], len(par_hits))
        par_covered |= par_hits
        modules = np.zeros(self.n_modules, dtype=bool)
        modules[self.mod_uid[covered]] = True
        params = np.zeros(self.n_params, dtype=bool)
        params[self.par_uid[par_covered]] = True
        return modules, params

    def expand_modules(self, unique: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`expand` for a mask of matched unique modules."""
        hits = np.zeros(len(self.names.names), dtype=bool)
        hits[: self.n_mod_occ] = unique[self.mod_uid]
        return self.expand(hits)

    def params_only_under(self, unique: np.ndarray) -> np.ndarray:
        """Unique-parameter mask of the parameters every name of which lies under a module of the
        unique-module mask ``unique`` (a tied parameter also used outside is not)."""
        starts = unique[self.mod_uid].nonzero()[0]
        under = _cover(self.mod_pstart[starts], self.mod_pstart[self.mod_end[starts]], len(self.par_uid))
        outside = np.bincount(self.par_uid[~under], minlength=self.n_params)
        return outside == 0

    @cached_property
    def _classes(self) -> tuple[list[type], np.ndarray]:
        of_module = self._module_classes
        classes = list(dict.fromkeys(of_module))
        number = {cls: i for i, cls in enumerate(classes)}
        return classes, np.fromiter(map(number.__getitem__, of_module), dtype=np.int64, count=len(of_module))

    @property
    def classes(self) -> list[type]:
        """The distinct classes of the model's modules."""
        return self._classes[0]

    def class_mask(self, test: Callable[[type], bool]) -> np.ndarray:
        """Unique-module mask of the modules whose class passes ``test`` (called once per class)."""
        classes, of = self._classes
        return np.array([bool(test(c)) for c in classes], dtype=bool)[of]

    def children(self, occurrence: int) -> list[int]:
        """Occurrence indices of the direct children of ``occurrence``, in order."""
        inside = self.mod_parent[occurrence + 1: self.mod_end[occurrence]]
        return ((inside == occurrence).nonzero()[0] + occurrence + 1).tolist()

    @cached_property
    def param_owner(self) -> np.ndarray:
        """Parameter occurrence -> module occurrence that holds it directly."""
        return np.repeat(np.arange(len(self.mod_uid)), np.diff(self.mod_pstart))

    def complete_roots(self, modules: np.ndarray) -> np.ndarray:
        """Unique mask of the outermost modules whose whole subtree lies in the unique mask ``modules``."""
        inside = modules[self.mod_uid]
        outside_before = np.concatenate(([0], np.cumsum(~inside)))
        idx = np.arange(len(inside))
        complete = inside & (outside_before[self.mod_end] - outside_before[idx] == 0)
        parent = np.asarray(self.mod_parent, dtype=np.int64)
        parent_complete = np.where(parent >= 0, complete[np.maximum(parent, 0)], False)
        roots = np.zeros(len(self.modules), dtype=bool)
        roots[self.mod_uid[complete & ~parent_complete]] = True
        return roots

    def occurrences(self, uid: int) -> list[int]:
        """Occurrence indices of unique module ``uid``."""
        return (self.mod_uid == uid).nonzero()[0].tolist()

    def slot(self, occurrence: int) -> tuple[nn.Module, str] | None:
        """``(holder, key)`` such that ``holder._modules[key]`` is the module at ``occurrence``
        (inside any wrapper that sits between it and its parent); ``None`` for the root."""
        parent = int(self.mod_parent[occurrence])
        if parent < 0:
            return None
        module = self.modules[self.mod_uid[occurrence]]
        holder = self.modules[self.mod_uid[parent]]
        key = self.mod_names[occurrence].rpartition(".")[2]
        while holder._modules[key] is not module:
            holder = holder._modules[key]
            key = _wrapper_attr(type(holder))
        return holder, key


def _subtree_sizes(parent: np.ndarray) -> np.ndarray:
    """Size of each node's subtree, itself included, from the parent of each node in pre-order."""
    n = len(parent)
    has_parent = parent >= 0
    depth = np.zeros(n, dtype=np.int64)
    while True:  # one pass per level of nesting
        deeper = np.where(has_parent, depth[np.maximum(parent, 0)] + 1, 0)
        if np.array_equal(deeper, depth):
            break
        depth = deeper
    size = np.ones(n, dtype=np.int64)
    order = np.argsort(-depth, kind="stable")
    for level in np.split(order, np.flatnonzero(np.diff(depth[order])) + 1):  # deepest level first
        level = level[has_parent[level]]
        if len(level):
            size += np.bincount(parent[level], weights=size[level], minlength=n).astype(np.int64)
    return size


def _dedup(objects: list, names: list[str]) -> tuple[np.ndarray, list, list[str]]:
    """Unique ``objects`` by identity, in first-seen order, with the name of each one's first
    occurrence, and the map from each occurrence to its unique index."""
    try:  # modules hash by identity unless a class says otherwise: a cheap first test
        distinct = len(set(objects)) == len(objects) if isinstance(objects[0], nn.Module) else False
    except TypeError:
        distinct = False
    ids = None
    if not distinct:
        ids = np.array(list(map(id, objects)), dtype=np.int64)
        ordered = np.sort(ids)
        distinct = not (ordered[1:] == ordered[:-1]).any()
    if distinct:  # the common case: nothing shared
        return np.arange(len(objects), dtype=np.int64), objects, names
    if ids is None:
        ids = np.array(list(map(id, objects)), dtype=np.int64)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first = first[order].tolist()
    return rank[inverse.reshape(-1)], [objects[i] for i in first], [names[i] for i in first]


def _cover(starts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Mask of length ``n`` that is true inside any of the half-open ranges ``[starts, ends)``."""
    covered = np.zeros(n, dtype=bool)
    if len(starts) <= 16:  # a few ranges: slices are cheaper than the vectorized sweep
        for start, end in zip(starts.tolist(), ends.tolist()):
            covered[start:end] = True
        return covered
    depth = np.bincount(starts, minlength=n + 1) - np.bincount(ends, minlength=n + 1)
    return np.cumsum(depth[:n]) > 0
