"""Batches for the runner, streamed through a ``torch.utils.data.DataLoader``: memory holds a few
batches, not the dataset, and workers decode while the model trains.

The order of an epoch depends only on (seed, epoch): :class:`EpochBatches` cuts a seeded
permutation into batches and, under torchrun, gives each rank every ``world``-th image (padded as
``DistributedSampler`` pads, so every rank makes as many steps). A resumed run starts the epoch at
its batch without reading what comes before. Each image's augmentation seed is drawn from (seed,
epoch, index), so neither the number of workers nor a resume changes what the model sees.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .sources import Unreadable

__all__ = ["Batch", "EpochBatches", "batches", "default_workers", "loader", "stop_workers"]


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
            world: int = 1) -> list[torch.Tensor]:
    """Index batches of one epoch: a permutation drawn from (seed, epoch), cut into batches. With
    ``world`` processes, rank ``rank`` takes every ``world``-th index, the permutation padded with
    its own start (as ``DistributedSampler`` does) so that every rank makes as many steps. A shuffled
    epoch leaves out a last batch of one image (see :func:`_one_left`)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)) if shuffle \
        else torch.arange(n)
    if world > 1:
        total = math.ceil(n / world) * world
        order = torch.cat([order, order[: total - n]])[rank::world]
    cut = list(order.split(batch_size))
    return cut[:-1] if _one_left(len(order), batch_size, shuffle) else cut


def _one_left(per_rank: int, batch_size: int, shuffle: bool) -> bool:
    """Whether a training epoch ends on a batch of one image, which it leaves out (a different image
    each epoch): BatchNorm cannot train on one image whose features are pooled to 1x1 -- it raises,
    after a whole epoch -- and a step on one image is that image's noise."""
    return shuffle and per_rank > batch_size and per_rank % batch_size == 1


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """The batch sampler: keys ``(index, augmentation seed)`` of one epoch's batches, from batch
    ``start`` on. :meth:`set_epoch` picks the epoch (as with ``DistributedSampler``)."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_batches(self) -> list[torch.Tensor]:
        return batches(self.n, self.batch_size, self.seed, self.epoch, self.shuffle, self.rank, self.world)

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world)
        return max(0, math.ceil(per_rank / self.batch_size) - _one_left(per_rank, self.batch_size, self.shuffle)
                   - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for idx in self.epoch_batches()[self.start:]:
            yield [(i, image_seed(self.seed, self.epoch, i)) for i in idx.tolist()]


@dataclass
class Batch:
    """Images (uint8 or already normalized float), labels, dataset indices, and the paths of any
    images that could not be read (left out of the batch)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    unreadable: list[Unreadable]

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.indices, self.unreadable)


def collate(samples: list) -> Batch:
    good = [s for s in samples if not isinstance(s, Unreadable)]
    bad = [s for s in samples if isinstance(s, Unreadable)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad)
    images, labels, indices = zip(*good)
    return Batch(torch.stack(images), torch.tensor(labels), torch.tensor(indices), bad)


def default_workers(local_world: int = 1) -> int:
    """Decoding workers per process: the cores this process may use, shared among the processes
    of this machine, one left for the training loop itself; at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // max(1, local_world) - 1))


def loader(dataset: Dataset, sampler: EpochBatches, workers: int, pin_memory: bool) -> DataLoader:
    """The DataLoader over ``sampler``'s batches; its workers are kept from epoch to epoch. It draws
    its workers' base seed from a generator of its own: drawn from torch's global one, as by
    default, a run resumed mid-epoch would draw it again there, and its dropout masks would shift."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None, generator=torch.Generator())


def stop_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s workers now. PyTorch stops kept workers only when their iterator is
    collected, and a run that stopped on an error is held by the error's traceback -- in a
    notebook, for good. torch has no public call for this; Lightning calls the same private
    method (``_shutdown_workers_and_reset_iterator`` in its ``combined_loader``)."""
    iterator = loader._iterator
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
