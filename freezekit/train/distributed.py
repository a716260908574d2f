"""Running under ``torchrun``: the process group, the DDP or FSDP2 wrapping, reducing metrics, and
proving that every rank trains the same parameters.

Freezing is where distributed training breaks: parameters unfrozen after DDP was built are never
all-reduced, so the replicas drift apart without a word. Here the DDP wrapper is built again
whenever a phase changes what trains, and after every such change and at the end
:func:`check_in_sync` compares a checksum of every rank's trainable parameters (for FSDP2, the
``requires_grad`` flags of every rank and the checksums of the gathered parameters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..ddp import out_of_sync, rebuild_ddp

__all__ = ["World", "check_in_sync", "full_state", "leave", "load_full_state", "reduce_sums", "shard", "world",
           "wrap_ddp"]


@dataclass(frozen=True)
class World:
    """This process's place: rank, world size, local rank; ``size == 1`` when not under torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    joined: bool = False  # this process group was created here, and is ours to destroy (leave())

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(device_type: str) -> World:
    """Join the process group torchrun describes (gloo on the CPU, nccl on GPUs); a lone process
    stays alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return World(dist.get_rank(), dist.get_world_size(), local, joined)


def leave(w: World) -> None:
    """Destroy the process group :func:`world` created, as torch asks before a process exits (left to
    the interpreter's exit, its threads can abort the process)."""
    if w.joined and dist.is_initialized():
        dist.destroy_process_group()


def reduce_sums(w: World, values: list[float]) -> list[float]:
    """Sum each value over all ranks (for metrics: losses, counts)."""
    if not w.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def wrap_ddp(model: nn.Module, device: torch.device, previous: nn.Module | None = None) -> nn.Module:
    """A DDP wrapper built for the parameters that train now (``previous``, a wrapper of the same
    model, is rebuilt with its settings)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(previous, DDP):
        return rebuild_ddp(previous)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(model: nn.Module) -> None:
    """FSDP2: ``fully_shard`` each block (the children of the outermost ``Sequential`` /
    ``ModuleList`` containers), then the model; frozen and trainable parameters may share a block.
    Raises if sharding lost a ``requires_grad`` flag."""
    from torch.distributed.fsdp import fully_shard

    before = {n: p.requires_grad for n, p in model.named_parameters()}
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # modules within a chosen block: their containers are not blocks
    for module in model.modules():
        if id(module) in inside or not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        for block in module:
            if any(True for _ in block.parameters()):
                blocks.append(block)
                inside.update(id(m) for m in block.modules())
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    lost = [n for n in before if after.get(n) != before[n]]
    if lost:
        raise RuntimeError(f"FSDP2 sharding changed requires_grad of {len(lost)} parameters ({lost[0]}, ...)")


def check_in_sync(w: World, model: nn.Module) -> str | None:
    """None if every rank holds the same trainable parameters (and flags), else the first
    differing parameter's name (see :func:`freezekit.out_of_sync`)."""
    return out_of_sync(model) if w.distributed else None


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, sharded: bool) -> tuple[dict, dict | None]:
    """Model and optimizer state as whole tensors (gathered to rank 0 under FSDP2: every rank calls
    it); no optimizer, no optimizer state."""
    if not sharded:
        return model.state_dict(), None if optimizer is None else optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), \
        None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved_model: dict, saved_optimizer: dict,
                    sharded: bool) -> None:
    """Load what :func:`full_state` saved (under FSDP2, every rank takes its shards)."""
    if not sharded:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, saved_model, options=options)
    set_optimizer_state_dict(model, optimizer, saved_optimizer, options=options)


def barrier(w: World) -> Any:
    if w.distributed:
        dist.barrier()
