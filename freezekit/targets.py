"""Target networks: frozen copies, and soft (Polyak) or hard updates from an online network.

Example:
    >>> import torch, freezekit as fk
    >>> online = torch.nn.Linear(2, 2)
    >>> target = fk.frozen_copy(online)
    >>> fk.polyak_update(target, online, tau=0.005)  # every step
    >>> any(p.requires_grad for p in target.parameters())
    False
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .errors import ModuleMismatchError, closest
from .index import unwrap
from .policy import Policy
from .rules import eval_mode, freeze

__all__ = ["frozen_copy", "hard_update", "polyak_update"]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen (no ``.grad``) and every module
    eval-locked: dropout off and statistics fixed whatever ``train()`` says. For target networks."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"frozen_copy(): module: expected a torch.nn.Module, got {type(module).__name__}")
    target = copy.deepcopy(unwrap(module))
    Policy(freeze("*"), eval_mode("*")).apply(target)  # permanent: the handle is dropped
    return target


def _pairs(target: nn.Module, source: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Matching tensors of the two modules, parameters then buffers, checked name by name."""
    for name, module in (("target", target), ("source", source)):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name}: expected a torch.nn.Module, got {type(module).__name__}")
    target, source = unwrap(target), unwrap(source)
    problems = []
    out_t: list[torch.Tensor] = []
    out_s: list[torch.Tensor] = []
    for kind, theirs, ours in (("parameter", source.named_parameters(), target.named_parameters()),
                               ("buffer", source.named_buffers(), target.named_buffers())):
        src, dst = dict(theirs), dict(ours)
        for name in dst.keys() - src.keys():
            near = closest(name, list(src))
            problems.append(f"{kind} {name!r} is in target but not in source"
                            + (f" (closest: {', '.join(map(repr, near))})" if near else ""))
        for name in src.keys() - dst.keys():
            problems.append(f"{kind} {name!r} is in source but not in target")
        for name, t in dst.items():
            s = src.get(name)
            if s is None:
                continue
            if s.shape != t.shape:
                problems.append(f"{kind} {name!r}: shape {tuple(t.shape)} in target, {tuple(s.shape)} in source")
            else:
                out_t.append(t)
                out_s.append(s)
    if problems:
        raise ModuleMismatchError("target and source differ:\n  " + "\n  ".join(sorted(problems)))
    return out_t, out_s


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """``target = (1 - tau) * target + tau * source`` for every parameter and floating-point buffer,
    in place (integer buffers such as ``num_batches_tracked`` are copied). Modifies ``target``.

    Raises:
        ModuleMismatchError: the two modules do not have the same parameter and buffer names and shapes.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"polyak_update(): tau: expected a number in [0, 1], got {tau!r}")
    targets, sources = _pairs(target, source)
    soft = [(t, s) for t, s in zip(targets, sources) if t.is_floating_point() or t.is_complex()]
    hard = [(t, s) for t, s in zip(targets, sources) if not (t.is_floating_point() or t.is_complex())]
    if soft:
        torch._foreach_lerp_([t for t, _ in soft], [s.to(t.device, t.dtype) for t, s in soft], float(tau))
    for t, s in hard:
        t.copy_(s)


@torch.no_grad()
def hard_update(target: nn.Module, source: nn.Module) -> None:
    """Copy every parameter and buffer of ``source`` into ``target``, in place. Modifies ``target``.

    Raises:
        ModuleMismatchError: the two modules do not have the same parameter and buffer names and shapes.
    """
    targets, sources = _pairs(target, source)
    for t, s in zip(targets, sources):
        t.copy_(s)
