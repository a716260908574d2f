"""DistributedDataParallel after a change of what trains, from any training loop.

DDP registers its gradient hooks for the parameters that require grad **when the wrapper is
built**. Parameters unfrozen later are never all-reduced: each rank steps them with its own
gradients and the replicas drift apart without an error. :func:`rebuild_ddp` builds the wrapper
again, with the old one's settings, after a policy or phase changed the trainable set; the new
wrapper broadcasts rank 0's parameters and buffers as it is built. :func:`out_of_sync` proves the
result: it compares every rank's trainable parameters.

Example (under ``torchrun``)::

    model = DistributedDataParallel(net)
    ...
    fk.Policy(fk.unfreeze("layer4")).apply(model)
    fk.sync_optimizer(optimizer, model)
    model = fk.rebuild_ddp(model)
    assert fk.out_of_sync(model) is None
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .index import ModelIndex
from .verify import checksum

__all__ = ["out_of_sync", "rebuild_ddp"]


def rebuild_ddp(wrapper: DistributedDataParallel) -> DistributedDataParallel:
    """A new DDP wrapper of ``wrapper.module`` for the parameters that require grad now, built with
    ``wrapper``'s settings (devices, process group, buckets, unused-parameter search, static graph,
    buffer broadcast). ``wrapper`` is retired: its gradient hooks are removed, so it must not be
    used again. Communication hooks (``register_comm_hook``) are not carried over: register them
    on the new wrapper."""
    if not isinstance(wrapper, DistributedDataParallel):
        raise TypeError(f"rebuild_ddp(): wrapper: expected a DistributedDataParallel, got {type(wrapper).__name__}")
    # torch 2.14 renamed broadcast_buffers to forward_sync_buffers
    buffers = "forward_sync_buffers" if hasattr(wrapper, "forward_sync_buffers") else "broadcast_buffers"
    settings = {
        "device_ids": wrapper.device_ids, "output_device": wrapper.output_device, "dim": wrapper.dim,
        "process_group": wrapper.process_group, "bucket_cap_mb": wrapper.bucket_bytes_cap / 2**20,
        "find_unused_parameters": wrapper.find_unused_parameters, buffers: getattr(wrapper, buffers),
        "gradient_as_bucket_view": wrapper.gradient_as_bucket_view, "static_graph": wrapper.static_graph,
    }
    if getattr(wrapper, "mixed_precision", None) is not None:
        settings["mixed_precision"] = wrapper.mixed_precision
    # No public API retires a wrapper; its hooks stay on the same parameters' gradient accumulators
    # otherwise, and would fire beside the new wrapper's.
    wrapper.reducer._remove_autograd_hooks()
    return DistributedDataParallel(wrapper.module, **settings)


def out_of_sync(model: nn.Module, group: dist.ProcessGroup | None = None) -> str | None:
    """None if every rank of ``group`` (default: the world) holds the same trainable parameters with
    the same ``requires_grad`` flags; else the name of the first that differs. A collective: every
    rank must call it. Outside a process group, None. Works through DDP and FSDP2 (whose
    parameters are gathered whole)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"out_of_sync(): model: expected a torch.nn.Module, got {type(model).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        return None
    index = ModelIndex(model)
    sums = []
    for p, trains in zip(index.params, index.requires_grad.tolist()):
        tensor = p.detach()
        if trains and hasattr(tensor, "full_tensor"):  # FSDP2: the whole parameter, gathered
            tensor = tensor.full_tensor()
        sums.append(checksum(tensor) if trains else 0)
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([*index.requires_grad.astype("int64").tolist(), *sums], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    n = index.n_params
    for other in gathered:
        differs = (other != gathered[0]).nonzero()
        if len(differs):
            i = int(differs[0])
            return index.param_names[i % n] + (" (requires_grad)" if i < n else "")
    return None
