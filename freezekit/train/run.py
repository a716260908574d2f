"""The recipe runner: fine-tune a model exactly as a recipe says, and resume it exactly.

It calls the library as a user would -- the recipe's ``policy`` through :class:`~freezekit.Policy`,
its phases through :class:`~freezekit.Schedule`, the optimizer through
:func:`~freezekit.param_groups` -- and holds no freezing logic of its own. A run directory gets the
resolved ``recipe.yaml``, ``metrics.jsonl`` (a JSON object per line), ``summary.md`` (the frozen
layers of each phase) and ``checkpoints/last.pt`` / ``best.pt``, written atomically and holding
everything a resumed run needs to end with the same weights as an uninterrupted one. Tests kill it
at precise points (a step, a phase, a checkpoint write) through :mod:`freezekit.train.faults`.
"""

from __future__ import annotations

import json
import math
import os
import re
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
from ..recipe import Recipe, check
from ..recipe.check import optimizer_rules
from ..schedule import Event, Schedule
from ..summary_table import summary
from . import checkpoint as ckpt
from .data import augment, batches, normalize
from .distributed import (
    barrier,
    check_in_sync,
    full_state,
    load_full_state,
    reduce_sums,
    shard,
    world,
    wrap_ddp,
)
from .faults import kill_at
from .features import FeatureCache, why_not_cacheable
from .progress import Reporter
from .setup import RunError, WarmupThen, build_model, build_optimizer, load_data, resolve_device

