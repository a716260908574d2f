"""Precision, memory format and compilation in ``freezekit run``, on the CPU: fp16 resumes to the
same bits (its gradient scaler saved and restored), bf16 and fp16 run the forward under autocast,
channels_last trains the same model and exports one timm loads, and ``torch.compile`` recompiles
when a phase changes what trains.

The probes are models named in the recipe as ``test_precision:FACTORY`` (this module, let in with
``allow_import``): the runner builds them as it builds any model, and they report from inside the
run. Every run here uses one intra-op thread, like the killed subprocess, so that all compute the
same bits.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn as nn
from conftest import snapshot

from freezekit.recipe import load, loads
from freezekit.train.checkpoint import load as load_checkpoint
from freezekit.train.run import run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"  # layer2, layer3, layer4 and fc train
SMALL = ["data.image_size=32", "data.train_size=64", "data.val_size=32", "train.epochs=2", "train.batch_size=16",
         "train.device=cpu"]  # 4 steps an epoch; on the CPU even where a GPU is
CHANNELS_LAST = torch.channels_last

SEEN: list[dict[str, Any]] = []  # what probed_resnet's convolution saw, one entry per training forward
BUILT: dict[str, Any] = {}  # the model tiny_net built last, and its weights then


def probed_resnet(num_classes: int) -> nn.Module:
    """timm's test_resnet, reporting the dtype and memory format its ``layer2.0.conv2`` trains in."""
    model = timm.create_model("test_resnet", num_classes=num_classes)

    def seen(conv: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # a training step, not evaluation
            SEEN.append({"dtype": output.dtype, "weight": conv.weight.is_contiguous(memory_format=CHANNELS_LAST),
                         "output": output.is_contiguous(memory_format=CHANNELS_LAST)})

    model.layer2[0].conv2.register_forward_hook(seen)
    return model


def tiny_net(num_classes: int) -> nn.Module:
    """Two convolutions and a head: inductor compiles it in seconds on a CPU (test_resnet: a minute)."""
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, stride=2, padding=1), act=nn.ReLU(), body=nn.Conv2d(8, 8, 3, padding=1),
        act2=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, num_classes)))
    BUILT.update(model=model, initial=snapshot(model))  # the recipe check builds one on meta first
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def final(out: Path) -> dict[str, Any]:
    return load_checkpoint(out / "checkpoints" / "last.pt")


def test_fp16_trains_and_a_killed_run_resumes_to_the_same_bits(tmp_path):
    sets = [*SMALL, "train.precision=fp16", "train.checkpoint_every=3"]  # a mid-epoch checkpoint at step 6
    straight = run(load(QUICKSTART, sets), output=tmp_path / "straight", quiet=True)
    assert all(math.isfinite(straight.final[split]["loss"]) for split in ("train", "val"))

    killed = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEZEKIT_FAULT")}
    done = subprocess.run([sys.executable, "-m", "freezekit", "run", str(QUICKSTART),
                           *[a for s in sets for a in ("--set", s)], "--output", str(killed), "--quiet"],
                          env=env | {"OMP_NUM_THREADS": "1", "FREEZEKIT_FAULT_KILL_AT": "step:6"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (final(killed)["epoch"], final(killed)["batch"]) == (1, 2)  # epoch 1, two of its four batches done
    run(load(QUICKSTART, sets), output=killed, resume=True, quiet=True)

    a, b = final(tmp_path / "straight"), final(killed)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # a scaler not restored would count its good steps from the resume on, not from the start
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 8


@pytest.mark.parametrize(("precision", "channels_last", "dtype"), [
    ("fp32", False, torch.float32), ("bf16", False, torch.bfloat16), ("fp16", False, torch.float16),
    ("fp32", True, torch.float32)])
def test_the_forward_trains_in_the_precision_and_memory_format_asked(precision, channels_last, dtype, tmp_path):
    SEEN.clear()
    sets = [*SMALL, "model.name=test_precision:probed_resnet", "train.epochs=1", f"train.precision={precision}",
            f"train.channels_last={str(channels_last).lower()}"]
    result = run(load(QUICKSTART, sets), output=tmp_path / "r", quiet=True, allow_import=["test_precision"])
    assert math.isfinite(result.final["val"]["loss"])
    assert len(SEEN) == 4  # one epoch of four steps
    assert {(s["dtype"], s["weight"], s["output"]) for s in SEEN} == {(dtype, channels_last, channels_last)}


def test_channels_last_trains_the_same_model_and_exports_one_timm_loads(tmp_path):
    results, weights = {}, {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        results[flag] = run(load(QUICKSTART, [*SMALL, f"train.channels_last={flag}"]), output=out, quiet=True)
        weights[flag] = final(out)["model"]
    assert weights["true"]["layer2.0.conv2.weight"].is_contiguous(memory_format=CHANNELS_LAST)
    assert weights["true"].keys() == weights["false"].keys()
    for name, value in weights["true"].items():  # other kernels, other rounding: close, not equal
        torch.testing.assert_close(value, weights["false"][name], rtol=1e-4, atol=1e-4, msg=name)
    assert results["true"].final["val"]["accuracy"] == pytest.approx(results["false"].final["val"]["accuracy"],
                                                                     abs=0.1)

    model = timm.create_model("local-dir:" + str(tmp_path / "true" / "model"), pretrained=True)
    exported = model.state_dict()
    assert exported.keys() == weights["true"].keys()
    assert all(torch.equal(exported[k], v) for k, v in weights["true"].items())


def test_compile_recompiles_when_a_phase_unfreezes(tmp_path):
    recipe = """
model: {name: "test_precision:tiny_net"}
data: {image_size: 32, train_size: 64, val_size: 32}
policy: [{freeze: "*"}, {unfreeze: fc}]
schedule:
  - at: 1                         # epoch 1: body trains too; stem never does
    policy: [{unfreeze: body}]
train: {epochs: 2, batch_size: 16, device: cpu, compile: COMPILE,
        cache_features: false}    # the compiled model, not cached features, trains the head in epoch 0
"""
    torch._dynamo.reset()
    ends = {}
    for compile_ in ("true", "false"):
        result = run(loads(recipe.replace("COMPILE", compile_)), output=tmp_path / compile_, quiet=True,
                     allow_import=["test_precision"])
        assert all(math.isfinite(result.final[split]["loss"]) for split in ("train", "val"))
        ends[compile_] = final(tmp_path / compile_)["model"]
        initial = BUILT["initial"]  # what body holds when the phase unfreezes it: it was frozen until then
        assert torch.equal(ends[compile_]["stem.weight"], initial["stem.weight"])
        assert not torch.equal(ends[compile_]["fc.weight"], initial["fc.weight"])
        # a compiled graph kept from epoch 0 would give body no gradient, and leave it as it was
        assert not torch.equal(ends[compile_]["body.weight"], initial["body.weight"]), compile_
    torch._dynamo.reset()
    for name, value in ends["true"].items():  # inductor's kernels round differently from eager's
        torch.testing.assert_close(value, ends["false"][name], rtol=1e-4, atol=1e-5, msg=name)
