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

import re
from collections.abc import Callable, Iterable
from functools import cached_property

import numpy as np
import torch.nn as nn

from .boundary import boundaries
from .lock import is_locked
from .matching import NameList
from .norm import STATS_ADAPT, is_frozen_bn, is_norm, keeps_running_stats, may_swap

__all__ = ["ModelIndex", "peel", "unwrap", "wrapper_attr"]

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


# Wrapper attributes that can sit anywhere in a name users copy from named_parameters() of a wrapped
# model ("_orig_mod.layer4", "layer1.0._checkpoint_wrapped_module.conv1"), spelled plainly or as regex.
_INNER_SEGMENT = re.compile(r"(?<![^.])(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\\?\.")


def wrapper_attr(cls: type) -> str | None:
    """The attribute that holds the wrapped module, if ``cls`` is a wrapper class; else None."""
    return next((a for c in cls.__mro__ if (a := _WRAPPERS.get((c.__module__, c.__qualname__)))), None)


def peel(module: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The module inside any wrappers around ``module``, and those wrappers, outermost first."""
    wrappers = []
    while (attr := wrapper_attr(type(module))) is not None:
        wrappers.append(module)
        module = module._modules[attr]
    return module, wrappers


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
    return peel(model)[0]


class ModelIndex:
    """The modules and parameters of ``model`` (unwrapped), as flat arrays in model order.

    Occurrence arrays list each module (``mod_*``) or parameter (``par_*``) once per name under
    which it is reachable, in ``named_modules()`` pre-order. Unique arrays (``modules``,
    ``params``) list each object once, under its first name, in ``named_modules()`` /
    ``named_parameters()`` order.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.root = unwrap(model)
        self._walk()

    def inner_spelling(self, pattern: str) -> str:
        """``pattern`` as the inner model spells it: without the ``module.`` that a (Distributed)DataParallel
        around the model adds, nor the wrapper segments of ``torch.compile``, FSDP1 and activation
        checkpointing. Names through wrappers mean the same tensors as the inner names."""
        outer = "".join(rf"{wrapper_attr(type(w))}\\?\." for w in peel(self.model)[1])  # "module." of DDP, ...
        return _INNER_SEGMENT.sub("", re.sub(f"^{outer}", "", pattern) if outer else pattern)

    def _walk(self) -> None:
        # What planning needs of each module is read here, while it is at hand.
        occ, mod_names, mod_end, class_numbers = [], [], [], []
        par_occ, par_names, par_owner = [], [], []
        kinds: dict[type, tuple[int, bool]] = {}  # each class seen: its number, and whether it is a norm layer
        # norm layers, those that keep running statistics, those chosen to adapt them; modules with an
        # instance-level train / forward, the only ones that may hold an eval lock or a boundary (rarely any)
        with_norm, with_stats, with_mark, with_train, with_forward = [], [], [], [], []

        # Depth first, in named_modules() order, without recursion: each level is an iterator over
        # its container's children, resumed when the child's subtree is done.
        stack = [(iter([("", self.root)]), "", -1)]  # (children, their name prefix, their parent)
        while stack:
            children, prefix, parent = stack[-1]
            for key, module in children:
                if module is None:
                    continue
                kind = kinds.get(type(module))
                if kind is None:  # a class not seen before: a wrapper is looked through
                    module = peel(module)[0]
                    kind = kinds.setdefault(type(module), (len(kinds), is_norm(type(module))))
                i, name, state = len(occ), prefix + key, module.__dict__
                occ.append(module)
                mod_names.append(name)
                mod_end.append(i + 1)  # a leaf's; a container's is set when its children are done
                class_numbers.append(kind[0])
                if kind[1]:  # a norm layer: does it keep running statistics, was it chosen to adapt them?
                    with_norm.append(i)
                    if keeps_running_stats(module):
                        with_stats.append(i)
                    if STATS_ADAPT in state:
                        with_mark.append(i)
                if "train" in state:
                    with_train.append(i)
                if "forward" in state:
                    with_forward.append(i)
                own, sub = state["_parameters"], state["_modules"]
                if not (own or sub):  # a leaf without parameters
                    continue
                below = name + "." if name else ""  # the prefix of what lies below it
                for pname, p in own.items():
                    if p is not None:
                        par_occ.append(p)
                        par_names.append(below + pname)
                        par_owner.append(i)
                if sub:  # descend; this iterator resumes when that subtree is done
                    stack.append((iter(sub.items()), below, i))
                    break
            else:
                stack.pop()
                if parent >= 0:
                    mod_end[parent] = len(occ)

        self.mod_names, self.par_names = mod_names, par_names
        self.n_mod_occ = len(mod_names)
        self.names = NameList(mod_names + par_names)  # every name, modules first: one scan per pattern
        self.param_owner = np.array(par_owner, dtype=np.intp)  # parameter occurrence -> module occurrence
        self.mod_end = np.array(mod_end, dtype=np.intp)  # module occurrence -> the first occurrence after its subtree
        self.mod_uid, self.modules, self.module_names = _dedup(occ, mod_names)
        self.par_uid, self.params, self.param_names = _dedup(par_occ, par_names, map(id, par_occ))
        self.n_modules, self.n_params = len(self.modules), len(self.params)
        # per unique object, from any of its occurrences (they are the same object)
        self.classes = list(kinds)  # each unique module's class is classes[class_of[u]]
        self.class_of = np.zeros(self.n_modules, dtype=np.intp)
        self.class_of[self.mod_uid] = class_numbers
        self.norms, self.norm_stats = self._marked(with_norm), self._marked(with_stats)
        stats = self.norm_stats.nonzero()[0].tolist()
        swap_class, frozen_class = self.class_mask(may_swap), self.class_mask(is_frozen_bn)
        # those a frozen BatchNorm may replace (or is); never the root, which has no parent to swap it through
        self.swappable = [u for u in stats if swap_class[u] and u != 0]
        self.frozen_bn = [u for u in self.swappable if frozen_class[u]]
        self.adapting = self._marked(with_mark).nonzero()[0].tolist()
        self.maybe_locked = self._marked(with_train).nonzero()[0].tolist()
        self.maybe_cut = self._marked(with_forward).nonzero()[0].tolist()

    def _marked(self, occurrences: list[int]) -> np.ndarray:
        """Unique-module mask of the modules at ``occurrences``."""
        mask = np.zeros(self.n_modules, dtype=bool)
        mask[self.mod_uid[occurrences]] = True
        return mask

    @cached_property
    def mod_parent(self) -> np.ndarray:
        """Module occurrence -> occurrence of its parent (-1 for the root): the innermost module
        whose subtree is still open."""
        ends, parent, open_ = self.mod_end.tolist(), [-1] * self.n_mod_occ, [0]
        for i in range(1, self.n_mod_occ):
            while ends[open_[-1]] <= i:
                open_.pop()
            parent[i] = open_[-1]
            open_.append(i)
        return np.array(parent, dtype=np.intp)

    @cached_property
    def mod_pstart(self) -> np.ndarray:
        """Module occurrence -> its first parameter occurrence, and the number of them at the end:
        the parameters of a subtree are ``mod_pstart[i]:mod_pstart[mod_end[i]]``."""
        return np.concatenate(([0], np.bincount(self.param_owner, minlength=self.n_mod_occ).cumsum()))

    @cached_property
    def requires_grad(self) -> np.ndarray:
        """Each unique parameter's ``requires_grad``, as read at first use."""
        return np.array([p.requires_grad for p in self.params], dtype=bool)

    @cached_property
    def training(self) -> np.ndarray:
        """Each unique module's ``training`` flag, as read at first use."""
        return np.array([m.training for m in self.modules], dtype=bool)

    @property
    def model_name(self) -> str:
        return type(self.root).__name__

    def class_mask(self, test: Callable[[type], bool]) -> np.ndarray:
        """Unique-module mask of the modules whose class passes ``test`` (called once per class)."""
        return np.array([bool(test(cls)) for cls in self.classes], dtype=bool)[self.class_of]

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

    def expand_modules(self, unique: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`expand` for a mask of matched unique modules."""
        covered = self.subtrees(unique[self.mod_uid])
        return self._as_unique(covered, covered[self.param_owner])

    def subtrees(self, roots: np.ndarray) -> np.ndarray:
        """Mask of the module occurrences in the subtree of any occurrence in the mask ``roots``.

        Subtrees are ranges of the pre-order that nest or are disjoint: an occurrence is covered
        when the furthest end of a range opened at or before it lies beyond it.
        """
        ends = np.where(roots, self.mod_end, 0)
        return np.maximum.accumulate(ends) > np.arange(self.n_mod_occ)

    def _as_unique(self, modules: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Occurrence masks of modules and parameters as masks of unique ones (the same if nothing is shared)."""
        out = []
        for occurrences, uid, n in ((modules, self.mod_uid, self.n_modules), (params, self.par_uid, self.n_params)):
            unique = occurrences
            if len(uid) != n:
                unique = np.zeros(n, dtype=bool)
                unique[uid[occurrences]] = True
            out.append(unique)
        return out[0], out[1]

    def params_only_under(self, unique: np.ndarray) -> np.ndarray:
        """Unique-parameter mask of the parameters every name of which lies under a module of the
        unique-module mask ``unique`` (a tied parameter also used outside is not)."""
        under = self.subtrees(unique[self.mod_uid])[self.param_owner]
        outside = np.bincount(self.par_uid[~under], minlength=self.n_params)
        return outside == 0

    def cut_at_output(self, added: list[int] | tuple[int, ...] = ()) -> np.ndarray:
        """Unique-module mask of the modules with an output boundary: one they hold now, or the
        unique modules ``added``."""
        cut = np.zeros(self.n_modules, dtype=bool)
        for u in self.maybe_cut:
            cut[u] = any(b.at == "output" for b in boundaries(self.modules[u]))
        cut[list(added)] = True
        return cut

    def behind_output_boundaries(self, added: list[int] | tuple[int, ...] = ()) -> np.ndarray:
        """Unique-parameter mask of the parameters behind an output boundary, which can receive no
        gradient (see :meth:`cut_at_output`)."""
        cut = self.cut_at_output(added)
        return self.params_only_under(cut) if cut.any() else np.zeros(self.n_params, dtype=bool)

    def eval_locked(self) -> list[int]:
        """Unique modules eval-locked now, in order."""
        return [u for u in self.maybe_locked if is_locked(self.modules[u])]

    def children(self, occurrence: int) -> list[int]:
        """Occurrence indices of the direct children of ``occurrence``, in order: each child's
        subtree ends where the next child starts."""
        ends, out = self.mod_end, []
        child, stop = occurrence + 1, ends[occurrence]
        while child < stop:
            out.append(child)
            child = int(ends[child])
        return out

    def complete_roots(self, modules: np.ndarray) -> np.ndarray:
        """Unique mask of the outermost modules whose whole subtree lies in the unique mask ``modules``."""
        inside = modules[self.mod_uid]
        outside_before = np.concatenate(([0], np.cumsum(~inside)))
        complete = inside & (outside_before[self.mod_end] - outside_before[:-1] == 0)
        parent = self.mod_parent
        parent_complete = np.where(parent >= 0, complete[np.maximum(parent, 0)], False)
        roots = np.zeros(self.n_modules, dtype=bool)
        roots[self.mod_uid[complete & ~parent_complete]] = True
        return roots

    def ancestors(self, uid: int) -> list[nn.Module]:
        """The modules above unique module ``uid`` (at its first name), nearest first."""
        out, o = [], int(self.mod_parent[self.occurrences(uid)[0]])
        while o >= 0:
            out.append(self.modules[self.mod_uid[o]])
            o = int(self.mod_parent[o])
        return out

    def param_name_in(self, uid: int, modules: np.ndarray) -> str:
        """The name of unique parameter ``uid`` held by a module of the unique-module mask ``modules``
        (the name a selection reached a tied tensor by); its first name if none is."""
        if len(self.par_uid) != self.n_params:
            for j in (self.par_uid == uid).nonzero()[0].tolist():
                if modules[self.mod_uid[self.param_owner[j]]]:
                    return self.par_names[j]
        return self.param_names[uid]

    def occurrences(self, uid: int) -> list[int]:
        """Occurrence indices of unique module ``uid``."""
        if len(self.mod_uid) == self.n_modules:  # nothing shared (the common case): one each, in order
            return [uid]
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
            key = wrapper_attr(type(holder))
        return holder, key


def _dedup(objects: list, names: list[str], keys: Iterable | None = None) -> tuple[np.ndarray, list, list[str]]:
    """Unique ``objects`` by identity, in first-seen order, with the name of each one's first
    occurrence, and the map from each occurrence to its unique index. ``keys``: what to tell them
    apart by, if not the objects themselves (modules hash by identity in C, tensors in Python)."""
    try:
        distinct = len(set(objects if keys is None else keys)) == len(objects)
    except TypeError:  # a module class that made itself unhashable
        distinct = False
    if distinct:  # the common case: nothing shared
        return np.arange(len(objects), dtype=np.intp), objects, names
    first: dict[int, int] = {}  # id -> unique index
    uid, keep = [], []  # keep: the first occurrence of each
    for i, obj in enumerate(objects):
        u = first.setdefault(id(obj), len(first))
        if u == len(keep):
            keep.append(i)
        uid.append(u)
    return np.array(uid, dtype=np.intp), [objects[i] for i in keep], [names[i] for i in keep]
