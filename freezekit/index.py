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
import threading
import weakref
from collections.abc import Callable
from functools import cached_property

import numpy as np
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

from .names import NameList
from .norm import STATS_ADAPT, has_running_stats, is_frozen_bn, is_norm, keeps_running_stats, may_swap

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
# Every module class seen, numbered in order of first sight. The walk reads one code per module:
# the class's number, -1 for a wrapper class, or -2 - number for a norm layer, whose running
# statistics are read right then. A test on classes (norm? BatchNorm?) runs once per class.
_class_code: dict[type, int] = {}
_numbered: list[type] = []
_flags_stats: set[type] = set()  # norm classes that keep running statistics where track_running_stats says so
_swappable: set[type] = set()  # norm classes a frozen BatchNorm can replace
_frozen_bns: set[type] = set()  # frozen BatchNorm classes
_numbering = threading.Lock()
# test -> its result for each numbered class, by number (class_mask); dropped with the test
_tested: weakref.WeakKeyDictionary[Callable[[type], bool], list[bool]] = weakref.WeakKeyDictionary()


def _wrapper_attr(cls: type) -> str | None:
    try:
        return _wrapper_attr_cache[cls]
    except KeyError:
        attr = next((a for c in cls.__mro__ if (a := _WRAPPERS.get((c.__module__, c.__qualname__)))), None)
        _wrapper_attr_cache[cls] = attr
        return attr


def _code(cls: type) -> int:
    """The walk's code for module class ``cls``, which is numbered at first sight."""
    code = _class_code.get(cls)
    if code is None:
        with _numbering:
            code = _class_code.get(cls)
            if code is None:
                if _wrapper_attr(cls) is not None:
                    code = -1
                else:
                    code = len(_numbered)
                    _numbered.append(cls)
                    if is_norm(cls):
                        code = -2 - code
                        if issubclass(cls, _NormBase):  # says in track_running_stats whether it keeps statistics
                            _flags_stats.add(cls)
                        if may_swap(cls):
                            (_frozen_bns if is_frozen_bn(cls) else _swappable).add(cls)
                _class_code[cls] = code
    return code


def class_number(cls: type) -> int:
    """The number of module class ``cls`` (not a wrapper): its position in :func:`numbered_classes`."""
    code = _code(cls)
    return code if code >= 0 else -2 - code


def numbered_classes() -> list[type]:
    """Every module class numbered so far, by number."""
    return _numbered


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


