"""Shared fixtures: real architectures (tiny timm models, torchvision ResNets, meta-device giants)
and a few small hand-built modules with the shapes that break naive freezing code."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from freezekit.train.checkpoint import load as load_checkpoint


def tv_resnet(name: str = "resnet18", num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=num_classes)


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, for wrappers that need one (DDP, FSDP2)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def write_rank(out: Path, rank: int, model: nn.Module, sync_checks: list[dict]) -> None:
    """What a script under :func:`two_ranks` reports: every parameter's checksum, what trains, the checks."""
    from freezekit.verify import checksum

    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "sums": {n: checksum(p.detach()) for n, p in model.named_parameters()},
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "sync_checks": sync_checks}))


def leave_now() -> None:
    """End a script under :func:`two_ranks` once its rank is written, as ``freezekit run`` does under
    torchrun (see freezekit/cli/run.py): a gloo group still held (by a DDP wrapper, by FSDP's meshes
    in DTensor's caches) keeps its threads running, and tearing the interpreter down around them
    aborts a rank now and then ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another still talks to it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def two_ranks(script: Path, out: Path, *args: str) -> list[dict]:
    """Run ``script OUT ARGS`` under torchrun, 2 CPU processes; each rank's ``OUT/rank{R}.json``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(out), *args]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


class RunsCode:
    """Unpickling this touches ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, copied."""
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items() if t is not None}


def image_batch(n: int = 4, size: int = 32, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


class Tied(nn.Module):
    """An embedding tied to the output projection, as in language models."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.body(self.emb(x))))


class Shared(nn.Module):
    """One block object reachable under two names."""

    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.again = self.first
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.again(self.first(x)))


class ConvNet(nn.Module):
    """Conv/BN/dropout/linear, with every BatchNorm flavour a frozen-BN swap must handle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.sync = nn.SyncBatchNorm(8)
        self.body = nn.Sequential(nn.Conv3d(8, 8, 1), nn.BatchNorm3d(8))
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, x):
        x = self.sync(self.stem(x))
        x = self.body(x.unsqueeze(2)).squeeze(2)
        return self.head(self.drop(x.mean((2, 3))))


@pytest.fixture
def resnet18() -> nn.Module:
    return tv_resnet("resnet18")


@pytest.fixture
def vit() -> nn.Module:
    return timm_model("test_vit")


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# -- comparing two runs of the runner


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensors(value) -> list[torch.Tensor]:
    """Every tensor in a nested state dict, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def assert_same_run(expected: Path, got: Path) -> None:
    """The same checkpoints to the bit (weights, optimizer, scheduler, schedule), the same records."""
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp file
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(expected / "checkpoints" / name), load_checkpoint(got / "checkpoints" / name)
        assert (a["epoch"], a["step"], a["best"]) == (b["epoch"], b["step"], b["best"])
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
        ta, tb = tensors(a["optimizer"]), tensors(b["optimizer"])
        assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), name
        assert (a["scheduler"], a["schedule"], a["freezekit"]) == (b["scheduler"], b["schedule"], b["freezekit"])
    assert records(expected) == records(got)
    assert (expected / "summary.md").read_text() == (got / "summary.md").read_text()


def save_images(folder: Path, split, classes: list[str], keep: list[str] | None = None, name: str = "{i}.png") -> None:
    """The images of a ``shapes`` split as files, ``folder/CLASS/NAME`` (``name`` formatted with the
    image's number ``i``), those of the ``keep`` classes only when given."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(split.images, split.labels.tolist())):
        if keep is None or classes[label] in keep:
            (folder / classes[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / classes[label] / name.format(i=i),
                                                                 quality=95)
