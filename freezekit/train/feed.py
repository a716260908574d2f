"""What a run reads: its two datasets, preprocessed as the model expects, each streamed through a
DataLoader whose workers live as long as the run, and the batches handed to the training loop --
from where an epoch goes on, without reading images when a feature cache stands in for them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from ..recipe import Recipe
from .data import model_inputs
from .loader import Batch, EpochBatches, loader, stop_workers
from .preprocess import data_config
from .setup import RunError, data_workers, load_data
from .sources import fingerprint

__all__ = ["Feed"]


class Feed:
    def __init__(self, recipe: Recipe, model: nn.Module, device: torch.device, rank: int, world: int,
                 report: Callable[[str, dict[str, Any]], None]):
        self.recipe, self.device, self.report = recipe, device, report
        self.config = data_config(recipe, model)
        self.train_set, self.val_set, self.classes = load_data(recipe, self.config)
        self.fingerprint = fingerprint(self.train_set, self.val_set, self.classes)  # to tell a changed folder
        self.workers = data_workers(recipe, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.order = EpochBatches(len(self.train_set), recipe.train.batch_size, recipe.seed, True, rank, world)
        self.val_order = EpochBatches(len(self.val_set), recipe.train.batch_size, recipe.seed, shuffle=False)
        pin = device.type == "cuda"
        self.train_loader = loader(self.train_set, self.order, self.workers, pin)
        self.val_loader = loader(self.val_set, self.val_order, self.workers, pin)
        self.steps_per_epoch = len(self.order)
        self.distributed = world > 1
        self.skipped: set[str] = set()

    def close(self) -> None:
        """Stop the decoding workers, kept from epoch to epoch, when the run returns or fails."""
        stop_workers(self.train_loader)
        stop_workers(self.val_loader)

    def train(self, epoch: int, start: int, cached: Callable[[], bool]) -> Iterator[Batch]:
        """The training batches of ``epoch`` from batch ``start`` on: indices and labels only while
        ``cached()`` (asked at each batch: a phase may drop the feature cache mid-epoch), images
        from then on."""
        self.order.set_epoch(epoch, start)
        if cached():
            for batch in self._indices(self.train_set, self.order):
                if not cached():
                    break
                yield batch
                start += 1
            else:
                return
            self.order.set_epoch(epoch, start)
        yield from self._readable(self.train_loader)

    def val(self, cached: bool) -> Iterator[Batch]:
        """The validation batches, in order (every rank reads them all)."""
        return self._readable(self._indices(self.val_set, self.val_order) if cached else self.val_loader)

    def in_order(self) -> Iterator[tuple[Batch, int]]:
        """Both splits in a fixed order, with each batch's offset (validation after training), for a
        feature cache to fill."""
        offset = 0
        for dataset in (self.train_set, self.val_set):
            order = EpochBatches(len(dataset), self.recipe.train.batch_size, self.recipe.seed, shuffle=False)
            for batch in self._readable(loader(dataset, order, self.workers, False)):
                yield batch, offset
            offset += len(dataset)

    def inputs(self, batch: Batch) -> torch.Tensor:
        """A batch's images on the device, normalized, in the memory format the recipe asks."""
        images = model_inputs(batch.images, self.device, self.config)
        return images.contiguous(memory_format=torch.channels_last) if self.recipe.train.channels_last else images

    @staticmethod
    def _indices(dataset: Any, order: Iterable[list[tuple[int, int]]]) -> Iterator[Batch]:
        for keys in order:
            indices = [i for i, _ in keys]
            yield Batch(torch.empty(0), torch.tensor([dataset.labels[i] for i in indices]), torch.tensor(indices), [])

    def _readable(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """The batches, after reporting their unreadable images: the run stops at the first, or skips
        each (said once), as ``data.on_error`` asks. A batch left empty still comes, so that the
        loop keeps its count of steps."""
        for batch in batches:
            for bad in batch.unreadable:
                if self.recipe.data.on_error == "fail":
                    raise RunError(f"cannot read {bad.path} ({bad.reason}); fix or remove it, or set "
                                   f"data.on_error: skip")
                if bad.path not in self.skipped:
                    self.skipped.add(bad.path)
                    self.report(f"skipped unreadable image {bad.path} ({bad.reason})",
                                {"event": "skipped", "path": bad.path, "reason": bad.reason})
            if not len(batch.labels) and self.distributed:  # a rank that skipped a step would hang the others
                raise RunError(f"every image of a batch is unreadable ({', '.join(b.path for b in batch.unreadable)})"
                               f"; under torchrun, fix or remove them")
            yield batch
