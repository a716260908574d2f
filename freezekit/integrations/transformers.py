"""freezekit in the Hugging Face ``Trainer``: :class:`FreezekitCallback`, and :class:`FreezekitTrainer`
(or :class:`FreezekitTrainerMixin` for a ``Trainer`` subclass of your own) for what a callback
cannot reach: resuming, and DDP.

Example:
    >>> import freezekit as fk
    >>> from freezekit.integrations.transformers import FreezekitCallback, FreezekitTrainer
    >>> callback = FreezekitCallback(
    ...     policy=fk.Policy(fk.freeze("bert"), fk.unfreeze("bert.pooler")),
    ...     schedule=fk.Schedule(fk.Phase(1, fk.Policy(fk.unfreeze("bert.encoder.layer.11")), lr_mult=0.5)),
    ... )
    >>> # FreezekitTrainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()

Where each duty happens:

- ``on_init_end``: the starting policy is applied, before the Trainer builds its optimizer over
  the parameters that require grad.
- ``on_epoch_begin`` / ``on_step_begin`` (the start of an optimizer step): phases that are due
  are applied and synced into the optimizer (accelerate's wrapper included) and the LR scheduler:
  new groups follow the Trainer's schedule at ``lr_mult`` times its rate.
- ``on_save``: ``freezekit.json`` in the checkpoint folder records the schedule's progress and the
  freeze map.
- Resuming (:class:`FreezekitTrainerMixin`): ``train(resume_from_checkpoint=...)`` reads that file,
  and ``create_scheduler`` (after the optimizer is built, before the Trainer loads its state)
  replays the phases done, so the optimizer's groups line up with the checkpoint's. The Trainer's
  own callback-state mechanism rebuilds callbacks from JSON arguments, which a policy is not.
- Under DDP (:class:`FreezekitTrainerMixin`): when what trains changed, the wrapper is rebuilt
  (:func:`freezekit.rebuild_ddp`) before the next forward, and the ranks' trainable parameters
  compared. With the plain ``Trainer``, the callback refuses to change what trains under DDP
  rather than let the ranks drift apart.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..ddp import rebuild_ddp
from ..errors import FreezekitError
from ..optim import sync_optimizer
from ..tracking import track_optimizer
from .loop import LoopDriver

__all__ = ["STATE_FILE", "FreezekitCallback", "FreezekitTrainer", "FreezekitTrainerMixin"]

STATE_FILE = "freezekit.json"


class FreezekitCallback(TrainerCallback):
    """Apply a starting ``policy`` and a ``schedule`` of phases in the Trainer's loop (see the module
    docstring for where each happens).

    Args:
        policy, schedule, rules, layer_decay: as :class:`~freezekit.integrations.loop.LoopDriver`
            (objects, or a recipe's ``policy`` / ``schedule`` sections).
    """

    def __init__(self, policy: Any = None, schedule: Any = None, rules: Any = (), layer_decay: float | None = None):
        self.driver = LoopDriver(policy, schedule, rules=rules, layer_decay=layer_decay)
        self.started = False
        self.trainer: FreezekitTrainerMixin | None = None  # set by the mixin: it can rebuild DDP
        self.changed: str | None = None  # what changed what trains since the DDP wrapper was (re)built

    @property
    def sync_checks(self) -> list[dict[str, Any]]:
        return self.driver.sync_checks

    def on_init_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any) -> None:
        self._start(model)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            return
        if not self.started:  # added after the Trainer was built: its optimizer may hold what is frozen now
            self._start(model)
            sync_optimizer(_inner(optimizer), model, scheduler=_inner(lr_scheduler))
        track_optimizer(_inner(optimizer), model)  # a policy applied by hand later must not leave it behind

    def on_step_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module = None,
                      optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        epoch = math.floor((state.epoch or 0) + 1e-6)  # a float that counts steps too
        self._advance(model, optimizer, lr_scheduler, epoch=epoch, step=state.global_step)

    on_epoch_begin = on_step_begin  # epoch phases at the epoch's start, step phases at each step's

    def on_train_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any) -> None:
        self.driver.check_in_sync(model, "training")

    def on_save(self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.driver.state_dict(model), f)

    def load(self, checkpoint: str) -> None:
        """Read what :meth:`on_save` wrote in ``checkpoint`` (a checkpoint folder); the phases are
        replayed when the Trainer builds its scheduler (:class:`FreezekitTrainerMixin`)."""
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise FreezekitError(f"resuming from {checkpoint}: no {STATE_FILE} there, so the schedule's progress is "
                                 "unknown (was the checkpoint saved with a FreezekitCallback?)")
        with open(path) as f:
            self.driver.load_state_dict(json.load(f))

    def replay(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
        if self.driver.resume(model, _inner(optimizer), _inner(scheduler)):
            self._changed("replaying the schedule")

    def _start(self, model: torch.nn.Module | None) -> None:
        if model is not None and not self.started:
            self.driver.start(model)
            self.started = True

    def _advance(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, epoch: int, step: int) -> None:
        if self.driver.advance(model, _inner(optimizer), _inner(scheduler), epoch=epoch, step=step):
            self._changed(f"the phase at epoch {epoch}, step {step}")

    def _changed(self, why: str) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and self.trainer is None:
            raise FreezekitError(f"{why} changed what trains under DDP, and the plain Trainer's DDP wrapper "
                                 "cannot be rebuilt from a callback: its ranks would drift apart. Use "
                                 "freezekit.integrations.transformers.FreezekitTrainer (or its mixin)")
        self.changed = why


class FreezekitTrainerMixin:
    """What a ``Trainer`` needs for its :class:`FreezekitCallback` s that a callback cannot do: put it
    before the Trainer class, ``class MyTrainer(FreezekitTrainerMixin, SFTTrainer)``."""

    def _freezekit(self) -> list[FreezekitCallback]:
        found = [c for c in self.callback_handler.callbacks if isinstance(c, FreezekitCallback)]
        for callback in found:
            callback.trainer = self
        return found

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        callbacks = self._freezekit()
        checkpoint = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True \
            else resume_from_checkpoint or None
        if checkpoint:
            for callback in callbacks:
                callback.load(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        for callback in self._freezekit():  # the optimizer and scheduler exist; their state is not loaded yet
            callback.replay(self.model, optimizer or self.optimizer, scheduler)
        return scheduler

    def training_step(self, model: torch.nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        changed = [c for c in self._freezekit() if c.changed]
        if changed and isinstance(self.model_wrapped, DistributedDataParallel):
            self.model_wrapped = rebuild_ddp(self.model_wrapped)  # the new parameters are all-reduced from now on
        if isinstance(model, DistributedDataParallel) and model is not self.model_wrapped:
            model = self.model_wrapped  # the loop still holds the wrapper it started with
        for callback in changed:
            callback.driver.check_in_sync(self.model, callback.changed)
            callback.changed = None
        return super().training_step(model, inputs, *args, **kwargs)


class FreezekitTrainer(FreezekitTrainerMixin, Trainer):
    """The ``Trainer`` with :class:`FreezekitTrainerMixin`."""


def _inner(wrapped: Any) -> Any:
    """The torch optimizer or LR scheduler inside accelerate's wrapper, if it is one."""
    if isinstance(wrapped, AcceleratedOptimizer):
        return wrapped.optimizer
    if isinstance(wrapped, AcceleratedScheduler):
        return wrapped.scheduler
    return wrapped
