"""The recipe runner: fine-tune a model exactly as a recipe says, and resume it exactly.

It calls the library as a user would -- the recipe's ``policy`` through :class:`~freezekit.Policy`,
its phases through :class:`~freezekit.Schedule`, the optimizer through
:func:`~freezekit.param_groups` -- and holds no freezing logic of its own. A run directory gets the
resolved ``recipe.yaml``, ``data_config.json`` (the preprocessing) and ``data.json`` (what the
splits held: a resume or ``freezekit eval`` refuses a folder changed since), the records of
:mod:`~freezekit.train.records` (``metrics.jsonl``, ``summary.md``, ``curves.png``),
``checkpoints/last.pt`` / ``best.pt``, written atomically and holding everything a resumed run needs
to end with the same weights as an uninterrupted one (at an epoch's end, or every
``train.checkpoint_every`` steps), and ``model/`` / ``model-best/``: the fine-tuned model as timm or
torchvision loads it (:mod:`~freezekit.train.export`). Tests kill it at precise points (a step, a
phase, a checkpoint write) through :mod:`freezekit.train.faults`.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from ..errors import DeadRuleWarning
from ..freeze_state import State, state, state_dict
from ..models import build
from ..recipe import Recipe, check
from ..recipe.check import optimizer_rules
from ..schedule import Event, Schedule
from . import checkpoint as ckpt
from .distributed import (
    barrier,
    check_in_sync,
    full_state,
    leave,
    load_full_state,
    reduce_sums,
    shard,
    world,
    wrap_ddp,
)
from .evaluation import logits_of
from .export import export
from .faults import kill_at
from .features import FeatureCache, why_not_cacheable
from .feed import Feed
from .objective import Objective
from .progress import Reporter
from .records import Records
from .setup import RunError, WarmupThen, build_model, build_optimizer, resolve_device
from .sources import changes

__all__ = ["RunError", "RunResult", "run"]


@dataclass
class RunResult:
    output: Path
    epochs: int
    best_accuracy: float
    final: dict[str, Any] = field(default_factory=dict)


class _Run:
    """One run's state: built from the recipe, or restored from ``checkpoints/last.pt``."""

    def __init__(self, recipe: Recipe, out: Path, allow_import: tuple[str, ...], reporter: Reporter):
        prepared = check(recipe, allow_import)  # every problem, before anything is written
        self.out, self.reporter, self.allow_import = out, reporter, allow_import
        recipe = self.recipe = recipe.with_absolute_paths()  # as recorded: eval and resume read the same files
        self.schedule: Schedule = prepared.schedule
        self.groups = {"rules": optimizer_rules(recipe), "layer_decay": recipe.optimizer.layer_decay}
        device_type = resolve_device(recipe.train.device)
        self.world = world(device_type)
        self.device = torch.device(device_type, self.world.local_rank) if device_type == "cuda" else torch.device("cpu")
        strategy = recipe.train.strategy
        self.strategy = "single" if not self.world.distributed else ("fsdp" if strategy == "fsdp" else "ddp")
        if strategy == "fsdp" and not self.world.distributed:
            reporter.say("note: train.strategy fsdp shards across processes; run under torchrun to use it")
        self.records = Records(out, self.world.main, recipe.train.loggers)
        torch.manual_seed(recipe.seed)
        self.num_classes = prepared.num_classes
        self.model = build_model(recipe, self.num_classes, allow_import, reporter.say)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeadRuleWarning)
            prepared.policy.apply(self.model)
        self.model.to(self.device, memory_format=torch.channels_last if recipe.train.channels_last else None)
        if self.strategy == "fsdp":
            shard(self.model)  # before the optimizer: sharding makes new parameter objects
        self.optimizer = build_optimizer(recipe, self.model)
        self.feed = Feed(recipe, self.model, self.device, self.world.rank, self.world.size, self.note)
        self.classes, self.steps_per_epoch = self.feed.classes, self.feed.steps_per_epoch
        total = recipe.train.epochs * self.steps_per_epoch
        shape = WarmupThen(round(recipe.optimizer.warmup_epochs * self.steps_per_epoch), total,
                           recipe.optimizer.scheduler)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, shape)
        precision = recipe.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.objective = Objective(recipe, self.num_classes)  # mixup's targets are as wide as the logits
        self.epoch, self.step, self.best = 0, 0, -1.0
        self.batch, self.sums = 0, [0.0, 0, 0]  # where the epoch goes on from: batches done, (loss, correct, seen)
        self.cache: FeatureCache | None = None
        self.ddp: nn.Module | None = None
        self.engine: nn.Module = self.model  # what the training forward calls: the model, its DDP wrapper, compiled

    def note(self, text: str, record: dict[str, Any]) -> None:
        """Say ``text``, and record ``record`` at this point of the run."""
        self.reporter.say(text)
        self.records.add({"epoch": self.epoch, "step": self.step, **record})

    def wrap(self) -> None:
        """(Re)build the DDP wrapper for what trains now: a wrapper built earlier would never
        all-reduce parameters unfrozen since. With ``train.compile``, the engine is compiled
        (torch.compile guards on ``requires_grad``: a phase that changes it recompiles)."""
        if self.strategy == "ddp":
            self.ddp = wrap_ddp(self.model, self.device, previous=self.ddp)
        if self.recipe.train.compile:
            self.engine = torch.compile(self.ddp or self.model)
        else:
            self.engine = self.ddp or self.model

    def verify_in_sync(self, why: str) -> None:
        if not self.world.distributed:
            return
        first = check_in_sync(self.world, self.model)
        self.records.add({"epoch": self.epoch, "step": self.step, "event": "sync_check", "after": why,
                          "ranks_in_sync": first is None, "world_size": self.world.size})
        if first is not None:
            raise RunError(f"ranks out of sync after {why}: {first} differs between ranks")

    # -- checkpoints

    def last_good(self) -> str:
        """Where the run can go on from, for the error that stops it."""
        last = self.out / "checkpoints" / "last.pt"
        return f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"

    def payload(self) -> dict[str, Any]:
        """Everything a resumed run needs; ``batch`` is None at an epoch's end, else the batches of
        ``epoch`` done (and ``sums`` their loss, correct and seen)."""
        model_state, optimizer_state = full_state(self.model, self.optimizer, self.strategy == "fsdp")
        return {"format": "freezekit-run", "version": 1, "epoch": self.epoch, "step": self.step, "best": self.best,
                "batch": self.batch or None, "sums": self.sums,
                "model": model_state, "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "freezekit": state_dict(self.model),
                "schedule": self.schedule.state_dict(), "random": ckpt.random_states(),
                "world_size": self.world.size, "strategy": self.strategy,
                "recipe": self.recipe.model_dump(mode="json"), "data": self.feed.fingerprint}

    def save(self, best: bool = False) -> None:
        """Write ``last.pt`` (and ``best.pt`` first, when ``best``): every rank gathers, the main one writes."""
        payload = self.payload()  # every rank: gathering FSDP2 shards is collective
        folder = self.out / "checkpoints"
        if self.world.main:  # best.pt first: stopped between the two, the epoch runs again and rewrites both
            if best:
                ckpt.save(payload, folder / "best.pt")
                ckpt.copy(folder / "best.pt", folder / "last.pt")
            else:
                ckpt.save(payload, folder / "last.pt")
        barrier(self.world)

    def restore(self, path: Path) -> None:
        saved = ckpt.load_run(path)
        if saved["recipe"] != self.recipe.model_dump(mode="json"):
            changed = [k for k, v in self.recipe.model_dump(mode="json").items() if saved["recipe"].get(k) != v]
            raise RunError(f"the recipe changed since {path} was written ({', '.join(changed)}); resume with the "
                           f"recipe.yaml in {self.out}, or start a new run")
        changed = changes(saved.get("data", self.feed.fingerprint), self.feed.fingerprint)
        if changed:  # the split by val_fraction, the order of the epochs and the position in one would differ
            raise RunError(f"data.path: {self.recipe.data.path}: its images changed since {path} was written "
                           f"({'; '.join(changed)}); put them back as they were, or start a new run")
        if saved.get("world_size", 1) != self.world.size:
            raise RunError(f"{path} was written by {saved.get('world_size', 1)} processes, and this run has "
                           f"{self.world.size}: the data order would differ; resume with as many")
        self.schedule.load_state_dict(saved["schedule"])
        self.schedule.replay(self.model, self.optimizer, self.scheduler, **self.groups)
        if state(self.model) != State.from_dict(saved["freezekit"]):
            raise RunError(f"replaying the schedule did not give the freeze state saved in {path}")
        load_full_state(self.model, self.optimizer, saved["model"], saved["optimizer"], self.strategy == "fsdp")
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        ckpt.restore_random_states(saved["random"])
        self.step, self.best = saved["step"], saved["best"]
        if saved.get("batch"):  # written mid-epoch: that epoch goes on
            self.epoch, self.batch, self.sums = saved["epoch"], saved["batch"], saved["sums"]
        else:
            self.epoch = saved["epoch"] + 1

    # -- training

    def _cache_state(self) -> None:
        """Start, keep or drop the feature cache for the model as it is now."""
        wanted, d = self.recipe.train.cache_features, self.recipe.data
        drawn = d.augment or self.objective.mixup is not None
        reason = why_not_cacheable(self.model, drawn) if wanted is not False else "off"
        if reason is None and self.world.distributed:
            reason = "under torchrun the head's gradients must go through DDP"
        if reason is not None:
            if wanted is True:
                raise RunError(f"train.cache_features: true, but the features cannot be cached: {reason}")
            if self.cache is not None:
                self.cache.close()
                self.cache = None
            return
        if self.cache is None:
            self.cache = FeatureCache(self.model, len(self.feed.train_set) + len(self.feed.val_set))
            self._fill_cache()

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()

    @torch.no_grad()
    def _fill_cache(self) -> None:
        """One pass over both splits in a fixed order, keeping the head's inputs: the same features
        whether the run is fresh or resumed."""
        self.model.eval()
        for batch, offset in self.feed.in_order():
            if len(batch.labels):
                with self.cache.capture(batch.indices + offset), self._autocast():
                    self.model(self.feed.inputs(batch))

    def train_epoch(self) -> dict[str, float]:
        recipe, model = self.recipe, self.model
        self.reporter.start_epoch(self.epoch, recipe.train.epochs, self.steps_per_epoch, self.cache is not None)
        model.train()
        batches = self.feed.train(self.epoch, self.batch, lambda: self.cache is not None)
        for _ in range(self.batch, self.steps_per_epoch):
            events = self.schedule.update(model, self.optimizer, step=self.step, scheduler=self.scheduler,
                                          **self.groups)
            if events:
                self.phase_changed(events)  # before the batch is read: it may need images now
            batch = next(batches)
            if not len(batch.labels):  # nothing readable in it: the step is skipped, its place kept
                self.step, self.batch = self.step + 1, self.batch + 1
                self.scheduler.step()
                continue
            labels = batch.labels.to(self.device, non_blocking=True)
            with self._autocast():
                if self.cache is not None:
                    targets, logits = labels, self.cache.head(self.cache.features(batch.indices))
                else:
                    images, targets = self.objective.mix(self.feed.inputs(batch), labels, self.epoch, self.step)
                    logits = logits_of(self.engine(images))
                loss = self.objective(logits.float(), targets)
            if not torch.isfinite(loss):
                raise RunError(f"the loss is {loss.item()} at epoch {self.epoch} step {self.step}; {self.last_good()}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if recipe.train.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            kill_at("step", self.step)
            self.step += 1
            self.batch += 1
            n = len(labels)
            self.sums = [self.sums[0] + loss.item() * n, self.sums[1] + int((logits.argmax(1) == labels).sum()),
                         self.sums[2] + n]
            self.reporter.step(self.sums[0] / self.sums[2], self.sums[1] / self.sums[2])
            every = recipe.train.checkpoint_every
            if every and self.step % every == 0 and self.batch < self.steps_per_epoch:
                self.save()
        total_loss, correct, seen = reduce_sums(self.world, self.sums)
        self.batch, self.sums = 0, [0.0, 0, 0]
        return {"loss": total_loss / seen, "accuracy": correct / seen}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every rank evaluates the whole validation set on the model itself (no wrapper, so no
        collective per batch except FSDP2's, which all ranks then make alike)."""
        self.model.eval()
        offset = len(self.feed.train_set)
        total_loss, correct, seen = 0.0, 0, 0
        for batch in self.feed.val(self.cache is not None):
            if not len(batch.labels):
                continue
            labels = batch.labels.to(self.device)
            with self._autocast():
                logits = self.cache.head(self.cache.features(batch.indices + offset)) if self.cache is not None \
                    else logits_of(self.model(self.feed.inputs(batch)))
            total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        return {"loss": total_loss / seen, "accuracy": correct / seen}

    # -- records

    def phase_changed(self, events: list[Event]) -> None:
        for event in events:
            self.reporter.say(str(event))
            self.records.add({"epoch": self.epoch, "step": self.step, "event": "phase", "phase": event.phase,
                              "changes": event.changes, "added": len(event.sync.added)})
        self.records.summary(f"phase {events[-1].phase} ({events[-1].unit} {events[-1].at})", self.model,
                             self.epoch, self.step)
        self._cache_state()
        self.wrap()
        self.verify_in_sync(f"phase {events[-1].phase}")
        for event in events:
            kill_at("phase", event.phase)

    def export(self, name: str) -> None:
        """Write the model as timm or torchvision loads it (:mod:`.export`). Every rank calls it: a
        sharded (FSDP2) model's weights are gathered first, into a plain copy of the architecture."""
        model, spec = self.model, self.recipe.model
        if self.strategy == "fsdp":
            weights, _ = full_state(self.model, None, sharded=True)
            if self.world.main:
                model = build(spec.name, num_classes=self.num_classes, allow_import=self.allow_import, **spec.kwargs)
                model.load_state_dict(weights)
        if self.world.main:
            export(model, spec.name, self.out / name, self.feed.config, self.classes, model_args=spec.kwargs)


def _prepare_output(out: Path, resume: bool) -> Path:
    last = out / "checkpoints" / "last.pt"
    if resume and not last.is_file() and not (out / "recipe.yaml").is_file():
        raise RunError(f"--resume: no checkpoint at {last}; start the run without --resume")
    if not resume and (last.exists() or (out / "metrics.jsonl").exists()):
        raise RunError(f"{out} already holds a run; resume it with --resume, or choose another --output")
    return last


def run(recipe: Recipe, output: str | Path | None = None, resume: bool = False, quiet: bool = False,
        allow_import: tuple[str, ...] | list[str] = ()) -> RunResult:
    """Fine-tune as ``recipe`` says; with ``resume``, continue the run in ``output`` where it stopped.

    Raises:
        RecipeError: the recipe does not fit its data or model (nothing is written).
        RunError, CheckpointError: the run cannot start or go on.
    """
    out = Path(output or recipe.output.dir or Path("runs") / recipe.name)
    rank = int(os.environ.get("RANK", "0"))
    reporter = Reporter(quiet, enabled=rank == 0)  # under torchrun, rank 0 speaks and writes
    last = _prepare_output(out, resume)
    if resume and not last.is_file():
        reporter.say(f"no checkpoint in {out} yet: starting {recipe.name} again from the beginning")
        resume = False
    r = _Run(recipe, out, tuple(allow_import), reporter)
    try:
        return _epochs(r, out, last, resume)
    finally:
        r.records.close()
        r.feed.close()
        if r.cache is not None:
            r.cache.close()
        leave(r.world)


def _epochs(r: _Run, out: Path, last: Path, resume: bool) -> RunResult:
    recipe, reporter = r.recipe, r.reporter
    if resume:
        r.restore(last)
        if r.epoch >= recipe.train.epochs:
            reporter.say(f"{recipe.name} has run all its {recipe.train.epochs} epochs ({last}): nothing to resume")
            return RunResult(out, recipe.train.epochs, r.best)
        if r.world.main:
            r.records.trim(r.epoch, r.step)
            ckpt.clean(out / "checkpoints")
        where = f"epoch {r.epoch + 1}/{recipe.train.epochs}" + (f" batch {r.batch + 1}" if r.batch else "")
        reporter.say(f"resuming {recipe.name} at {where} from {last}")
    elif r.world.main:
        r.records.trim(0, 0)  # what a run stopped before its first checkpoint left
        ckpt.clean(out / "checkpoints")
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        (out / "data_config.json").write_text(json.dumps(r.feed.config, indent=2) + "\n")
        (out / "data.json").write_text(json.dumps(r.feed.fingerprint, indent=2) + "\n")
        r.records.summary("start", r.model, 0, 0)
    barrier(r.world)
    r._cache_state()
    r.wrap()
    final: dict[str, Any] = {}
    while r.epoch < recipe.train.epochs:
        r.model.train()  # phases are applied and summarized on the model as it trains, fresh or resumed
        events = r.schedule.update(r.model, r.optimizer, epoch=r.epoch, step=r.step, scheduler=r.scheduler, **r.groups)
        if events:
            r.phase_changed(events)
        start = time.perf_counter()
        train = r.train_epoch()
        trained = time.perf_counter()
        val = r.evaluate()
        if not math.isfinite(val["loss"]):  # the last step broke the model: it must not be saved as good
            raise RunError(f"the validation loss is {val['loss']} after epoch {r.epoch} step {r.step}; "
                           f"{r.last_good()}")
        seconds = {"train": trained - start, "val": time.perf_counter() - trained}  # each split's own time
        lr = r.optimizer.param_groups[0]["lr"]
        cached = r.cache is not None
        for split, values in (("train", train), ("val", val)):
            r.records.add({"epoch": r.epoch, "split": split, **values, "step": r.step, "lr": lr,
                           "seconds": seconds[split], "cached_features": cached})
        reporter.end_epoch(f"epoch {r.epoch + 1}/{recipe.train.epochs}: train loss {train['loss']:.4f} "
                           f"acc {train['accuracy']:.1%} | val loss {val['loss']:.4f} acc {val['accuracy']:.1%} "
                           f"| {sum(seconds.values()):.1f}s" + (" (cached features)" if cached else ""))
        if r.epoch == recipe.train.epochs - 1:
            r.verify_in_sync("the last epoch")
        improved = val["accuracy"] > r.best
        r.best = max(r.best, val["accuracy"])
        r.save(best=improved)
        if improved:
            r.export("model-best")
        final = {"train": train, "val": val}
        r.epoch += 1
    r.export("model")
    r.records.curves()  # at the end: drawing takes a second, as long as a quickstart epoch
    reporter.say(f"done: best val accuracy {r.best:.1%}; {out}")
    return RunResult(out, recipe.train.epochs, r.best, final)
