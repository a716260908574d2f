"""The classic bug, by hand: unfreeze a layer after DDP was built. Run under torchrun with 2 processes.

Each rank trains on different data; DDP all-reduces only what was trainable when it was built, so
the layer unfrozen later is updated from each rank's own gradients and the replicas drift apart.
Prints one JSON line: what freezekit's in-sync check says, by hand and with the wrapper rebuilt.
"""

import gc
import json

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from freezekit.train.distributed import barrier, check_in_sync, world, wrap_ddp


def train(rebuild: bool) -> str | None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    for p in model[0].parameters():
        p.requires_grad_(False)  # frozen when DDP is built
    ddp = DDP(model)
    w = world("cpu")
    for p in model[0].parameters():
        p.requires_grad_(True)  # ...and unfrozen after
    if rebuild:
        ddp = wrap_ddp(model, torch.device("cpu"), previous=ddp)  # what freezekit's runner does after a phase
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + w.rank)  # each rank its own data
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    return check_in_sync(w, model)


dist.init_process_group("gloo")
by_hand, rebuilt = train(rebuild=False), train(rebuild=True)
if dist.get_rank() == 0:
    print(json.dumps({"by_hand": by_hand, "rebuilt": rebuilt}))
gc.collect()  # the DDP wrappers of train() go while the group lives, not as the interpreter exits (SIGABRT)
barrier(world("cpu"))  # no rank tears the group down while another still uses it
dist.destroy_process_group()
