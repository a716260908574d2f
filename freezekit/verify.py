"""``assert_frozen``: prove that nothing frozen moved inside a block.

What is watched: every parameter with ``requires_grad=False`` when the block starts, and the
running statistics of every norm layer that is eval-locked or a frozen BatchNorm.

How, cheaply enough for every training step: autograd's version counter and the data pointer of
each watched tensor say exactly which ones were written to (an optimizer step, an in-place op, a
``copy_``, a ``load_state_dict``, a ``.data =`` swap). Only those are then checksummed and compared
with a checksum taken before -- kept from the previous block while the tensor is untouched, so
a steady training loop checksums nothing. A write that bypasses the version counter (in place
through ``.data``) is caught with ``values=True``, which checksums every watched tensor on the way
in and out. The checksum weighs row and column sums by position, so a changed element and two
swapped elements both show.

Example:
    >>> import torch, freezekit as fk
    >>> net = torch.nn.Linear(2, 2).requires_grad_(False)
    >>> with fk.assert_frozen(net):
    ...     _ = net(torch.ones(1, 2))
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .errors import FrozenParameterChanged
from .index import ModelIndex
from .lock import is_locked
from .norm import FrozenBatchNorm, is_frozen_bn

__all__ = ["assert_frozen", "checksum"]


# id(tensor) -> (weak reference, version, data pointer, checksum) as last seen; dropped with the
# tensor. (Tensors cannot key a WeakKeyDictionary: its lookups compare them with ==.)
_seen: dict[int, tuple[weakref.ref, int, int, int]] = {}


def _remember(t: torch.Tensor, version: int, pointer: int, total: int) -> None:
    key = id(t)
    entry = _seen.get(key)
    ref = entry[0] if entry is not None and entry[0]() is t else weakref.ref(t, lambda _, key=key: _seen.pop(key, None))
    _seen[key] = (ref, version, pointer, total)


def _recalled(t: torch.Tensor) -> tuple[int, int, int] | None:
    entry = _seen.get(id(t))
    return entry[1:] if entry is not None and entry[0]() is t else None

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(t: torch.Tensor) -> int:
    """A position-sensitive checksum of ``t``'s bits (0 for tensors without data)."""
    t = t.detach()
    if hasattr(t, "to_local"):  # a DTensor: this rank's shard
        t = t.to_local()
    if t.device.type == "meta" or t.numel() == 0:
        return 0
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    flat = t.reshape(-1).view(_INT_OF_SIZE[t.element_size()])
    n = flat.numel()
    cols = max(1, math.isqrt(n))
    rows = n // cols
    body = flat[: rows * cols].view(rows, cols)
    by_row = body.sum(1, dtype=torch.int64) * torch.arange(1, rows + 1, device=t.device)
    by_col = body.sum(0, dtype=torch.int64) * torch.arange(1, cols + 1, device=t.device)
    tail = flat[rows * cols:].sum(dtype=torch.int64)
    return int(by_row.sum() + by_col.sum() * 1_000_003 + tail * 7_919)


def _identity(t: torch.Tensor) -> tuple[int, int]:
    local = t.to_local() if hasattr(t, "to_local") else t
    pointer = local.data_ptr() if local.device.type != "meta" else id(local.untyped_storage())
    return t._version, pointer


def _watched(model: nn.Module) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    index = ModelIndex(model)
    out = [(n, p) for n, p, rg in zip(index.param_names, index.params, index.requires_grad.tolist()) if not rg]
    may_hold = index.class_mask(is_frozen_bn)
    may_hold[index.maybe_locked] = True
    fixed = index.norms & may_hold  # norm layers, as the walk found them
    for u in fixed.nonzero()[0].tolist():
        module = index.modules[u]
        if isinstance(module, FrozenBatchNorm) or is_locked(module):
            name = index.module_names[u]
            out += [(f"{name}.{k}" if name else k, b) for k, b in module._buffers.items() if b is not None]
    return index.model_name, out


@contextmanager
def assert_frozen(model: nn.Module, values: bool = False) -> Iterator[None]:
    """On leaving the block, raise :class:`FrozenParameterChanged` naming every frozen parameter
    and locked norm buffer whose value changed inside it.

    Args:
        model: the model (DDP / compile / FSDP wrappers are seen through).
        values: also checksum tensors that no version counter says were written to, catching
            writes made in place through ``.data``; costs two passes over the frozen weights.
    """
    if not isinstance(values, bool):
        raise TypeError(f"assert_frozen(): values: expected True or False, got {values!r}")
    model_name, watched = _watched(model)
    before = []
    for _, t in watched:
        version, pointer = _identity(t)
        seen = _recalled(t)
        if values or seen is None or seen[:2] != (version, pointer):
            seen = (version, pointer, checksum(t))
            _remember(t, *seen)
        before.append(seen)
    yield
    changed = []
    for (name, t), (version, pointer, total) in zip(watched, before):
        if isinstance(t, nn.Parameter) and t.requires_grad:
            continue  # unfrozen inside the block, on purpose
        now = _identity(t)
        if values or now != (version, pointer):
            new_total = checksum(t)
            _remember(t, *now, new_total)
            if new_total != total:
                changed.append(name)
    if changed:
        raise FrozenParameterChanged(changed, model_name)
