"""freezekit in PyTorch Lightning: :class:`FreezekitFinetuning`, a drop-in for ``BaseFinetuning`` /
``BackboneFinetuning``.

Example:
    >>> import freezekit as fk
    >>> from freezekit.integrations.lightning import FreezekitFinetuning
    >>> callback = FreezekitFinetuning(
    ...     policy=fk.Policy(fk.freeze("backbone"), fk.unfreeze("backbone.layer4.1.bn2")),
    ...     schedule=fk.Schedule(fk.Phase(2, fk.Policy(fk.unfreeze("backbone.layer4")), lr_mult=0.1)),
    ... )
    >>> # lightning.Trainer(callbacks=[callback], ...).fit(module)

Where each duty happens in ``Trainer.fit``:

- ``setup``: the starting policy is applied, so that ``configure_optimizers`` sees what trains
  (build the optimizer from ``fk.param_groups(self, ...)`` or the parameters that require grad).
- ``load_state_dict`` (resuming from ``ckpt_path``): the schedule's progress is read.
- ``on_fit_start`` (after ``configure_optimizers`` and the DDP wrapping, before Lightning loads the
  optimizer and scheduler state): the phases done are replayed into the new optimizer, so their
  groups line up with the checkpoint's.
- ``on_train_epoch_start`` / ``on_train_batch_start`` (at accumulation boundaries): phases that
  are due are applied, the optimizer and LR scheduler synced, and, if what trains changed, the DDP
  wrapper is rebuilt (:func:`freezekit.rebuild_ddp`) and every rank's trainable parameters compared.
- ``on_train_end``: the ranks are compared once more; ``sync_checks`` records each comparison.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..ddp import rebuild_ddp
from .loop import LoopDriver

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["FreezekitFinetuning"]


class FreezekitFinetuning(pl.Callback):
    """Apply a starting ``policy`` and a ``schedule`` of phases in Lightning's loop, with the
    optimizer, LR scheduler, DDP wrapper, train mode and checkpoints kept in step (see the module
    docstring for where each happens).

    Args:
        policy, schedule, rules, layer_decay: as :class:`~freezekit.integrations.loop.LoopDriver`
            (objects, or a recipe's ``policy`` / ``schedule`` sections).
        optimizer: which of ``configure_optimizers``' optimizers new parameters join (by position).
    """

    def __init__(self, policy: Any = None, schedule: Any = None, rules: Any = (), layer_decay: float | None = None,
                 optimizer: int = 0):
        self.driver = LoopDriver(policy, schedule, rules=rules, layer_decay=layer_decay)
        self.optimizer_index = optimizer
        self._module: pl.LightningModule | None = None

    @property
    def sync_checks(self) -> list[dict[str, Any]]:
        return self.driver.sync_checks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._module = pl_module
            self.driver.start(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.driver.resume(pl_module, *self._optimizer(trainer)):
            self._rewrap(trainer, pl_module, "replaying the schedule")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._advance(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # not in the middle of an accumulation
            self._advance(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.check_in_sync(pl_module, "training")

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict(self._module) if self._module is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.driver.load_state_dict(state_dict)

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        if self.driver.advance(pl_module, *self._optimizer(trainer), epoch=epoch, step=step):
            self._rewrap(trainer, pl_module, f"the phase at epoch {epoch}, step {step}")

    def _optimizer(self, trainer: pl.Trainer) -> tuple[torch.optim.Optimizer | None, Any]:
        """The optimizer new parameters join, and the LR scheduler that drives it."""
        if not trainer.optimizers:
            return None, None
        optimizer = trainer.optimizers[self.optimizer_index]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        return optimizer, schedulers[0] if schedulers else None

    def _rewrap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, why: str) -> None:
        """What trains changed: a DDP wrapper built before would never all-reduce the new parameters."""
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model = rebuild_ddp(trainer.strategy.model)
        self.driver.check_in_sync(pl_module, why)
