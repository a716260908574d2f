"""Faults: a run killed anywhere resumes to the same bits; a full disk, a bad checkpoint and a
diverging loss each stop it with one clear line, the last good checkpoint intact.

The kills are real: ``python -m freezekit run`` subprocesses that send themselves SIGKILL at the
point named by ``FREEZEKIT_FAULT_KILL_AT`` (see :mod:`freezekit.train.faults`), then resumed with
``--resume``. Every run here uses one intra-op thread, so that all of them compute the same bits.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import RunsCode, assert_same_run
from typer.testing import CliRunner

import freezekit.train.checkpoint as ckpt
import freezekit.train.objective as objective_module
import freezekit.train.records as records_module
from freezekit.cli import app
from freezekit.recipe import load
from freezekit.train.checkpoint import load as load_checkpoint
from freezekit.train.run import run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gradual_unfreeze.yaml"  # phases at epochs 1 and 2: layer4, then layer3 thaws
TINY = ["data.image_size=16", "data.train_size=96", "data.val_size=32", "train.epochs=3", "train.batch_size=16"]
STEPS_PER_EPOCH, EPOCHS = 6, 3
SETS = [arg for value in TINY for arg in ("--set", value)]
cli = CliRunner()

_rng = random.Random(0)  # a step of the first epoch (before any checkpoint) and one of a later epoch
STEPS = [_rng.randrange(STEPS_PER_EPOCH), _rng.randrange(STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH)]
KILL_POINTS = [f"step:{s}" for s in STEPS] + ["checkpoint:1", "phase:1"]  # and phase:0 below


def freezekit_run(out: Path, *extra: str, env: dict[str, str] | None = None,
                  preexec_fn=None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FREEZEKIT_FAULT")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "freezekit", "run", str(RECIPE), *SETS, "--output", str(out),
                           "--quiet", *extra], env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec_fn)


def invoke(out: Path, *extra: str):
    return cli.invoke(app, ["run", str(RECIPE), *SETS, "--output", str(out), "--quiet", *extra])


def one_line_error(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here as in the subprocesses: the same kernels, so the same bits, and no
    thread waiting for another on a busy two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight(one_thread, tmp_path_factory) -> Path:
    """The same recipe, never interrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(load(RECIPE, TINY), output=out, quiet=True)
    return out