class gc_paused:  # a context manager named for its use: ``with gc_paused():``
    """Pause the cyclic garbage collector while a model is walked or changed.

    Walking 100k modules allocates a few hundred thousand short-lived objects; each generational
    collection they trigger also scans the model's own objects, which costs more than the walk.
    Whatever became garbage meanwhile is collected as usual once it resumes.
    """

    def __enter__(self) -> None:
        self._resume = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._resume:
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
        # per-module tuple (they would wake the garbage collector). What planning needs of a module
        # is read now, while the module is in cache; a later pass over 100k modules scattered in
        # memory costs more than the walk. Order is named_modules()'s.
        occ: list[nn.Module] = [root]
        mod_names: list[str] = [""]
        mod_end: list[int] = [0]  # set when the root's children are done
        code = _code(type(root))
        mod_cls: list[int] = [code if code >= 0 else -2 - code]
        with_norm: list[int] = [0] if code < -1 else []  # norm layers
        with_stats: list[int] = [0] if code < -1 and keeps_running_stats(root) else []
        with_swap: list[int] = []  # of those, the ones a frozen BatchNorm may replace or is; never the root
        with_frozen: list[int] = []  # of those, the frozen BatchNorms
        with_mark: list[int] = [0] if code < -1 and STATS_ADAPT in root.__dict__ else []  # chosen to adapt
        with_train: list[int] = [0] if "train" in root.__dict__ else []  # may hold an eval lock
        with_forward: list[int] = [0] if "forward" in root.__dict__ else []  # may hold a boundary
        par_occ: list[nn.Parameter] = [p for p in root._parameters.values() if p is not None]
        par_names: list[str] = [k for k, p in root._parameters.items() if p is not None]
        par_owner: list[int] = [0] * len(par_occ)  # the module occurrence that holds each
        code_of, flagged, swappable, frozen_bns = _class_code.get, _flags_stats, _swappable, _frozen_bns
        i = 1  # the occurrence number of the next module
        stack = [(iter(root._modules.items()), "", 0)]
        while stack:
            children, prefix, parent = stack[-1]
            for key, module in children:
                if module is None:
                    continue
                code = code_of(type(module), -1)
                if code < 0:  # a wrapper, a class not seen before, or a norm layer
                    if code == -1:
                        module = _inside_wrappers(module)
                        code = _code(type(module))
                    if code < -1:
                        code = -2 - code
                        with_norm.append(i)
                        state = module.__dict__
                        if (state.get("track_running_stats") if type(module) in flagged
                                else has_running_stats(module)):
                            with_stats.append(i)
                            if type(module) in swappable:
                                with_swap.append(i)
                            elif type(module) in frozen_bns:
                                with_swap.append(i)
                                with_frozen.append(i)
                        if STATS_ADAPT in state:
                            with_mark.append(i)
                mod_cls.append(code)
                state = module.__dict__
                name = prefix + key
                occ.append(module)
                mod_names.append(name)
                mod_end.append(i + 1)  # a leaf's; a container's is set when its children are done
                if "train" in state:
                    with_train.append(i)
                if "forward" in state:
                    with_forward.append(i)
                try:
                    own, sub = state["_parameters"], state["_modules"]
                except KeyError:  # kept elsewhere than the instance dict
                    own, sub = module._parameters, module._modules
                if own:
                    for pname, p in own.items():
                        if p is not None:
                            par_occ.append(p)
                            par_names.append(f"{name}.{pname}")
                            par_owner.append(i)
                i += 1
                if sub:  # descend; this iterator resumes when that subtree is done
                    stack.append((iter(sub.items()), name + ".", i - 1))
                    break
            else:
                stack.pop()
                mod_end[parent] = i

        self.mod_names, self.par_names = mod_names, par_names
        self.n_mod_occ = len(mod_names)
        self.names = NameList(mod_names + par_names)  # every name, modules first: one scan per pattern
        self.param_owner = np.array(par_owner, dtype=np.int64)  # parameter occurrence -> module occurrence
        self.mod_end = np.array(mod_end, dtype=np.int64)
        self._ends = mod_end
        self.mod_uid, self.modules, self.module_names = _dedup(occ, mod_names)
        self.par_uid, self.params, self.param_names = _dedup(par_occ, par_names)
        self.n_modules, self.n_params = len(self.modules), len(self.params)
        # nothing reachable under two names: occurrence and unique numbers are the same
        self._distinct = len(occ) == self.n_modules and len(par_occ) == self.n_params
        self._class_numbers = mod_cls
        self.norms = self._marked(with_norm)  # norm layers (is_norm of their class)
        # those that keep running statistics (often all of them)
        self.norm_stats = self.norms if with_stats == with_norm else self._marked(with_stats)
        # rarely any: unique modules, in order
        self.swappable = self._uniques(with_swap)  # of those with statistics, a frozen BatchNorm may replace or is
        self.frozen_bn = self._uniques(with_frozen)  # the frozen BatchNorms among them
        self.adapting = self._uniques(with_mark)  # norm layers marked as chosen to adapt their statistics
        self.maybe_locked = self._uniques(with_train)
        self.maybe_cut = self._uniques(with_forward)

    @property
    def maybe_locked_or_cut(self) -> list[int]:
        """Unique modules that may hold an eval lock or a boundary, in order (rarely any)."""
        return sorted({*self.maybe_cut, *self.maybe_locked})

    def _marked(self, occurrences: list[int]) -> np.ndarray:
        mask = np.zeros(self.n_modules, dtype=bool)
        if occurrences:  # put: mask[list] tries the list as an integer first, and raises and catches an error
            mask.put(occurrences if self._distinct else self.mod_uid[occurrences], True)
        return mask

    def _uniques(self, occurrences: list[int]) -> list[int]:
        if not occurrences or self._distinct:
            return occurrences
        return sorted(set(self.mod_uid[occurrences].tolist()))

    @cached_property
    def mod_parent(self) -> np.ndarray:
        """Module occurrence -> occurrence of its parent (-1 for the root): the innermost module
        whose subtree is still open."""
        ends, parent, open_ = self._ends, [-1] * len(self._ends), [0]
        for i in range(1, len(ends)):
            while ends[open_[-1]] <= i:
                open_.pop()
            parent[i] = open_[-1]
            open_.append(i)
        return np.array(parent, dtype=np.int64)

    @cached_property
    def mod_pstart(self) -> np.ndarray:
        """Module occurrence -> its first parameter occurrence, and the number of them at the end:
        the parameters of a subtree are ``mod_pstart[i]:mod_pstart[mod_end[i]]``."""
        return np.concatenate(([0], np.bincount(self.param_owner, minlength=self.n_mod_occ).cumsum()))

    @cached_property
    def requires_grad(self) -> np.ndarray:
        """Each unique parameter's ``requires_grad``, as read at first use (``apply`` reads it as it
        changes it, in the same pass)."""
        return np.array([p.requires_grad for p in self.params], dtype=bool)

    @cached_property
    def training(self) -> np.ndarray:
        """Each unique module's ``training`` flag, as read at first use."""
        return np.array([m.training for m in self.modules], dtype=bool)

    @property
    def model_name(self) -> str:
        return type(self.root).__name__

    def expand(self, hits: np.ndarray, spans_subtrees: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Resolve matched names (a mask over :attr:`names`) to unique (module mask, parameter mask).

        A matched module occurrence selects itself, every module below it and every parameter
        below it; a matched parameter occurrence selects that parameter. ``spans_subtrees``: the
        hits already hold every name below a matched module (a glob ending in ``*``).
        """
        if spans_subtrees:
            covered, par_covered = hits[: self.n_mod_occ], hits[self.n_mod_occ:]
        else:
            covered = self.subtrees(hits[: self.n_mod_occ])
            par_covered = covered[self.param_owner] | hits[self.n_mod_occ:]
        return self._as_unique(covered, par_covered)

    def _as_unique(self, modules: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Occurrence masks of modules and parameters as masks of unique ones."""
        if self._distinct:
            return modules, params
        return self._unique(modules, self.mod_uid, self.n_modules), self._unique(params, self.par_uid, self.n_params)

    def subtrees(self, roots: np.ndarray) -> np.ndarray:
        """Mask of the module occurrences in the subtree of any occurrence in the mask ``roots``.

        Subtrees are ranges of the pre-order that nest or are disjoint: an occurrence is covered
        when the furthest end of a range opened at or before it lies beyond it.
        """
        ends = np.zeros(self.n_mod_occ, dtype=np.intp)
        np.putmask(ends, roots, self.mod_end)  # the end of each range that opens at a root
        return np.maximum.accumulate(ends, out=ends) > self._positions

    @cached_property
    def _positions(self) -> np.ndarray:
        return self.mod_uid if self._distinct else np.arange(self.n_mod_occ)  # nothing shared: 0, 1, 2, ...

    @staticmethod
    def _unique(occurrences: np.ndarray, uid: np.ndarray, n: int) -> np.ndarray:
        """A mask over occurrences, as a mask over unique objects (the same, if nothing is shared)."""
        if len(uid) == n:
            return occurrences
        unique = np.zeros(n, dtype=bool)
        unique[uid[occurrences]] = True
        return unique

    def expand_modules(self, unique: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`expand` for a mask of matched unique modules."""
        covered = self.subtrees(unique if len(unique) == self.n_mod_occ else unique[self.mod_uid])
        return self._as_unique(covered, covered[self.param_owner])

    def params_only_under(self, unique: np.ndarray) -> np.ndarray:
        """Unique-parameter mask of the parameters every name of which lies under a module of the
        unique-module mask ``unique`` (a tied parameter also used outside is not)."""
        under = self.subtrees(unique[self.mod_uid])[self.param_owner]
        outside = np.bincount(self.par_uid[~under], minlength=self.n_params)
        return outside == 0

    @cached_property
    def class_of(self) -> np.ndarray:
        """Each unique module's class, as its number in :func:`numbered_classes`."""
        of = np.array(self._class_numbers, dtype=np.int64)
        if len(of) != self.n_modules:  # shared modules: each under its first occurrence
            first = np.zeros(self.n_modules, dtype=np.int64)
            first[self.mod_uid[::-1]] = np.arange(len(of) - 1, -1, -1)
            of = of[first]
        return of

    def class_mask(self, test: Callable[[type], bool]) -> np.ndarray:
        """Unique-module mask of the modules whose class passes ``test``, a pure function of the
        class: it is called once per class and test in the process."""
        known = _tested.get(test, [])
        if len(known) < len(_numbered):  # classes numbered since: a new list, safe across threads
            known = known + [bool(test(cls)) for cls in _numbered[len(known):]]
            _tested[test] = known
        return np.array(known, dtype=bool)[self.class_of]

    def children(self, occurrence: int) -> list[int]:
        """Occurrence indices of the direct children of ``occurrence``, in order: each child's
        subtree ends where the next child starts."""
        ends, out = self._ends, []
        child, stop = occurrence + 1, ends[occurrence]
        while child < stop:
            out.append(child)
            child = ends[child]
        return out

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


def _dedup(objects: list, names: list[str]) -> tuple[np.ndarray, list, list[str]]:
    """Unique ``objects`` by identity, in first-seen order, with the name of each one's first
    occurrence, and the map from each occurrence to its unique index."""
    try:  # a set compares identity first: if it holds as many as the list, nothing is shared
        distinct = bool(objects) and isinstance(objects[0], nn.Module) and len(set(objects)) == len(objects)
    except TypeError:  # an unhashable module class
        distinct = False
    # tensors hash in Python: ids are cheaper
    if distinct or len(set(map(id, objects))) == len(objects):  # the common case: nothing shared
        return np.arange(len(objects), dtype=np.int64), objects, names
    ids = list(map(id, objects))
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first = first[order].tolist()
    return rank[inverse.reshape(-1)], [objects[i] for i in first], [names[i] for i in first]