__all__ = ["RunError", "RunResult", "run"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or a Hugging Face output's ``logits``."""
    return output if isinstance(output, torch.Tensor) else output.logits


@dataclass
class RunResult:
    output: Path
    epochs: int
    best_accuracy: float
    final: dict[str, Any] = field(default_factory=dict)


class _Run:
    """One run's state: built from the recipe, or restored from ``checkpoints/last.pt``."""

    def __init__(self, recipe: Recipe, out: Path, allow_import: tuple[str, ...], reporter: Reporter):
        self.recipe, self.out, self.reporter = recipe, out, reporter
        prepared = check(recipe, allow_import)  # every problem, before anything is written
        self.schedule: Schedule = prepared.schedule
        self.groups = {"rules": optimizer_rules(recipe), "layer_decay": recipe.optimizer.layer_decay}
        device_type = resolve_device(recipe.train.device)
        self.world = world(device_type)
        self.device = torch.device(device_type, self.world.local_rank) if device_type == "cuda" else torch.device("cpu")
        strategy = recipe.train.strategy
        self.strategy = "single" if not self.world.distributed else ("fsdp" if strategy == "fsdp" else "ddp")
        if strategy == "fsdp" and not self.world.distributed:
            reporter.say("note: train.strategy fsdp shards across processes; run under torchrun to use it")
        torch.manual_seed(recipe.seed)
        self.train_set, self.val_set, self.classes = load_data(recipe)
        self.model = build_model(recipe, prepared.num_classes, allow_import, reporter.say)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeadRuleWarning)
            prepared.policy.apply(self.model)
        self.model.to(self.device)
        if self.strategy == "fsdp":
            shard(self.model)  # before the optimizer: sharding makes new parameter objects
        self.optimizer = build_optimizer(recipe, self.model)
        self.steps_per_epoch = len(self.batches(0))
        total = recipe.train.epochs * self.steps_per_epoch
        shape = WarmupThen(round(recipe.optimizer.warmup_epochs * self.steps_per_epoch), total,
                           recipe.optimizer.scheduler)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, shape)
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and bf16)
        self.epoch, self.step, self.best = 0, 0, -1.0
        self.cache: FeatureCache | None = None
        self.engine: nn.Module = self.model  # what the training forward calls: the model, or its DDP wrapper

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's training batches of ``epoch`` (each ``batch_size``: per process under torchrun)."""
        return batches(len(self.train_set), self.recipe.train.batch_size, self.recipe.seed, epoch,
                       rank=self.world.rank, world=self.world.size)

    def wrap(self) -> None:
        """(Re)build the DDP wrapper for what trains now: a wrapper built earlier would never
        all-reduce parameters unfrozen since."""
        if self.strategy == "ddp":
            self.engine = wrap_ddp(self.model, self.device, previous=self.engine if self.engine is not self.model
                                   else None)

    def verify_in_sync(self, why: str) -> None:
        if not self.world.distributed:
            return
        first = check_in_sync(self.world, self.model)
        self.record({"epoch": self.epoch, "step": self.step, "event": "sync_check", "after": why,
                     "ranks_in_sync": first is None, "world_size": self.world.size})
        if first is not None:
            raise RunError(f"ranks out of sync after {why}: {first} differs between ranks")

    # -- checkpoints

    def last_good(self) -> str:
        """Where the run can go on from, for the error that stops it."""
        last = self.out / "checkpoints" / "last.pt"
        return f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"

    def payload(self) -> dict[str, Any]:
        model_state, optimizer_state = full_state(self.model, self.optimizer, self.strategy == "fsdp")
        return {"format": "freezekit-run", "version": 1, "epoch": self.epoch, "step": self.step, "best": self.best,
                "model": model_state, "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(), "freezekit": state_dict(self.model),
                "schedule": self.schedule.state_dict(), "random": ckpt.random_states(),
                "world_size": self.world.size, "strategy": self.strategy,
                "recipe": self.recipe.model_dump(mode="json")}

    def restore(self, path: Path) -> None:
        saved = ckpt.load(path)
        if saved.get("format") != "freezekit-run":
            raise ckpt.CheckpointError(f"checkpoint {path} is not a freezekit run checkpoint")
        if saved.get("version") != 1:
            raise ckpt.CheckpointError(f"checkpoint {path} has format version {saved.get('version')}, and this "
                                       f"freezekit reads version 1")
        missing = sorted({"epoch", "step", "best", "model", "optimizer", "scheduler", "freezekit", "schedule",
                          "random", "recipe"} - saved.keys())
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {path} is incomplete: it has no {', '.join(missing)}")
        if saved["recipe"] != self.recipe.model_dump(mode="json"):
            changed = [k for k, v in self.recipe.model_dump(mode="json").items() if saved["recipe"].get(k) != v]
            raise RunError(f"the recipe changed since {path} was written ({', '.join(changed)}); resume with the "
                           f"recipe.yaml in {self.out}, or start a new run")
        if saved.get("world_size", 1) != self.world.size:
            raise RunError(f"{path} was written by {saved.get('world_size', 1)} processes, and this run has "
                           f"{self.world.size}: the data order would differ; resume with as many")
        self.schedule.load_state_dict(saved["schedule"])
        self.schedule.replay(self.model, self.optimizer, self.scheduler, **self.groups)
        if state(self.model) != State.from_dict(saved["freezekit"]):
            raise RunError(f"replaying the schedule did not give the freeze state saved in {path}")
        load_full_state(self.model, self.optimizer, saved["model"], saved["optimizer"], self.strategy == "fsdp")
        self.scheduler.load_state_dict(saved["scheduler"])
        ckpt.restore_random_states(saved["random"])
        self.epoch, self.step, self.best = saved["epoch"] + 1, saved["step"], saved["best"]

    # -- training

    def _cache_state(self) -> None:
        """Start, keep or drop the feature cache for the model as it is now."""
        wanted = self.recipe.train.cache_features
        reason = why_not_cacheable(self.model, self.recipe.data.augment) if wanted is not False else "off"
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
            self.cache = FeatureCache(self.model, len(self.train_set) + len(self.val_set))
            self._fill_cache()

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()

    @torch.no_grad()
    def _fill_cache(self) -> None:
        """One pass over both splits in a fixed order, keeping the head's inputs: the same features
        whether the run is fresh or resumed."""
        self.model.eval()
        offset = 0
        for split in (self.train_set, self.val_set):
            for idx in batches(len(split), self.recipe.train.batch_size, self.recipe.seed, 0, shuffle=False):
                with self.cache.capture(idx + offset), self._autocast():
                    self.model(normalize(split.images[idx].to(self.device)))
            offset += len(split)

    def _forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Logits for a batch: the head on cached features when there is a cache, else a full pass.
        ``indices`` count validation samples after the training ones."""
        with self._autocast():
            if self.cache is not None:
                return self.cache.head(self.cache.features(indices))
            return logits_of(self.engine(normalize(images.to(self.device))))

    def train_epoch(self) -> dict[str, float]:
        recipe, model = self.recipe, self.model
        order = self.batches(self.epoch)
        cached = self.cache is not None
        self.reporter.start_epoch(self.epoch, recipe.train.epochs, len(order), cached)
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for i, idx in enumerate(order):
            events = self.schedule.update(model, self.optimizer, step=self.step, scheduler=self.scheduler,
                                          **self.groups)
            if events:
                self.phase_changed(events)
            images = self.train_set.images[idx]
            if recipe.data.augment:
                images = augment(images, recipe.seed, self.epoch, i)
            labels = self.train_set.labels[idx].to(self.device)
            logits = self._forward(images, idx)
            loss = F.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise RunError(f"the loss is {loss.item()} at epoch {self.epoch} step {self.step}; {self.last_good()}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.train.grad_clip:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            kill_at("step", self.step)
            self.step += 1
            n = len(idx)
            total_loss += loss.item() * n
            correct += int((logits.argmax(1) == labels).sum())
            seen += n
            self.reporter.step(total_loss / seen, correct / seen)
        total_loss, correct, seen = reduce_sums(self.world, [total_loss, correct, seen])
        return {"loss": total_loss / seen, "accuracy": correct / seen}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every rank evaluates the whole validation set on the model itself (no wrapper, so no
        collective per batch except FSDP2's, which all ranks then make alike)."""
        self.model.eval()
        offset = len(self.train_set)
        total_loss, correct = 0.0, 0
        for idx in batches(len(self.val_set), self.recipe.train.batch_size, self.recipe.seed, 0, shuffle=False):
            labels = self.val_set.labels[idx].to(self.device)
            with self._autocast():
                logits = self.cache.head(self.cache.features(idx + offset)) if self.cache is not None else \
                    logits_of(self.model(normalize(self.val_set.images[idx].to(self.device))))
            total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
        n = len(self.val_set)
        return {"loss": total_loss / n, "accuracy": correct / n}

    # -- records

    def record(self, item: dict[str, Any]) -> None:
        if not self.world.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(item) + "\n")

    def phase_changed(self, events: list[Event]) -> None:
        for event in events:
            self.reporter.say(str(event))
            self.record({"epoch": self.epoch, "step": self.step, "event": "phase", "phase": event.phase,
                         "changes": event.changes, "added": len(event.sync.added)})
        self.write_summary(f"phase {events[-1].phase} ({events[-1].unit} {events[-1].at})")
        self._cache_state()
        self.wrap()
        self.verify_in_sync(f"phase {events[-1].phase}")
        for event in events:
            kill_at("phase", event.phase)

    def write_summary(self, title: str) -> None:
        if not self.world.main:
            return
        table = summary(self.model)
        with open(self.out / "summary.md", "a") as f:
            f.write(f"## {title}, from epoch {self.epoch} step {self.step}\n\n{table.to_markdown()}\n\n")


