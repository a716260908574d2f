"""``audit``: the classic freezing bugs, found by looking at a model (and its optimizer).

Each :class:`Finding` has a stable code, the names involved and the fix. A healthy model gives
an empty list.

==========  ============================================================================
FK001       frozen parameters that still hold a ``.grad`` (an optimizer will use it)
FK002       trainable parameters that the optimizer does not hold (they never train)
FK003       frozen parameters the optimizer still holds with a gradient: momentum and
            weight decay keep moving them
FK004       norm layers whose parameters are frozen but whose running statistics still update
FK005       a DDP wrapper built with a different trainable set than the model has now
FK006       reentrant gradient checkpointing whose inputs are all frozen: the trainable
            parameters inside get no gradient
FK007       tied parameters with conflicting states (storage shared by a frozen and a
            trainable tensor; a tensor both behind a boundary and outside it)
==========  ============================================================================

Example:
    >>> import torch, freezekit as fk
    >>> net = torch.nn.Linear(2, 2)
    >>> fk.audit(net, torch.optim.SGD(net.parameters(), lr=0.1))
    []
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .errors import some
from .index import ModelIndex, peel
from .lock import is_locked
from .norm import STATS_ADAPT, FrozenBatchNorm

__all__ = ["Finding", "Findings", "audit"]


@dataclass(frozen=True)
class Finding:
    """One bug: a stable ``code``, a short ``title``, the ``names`` involved and the ``fix``."""

    code: str
    title: str
    names: tuple[str, ...]
    fix: str

    def __str__(self) -> str:
        return f"{self.code} {self.title}: {some(self.names, 8)}\n      fix: {self.fix}"


class Findings(list):
    """The findings of :func:`audit`: a list, printable as a report."""

    def __str__(self) -> str:
        if not self:
            return "audit: no freezing problems found"
        return f"audit: {len(self)} problem{'s' if len(self) != 1 else ''}\n" + "\n".join(f"  {f}" for f in self)

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self]


def audit(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Findings:
    """Look for the classic freezing bugs in ``model`` (and ``optimizer``); change nothing.

    ``model`` may be a DDP or ``torch.compile`` wrapper: names are the inner model's, and a DDP
    wrapper is checked against the model's current trainable set.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit(): model: expected a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"audit(): optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    index = ModelIndex(model)
    names, params, rg = index.param_names, index.params, index.requires_grad
    out = Findings()

    stale = [n for n, p, r in zip(names, params, rg.tolist()) if not r and p.grad is not None]
    if stale:
        out.append(Finding("FK001", "frozen parameters hold a stale .grad", tuple(stale),
                           "set their .grad to None (fk.freeze does), and zero grads with set_to_none=True"))

    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p, r in zip(names, params, rg.tolist()) if r and id(p) not in held]
        if missing:
            out.append(Finding("FK002", "trainable parameters are not in the optimizer", tuple(missing),
                               "build the optimizer after freezing (fk.param_groups) or add them with "
                               "fk.sync_optimizer(optimizer, model)"))
        moving = [n for n, p, r in zip(names, params, rg.tolist()) if not r and id(p) in held and p.grad is not None]
        if moving:
            out.append(Finding("FK003", "the optimizer still moves frozen parameters (they have a .grad)",
                               tuple(moving), "clear their .grad (fk.freeze does) or remove them from the "
                                              "optimizer (fk.sync_optimizer)"))

    out += _drifting_norms(index)
    out += _stale_ddp(model, index)
    out += _starved_checkpoints(index)
    out += _tied_conflicts(index)
    return out


def _drifting_norms(index: ModelIndex) -> list[Finding]:
    drifting = []
    for u in index.norm_stats.nonzero()[0].tolist():
        module = index.modules[u]
        own = [p for p in module._parameters.values() if p is not None]
        frozen = own and not any(p.requires_grad for p in own)
        if frozen and not is_locked(module) and not isinstance(module, FrozenBatchNorm) \
                and not module.__dict__.get(STATS_ADAPT):
            drifting.append(index.module_names[u])
    if not drifting:
        return []
    return [Finding("FK004", "frozen norm layers still update their running statistics in training",
                    tuple(drifting), "freeze with norm='eval' (the default) or 'frozen_bn'; "
                                     "or say norm='train' if the statistics should adapt")]


