"""Under torchrun (2 CPU ranks): the runner's sampler and loader over an image folder, two epochs;
each rank reports the paths its workers decoded, per epoch.  ``shard_app.py OUT DATA``"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torchvision.transforms import ToTensor

from freezekit.train.loader import EpochBatches, loader
from freezekit.train.sources import Files, image_folder

out, data = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
train, _, _ = image_folder(data, 0.1, seed=0)
dataset = Files(train, ToTensor())
order = EpochBatches(len(dataset), 4, seed=0, rank=rank, world=size)
epochs = {}
for epoch in range(2):
    order.set_epoch(epoch)
    epochs[epoch] = [dataset.paths[i] for batch in loader(dataset, order, 1, False) for i in batch.indices.tolist()]
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps({"epochs": epochs}))
dist.destroy_process_group()