def _prepare_output(out: Path, resume: bool) -> Path:
    last = out / "checkpoints" / "last.pt"
    if resume and not last.is_file() and not (out / "recipe.yaml").is_file():
        raise RunError(f"--resume: no checkpoint at {last}; start the run without --resume")
    if not resume and (last.exists() or (out / "metrics.jsonl").exists()):
        raise RunError(f"{out} already holds a run; resume it with --resume, or choose another --output")
    return last


def _trim_records(out: Path, epoch: int) -> None:
    """Drop what a killed run recorded from ``epoch`` on, after its last checkpoint (it will be recorded
    again): lines of ``metrics.jsonl``, sections of ``summary.md``."""
    path = out / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("epoch", 0) < epoch]
        path.write_text("".join(line + "\n" for line in kept))
    path = out / "summary.md"
    if path.exists():
        sections = re.split(r"(?m)^(?=## )", path.read_text())  # each "## TITLE, from epoch E step S"
        path.write_text("".join(s for s in sections
                                if not (head := re.match(r"## .*, from epoch (\d+) step \d+$", s, re.M))
                                or int(head[1]) < epoch))


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
    if resume:
        r.restore(last)
        if r.world.main:
            _trim_records(out, r.epoch)
            ckpt.clean(out / "checkpoints")
        reporter.say(f"resuming {recipe.name} at epoch {r.epoch + 1}/{recipe.train.epochs} from {last}")
    elif r.world.main:
        _trim_records(out, 0)  # what a run stopped before its first checkpoint left
        ckpt.clean(out / "checkpoints")
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        r.write_summary("start")
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
            r.record({"epoch": r.epoch, "split": split, **values, "step": r.step, "lr": lr, "seconds": seconds[split],
                      "cached_features": cached})
        reporter.end_epoch(f"epoch {r.epoch + 1}/{recipe.train.epochs}: train loss {train['loss']:.4f} "
                           f"acc {train['accuracy']:.1%} | val loss {val['loss']:.4f} acc {val['accuracy']:.1%} "
                           f"| {sum(seconds.values()):.1f}s" + (" (cached features)" if cached else ""))
        if r.epoch == recipe.train.epochs - 1:
            r.verify_in_sync("the last epoch")
        improved = val["accuracy"] > r.best
        r.best = max(r.best, val["accuracy"])
        payload = r.payload()  # every rank: gathering FSDP2 shards is collective
        if r.world.main:  # best.pt first: stopped between the two, the epoch runs again and rewrites both
            if improved:
                ckpt.save(payload, out / "checkpoints" / "best.pt")
                ckpt.copy(out / "checkpoints" / "best.pt", out / "checkpoints" / "last.pt")
            else:
                ckpt.save(payload, out / "checkpoints" / "last.pt")
        barrier(r.world)
        final = {"train": train, "val": val}
        r.epoch += 1
    if r.cache is not None:
        r.cache.close()
    reporter.say(f"done: best val accuracy {r.best:.1%}; {out}")
    return RunResult(out, recipe.train.epochs, r.best, final)