def _stale_ddp(model: nn.Module, index: ModelIndex) -> list[Finding]:
    out = []
    for wrapper in peel(model)[1]:
        if not hasattr(wrapper, "_get_ddp_logging_data"):
            continue
        built = wrapper._get_ddp_logging_data()
        ignored = getattr(wrapper, "parameters_to_ignore", set())
        now = [p for n, p in wrapper.module.named_parameters() if p.requires_grad and n not in ignored]
        if built.get("num_parameter_tensors") != len(now) or \
                built.get("total_parameter_size_bytes") != sum(p.numel() * p.element_size() for p in now):
            names = tuple(n for n, p in zip(index.param_names, index.params) if p.requires_grad)
            out.append(Finding("FK005", f"DDP was built for {built.get('num_parameter_tensors')} trainable tensors, "
                                        f"the model has {len(now)} now", names,
                               "rebuild the DDP wrapper after changing what trains (the freezekit runner does)"))
    return out


def _starved_checkpoints(index: ModelIndex) -> list[Finding]:
    """Reentrant checkpointing (a reentrant ``CheckpointWrapper``, or timm's ``grad_checkpointing``
    while timm checkpoints reentrantly) around trainable parameters with only frozen ones before:
    no input of a checkpointed segment requires grad, so nothing inside gets a gradient."""
    reentrant_timm = _timm_uses_reentrant()
    trainable_before = np.concatenate(([0], np.cumsum(index.requires_grad[index.par_uid])))
    starved = []
    for occurrence, name in enumerate(index.mod_names):
        region = _checkpointed_region(index, occurrence, reentrant_timm)
        if region is None:
            continue
        first, stop = int(index.mod_pstart[region]), int(index.mod_pstart[index.mod_end[occurrence]])
        inside = bool(index.requires_grad[index.par_uid[first:stop]].any())
        if inside and trainable_before[first] == 0:
            starved.append(name)
    if not starved:
        return []
    return [Finding("FK006", "reentrant gradient checkpointing is fed only by frozen inputs: the trainable "
                             "parameters inside get no gradient", tuple(starved),
                    "use non-reentrant checkpointing (use_reentrant=False), or unfreeze a layer before it")]


def _checkpointed_region(index: ModelIndex, occurrence: int, reentrant_timm: bool) -> int | None:
    """The occurrence where the checkpointed part of ``occurrence`` starts, if it is checkpointed."""
    module = index.modules[index.mod_uid[occurrence]]
    if reentrant_timm and module.__dict__.get("grad_checkpointing") is True:
        # timm checkpoints the block sequence(s) of a model that has it switched on
        for child in index.children(occurrence):
            if isinstance(index.modules[index.mod_uid[child]], (nn.Sequential, nn.ModuleList)):
                return child
        return None
    holder = index.slot(occurrence)
    impl = getattr(holder[0], "checkpoint_impl", None) if holder else None
    return occurrence if impl is not None and getattr(impl, "name", "") == "REENTRANT" else None


def _timm_uses_reentrant() -> bool:
    try:
        from timm.layers import use_reentrant_ckpt
    except ImportError:  # older timm: torch's default, reentrant
        return True
    return bool(use_reentrant_ckpt())


def _tied_conflicts(index: ModelIndex) -> list[Finding]:
    conflicts = []
    # Different tensors on one storage (tied by .data assignment) with different flags.
    by_storage: dict[tuple, list[int]] = {}
    for i, p in enumerate(index.params):
        if p.device.type != "meta" and p.numel():
            key = (p.device, p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), tuple(p.stride()))
            by_storage.setdefault(key, []).append(i)
    for group in by_storage.values():
        if len(group) > 1 and len({bool(index.requires_grad[i]) for i in group}) > 1:
            conflicts += [index.param_names[i] for i in group]
    # One tensor reachable under several names, some behind an output boundary and some not.
    if len(index.par_uid) > index.n_params:
        cut = index.cut_at_output()
        if cut.any():
            only_under = index.params_only_under(cut)
            any_under = index.expand_modules(cut)[1]
            shared = np.bincount(index.par_uid, minlength=index.n_params) > 1
            conflicts += [index.param_names[i] for i in (any_under & ~only_under & shared).nonzero()[0].tolist()]
    if not conflicts:
        return []
    return [Finding("FK007", "tied parameters have conflicting states", tuple(dict.fromkeys(conflicts)),
                    "tie by sharing the Parameter object (not .data), and freeze or detach all of its names alike")]