# -- SIGKILL anywhere, then --resume


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_anywhere_resumes_to_identical_weights(point, straight, tmp_path):
    out = tmp_path / "run"
    killed = freezekit_run(out, env={"FREEZEKIT_FAULT_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it reached the point, and died there
    result = invoke(out, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_run(straight, out)


def test_killed_twice_resumes_to_identical_weights(straight, tmp_path):
    out = tmp_path / "run"
    assert freezekit_run(out, env={"FREEZEKIT_FAULT_KILL_AT": "phase:0"}).returncode == -signal.SIGKILL
    killed = freezekit_run(out, "--resume", env={"FREEZEKIT_FAULT_KILL_AT": "checkpoint:2"})
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())  # killed mid-write
    result = invoke(out, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_run(straight, out)


# -- a full disk


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left."""

    room = 1000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    writes = []

    def filling_open(file, mode="r", *args, **kwargs):  # the disk fills up after epoch 0's checkpoints
        if "w" in mode:
            writes.append(file)
            if len(writes) > 2:
                return _FullDisk(file, "wb")
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt, "open", filling_open, raising=False)
    out = tmp_path / "run"
    result = invoke(out)
    assert result.exit_code == 1
    line = one_line_error(result.output)
    failed = Path(writes[2]).parent / Path(writes[2]).name.split(".tmp-")[0].lstrip(".")
    assert f"checkpoint {failed} could not be written (the disk is full)" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp file
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 0
    assert load_checkpoint(out / "checkpoints" / "best.pt")["epoch"] in (0, 1)
    monkeypatch.undo()
    result = invoke(out, "--resume")  # room again: the run goes on
    assert result.exit_code == 0, result.output


def test_a_file_size_limit_stops_the_run_with_one_line(tmp_path):
    def limit() -> None:  # the kernel refuses any file over 1 MB: a checkpoint is ~3 MB
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "run"
    result = freezekit_run(out, preexec_fn=limit)
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert f"checkpoint {out / 'checkpoints'}" in line and "could not be written (File too large)" in line
    assert list((out / "checkpoints").iterdir()) == []  # no partial file left


def test_a_full_disk_while_recording_metrics_is_one_line(tmp_path, monkeypatch):
    def full_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(records_module, "open", full_open, raising=False)
    result = invoke(tmp_path / "run")
    assert result.exit_code == 1
    assert str(tmp_path / "run" / "metrics.jsonl") in one_line_error(result.output)


# -- bad checkpoints on --resume


def _corrupt(kind: str, path: Path, marker: Path) -> None:
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("epoch: 2\nweights: fine\n")
    elif kind == "plain dict":
        torch.save({"weights": torch.zeros(3), "epoch": 2}, path)
    elif kind == "weights only":
        torch.save(load_checkpoint(path)["model"], path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "pickled code":
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"epoch": 2, "code": RunsCode(marker)}))
    elif kind == "torch file with code":
        torch.save({"model": RunsCode(marker)}, path)
    elif kind == "incomplete":
        torch.save({"format": "freezekit-run", "version": 1, "epoch": 2}, path)
    elif kind == "newer version":
        torch.save({**load_checkpoint(path), "version": 99}, path)


BAD = {
    "truncated": "cannot be read", "empty": "cannot be read", "text": "cannot be read",
    "plain dict": "is not a freezekit run checkpoint", "weights only": "is not a freezekit run checkpoint",
    "tensor": "holds a Tensor, not a freezekit checkpoint",
    "pickled code": "holds pickled Python objects, which could run code; refused",
    "pickle": "cannot be read (not a torch file)",  # protocol 4: torch stops at its first frame
    "torch file with code": "holds pickled Python objects, which could run code; refused",
    "incomplete": "is incomplete", "newer version": "version 99",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_checkpoint_is_refused_on_resume(kind, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    last = out / "checkpoints" / "last.pt"
    _corrupt(kind, last, tmp_path / "pwned")
    result = invoke(out, "--resume")
    assert result.exit_code == 1
    line = one_line_error(result.output)
    assert str(last) in line and BAD[kind] in line
    assert not (tmp_path / "pwned").exists()


# -- a loss that is not a number


def _poisoned(value: float, at: int):
    """``F`` for the runner, with the training loss of step ``at`` replaced by ``value``."""
    calls = []

    def cross_entropy(logits, labels, **kwargs):
        loss = F.cross_entropy(logits, labels, **kwargs)
        if kwargs.get("reduction") != "sum":  # training; evaluation sums
            calls.append(1)
            if len(calls) == at + 1:
                return loss * 0 + value
        return loss

    return SimpleNamespace(cross_entropy=cross_entropy)


@pytest.mark.parametrize(("value", "step"), [(float("nan"), 3), (float("inf"), STEPS_PER_EPOCH + 2)])
def test_a_loss_that_is_not_a_number_stops_the_run(value, step, tmp_path, monkeypatch):
    monkeypatch.setattr(objective_module, "F", _poisoned(value, step))
    out = tmp_path / "run"
    result = invoke(out)
    assert result.exit_code == 1
    line = one_line_error(result.output)
    epoch = step // STEPS_PER_EPOCH
    assert f"the loss is {value} at epoch {epoch} step {step}; " in line
    last = out / "checkpoints" / "last.pt"
    if epoch == 0:
        assert "no checkpoint was written yet" in line and not last.exists()
    else:
        assert f"the last good checkpoint is {last}" in line
        saved = load_checkpoint(last)
        assert saved["epoch"] == epoch - 1 and all(torch.isfinite(t).all() for t in saved["model"].values())


@pytest.mark.parametrize(("lr", "message"), [
    ("1e30", r"the loss is nan at epoch 0 step \d+; no checkpoint was written yet"),
    ("1e8", r"the validation loss is nan after epoch 0 step 6; no checkpoint was written yet"),
    ("1e4", r"the loss is (inf|nan) at epoch 1 step \d+; the last good checkpoint is .*last\.pt"),
])
def test_a_diverging_run_stops_before_saving_a_bad_checkpoint(lr, message, tmp_path):
    out = tmp_path / "run"
    result = invoke(out, "--set", f"optimizer.lr={lr}")
    assert result.exit_code == 1
    line = one_line_error(result.output)
    assert re.search(message, line), line
    for path in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values())
