"""A small Lightning fine-tuning run with a mid-run unfreeze, and the same schedule as a plain loop.

Imported by tests/test_lightning.py; run under torchrun (``python -m torch.distributed.run
--nproc-per-node 2 lightning_app.py OUT [--resume CKPT] [--epochs N]``) for the DDP tests: each
rank writes ``OUT/rank{R}.json`` with the checksum of every parameter and the callback's sync checks.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import freezekit as fk
from freezekit.integrations.lightning import FreezekitFinetuning

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import leave_now, write_rank  # noqa: E402

BATCH, BATCHES = 8, 3  # per process


def start_policy() -> fk.Policy:
    """A linear probe whose norm layers are eval-locked: the case Lightning's validation loop broke."""
    return fk.Policy(fk.freeze("*"), fk.unfreeze("net.fc"))


def schedule() -> fk.Schedule:
    return fk.Schedule(fk.Phase(2, fk.Policy(fk.unfreeze("net.layer4")), lr_mult=0.5))


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=5)


def dataset(seed: int = 1, n: int = BATCH * BATCHES) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g))


def make_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(fk.param_groups(model, lr=1e-2, weight_decay=0.05))
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # runs model.eval() and puts modes back by hand
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer, scheduler = make_optimizer(self)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=BATCH, shuffle=False)

    def val_dataloader(self):
        return DataLoader(dataset(seed=2, n=BATCH), batch_size=BATCH)


def trainer(epochs: int, **kwargs) -> pl.Trainer:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*(GPU|TPU|HPU) available.*")
    options = {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "logger": False,
               "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
               "num_sanity_val_steps": 0, "deterministic": True, **kwargs}
    return pl.Trainer(**options)


def callback() -> FreezekitFinetuning:
    return FreezekitFinetuning(policy=start_policy(), schedule=schedule())


def plain_loop(epochs: int) -> torch.nn.Module:
    """The same run written by hand: the policy, the optimizer over what trains, the schedule at
    each epoch's start, a validation pass after each epoch."""
    model = Classifier()
    start_policy().apply(model)
    optimizer, scheduler = make_optimizer(model)
    phases = schedule()
    train = DataLoader(dataset(), batch_size=BATCH, shuffle=False)
    for epoch in range(epochs):
        model.train()
        phases.update(model, optimizer, epoch=epoch, scheduler=scheduler)
        for x, y in train:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for x, _ in DataLoader(dataset(seed=2, n=BATCH), batch_size=BATCH):
                model(x)
        scheduler.step()
    return model


def main() -> None:
    out = Path(sys.argv[1])
    epochs = int(sys.argv[sys.argv.index("--epochs") + 1]) if "--epochs" in sys.argv else 4
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    torch.set_num_threads(1)
    module, cb = Classifier(), callback()
    run = trainer(epochs, devices=2, strategy="ddp", callbacks=[cb])
    run.fit(module, ckpt_path=resume)
    if "--save" in sys.argv:
        run.save_checkpoint(sys.argv[sys.argv.index("--save") + 1])
    write_rank(out, run.global_rank, module, cb.sync_checks)


if __name__ == "__main__":
    main()
    leave_now()
