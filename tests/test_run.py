"""freezekit run: trains, records, checkpoints atomically, and resumes to the same bits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_images
from typer.testing import CliRunner

import freezekit as fk
from freezekit.cli import app
from freezekit.recipe import load, loads
from freezekit.train.checkpoint import CheckpointError
from freezekit.train.checkpoint import load as load_checkpoint
from freezekit.train.run import RunError, run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

SMALL = """
name: small
seed: 3
model: {name: "timm:test_resnet"}
data: {image_size: 32, train_size: 192, val_size: 64, augment: true}
policy:
  - freeze: "*"
  - unfreeze: [layer4, fc]
schedule:
  - at: 1
    policy: [{unfreeze: layer3}]
    lr_mult: 0.5
optimizer: {lr: 3.0e-3, warmup_epochs: 0.5}
train: {epochs: 3, batch_size: 32}
"""


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / "last.pt")["model"]


def test_quickstart_trains_clearly_above_chance(tmp_path):
    result = runner.invoke(app, ["run", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(tmp_path / "q"),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    final = [r for r in records(tmp_path / "q") if r.get("split") == "val"][-1]
    assert final["epoch"] == 5 and final["accuracy"] > 0.75  # three classes: chance is a third


def test_run_directory_holds_everything(tmp_path):
    out = tmp_path / "run"
    result = run(loads(SMALL, "small.yaml"), output=out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "curves.png", "data.json", "data_config.json",
                                                     "metrics.jsonl", "model", "model-best", "recipe.yaml",
                                                     "summary.md"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    data = json.loads((out / "data.json").read_text())
    assert (data["train"]["images"], data["val"]["images"]) == (192, 64)
    assert data["classes"] == ["circle", "square", "triangle"]
    again = load(out / "recipe.yaml")
    assert again.model_dump() == loads(SMALL, "small.yaml").model_dump() | {"name": "small"}
    lines = records(out)
    assert [(r["epoch"], r["split"]) for r in lines if "split" in r] == \
        [(e, s) for e in range(3) for s in ("train", "val")]
    assert [r["phase"] for r in lines if r.get("event") == "phase"] == [0]
    assert all({"loss", "accuracy", "lr", "step"} <= set(r) for r in lines if "split" in r)
    text = (out / "summary.md").read_text()
    assert "## start, from epoch 0" in text and "## phase 0 (epoch 1), from epoch 1" in text
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert saved["epoch"] == 2 and saved["schedule"]["completed"] == 1
    assert fk.State.from_dict(saved["freezekit"]).parameters["layer3.0.conv1.weight"] == "trainable"
    assert result.best_accuracy == max(r["accuracy"] for r in lines if r.get("split") == "val")


def launch(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    (out.parent / "small.yaml").write_text(SMALL)
    return subprocess.Popen([sys.executable, "-m", "freezekit", "run", str(out.parent / "small.yaml"), "--output",
                             str(out), "--quiet", *extra], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended first: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def epoch_of(path: Path) -> int:
    try:
        return load_checkpoint(path)["epoch"]
    except CheckpointError:
        return -1


def test_killed_after_an_epoch_resumes_to_identical_weights(tmp_path):
    straight = tmp_path / "straight"
    run(loads(SMALL, "small.yaml"), output=straight, quiet=True)

    killed = tmp_path / "killed"
    # a pause before each checkpoint rename gives the test a moment to kill right after epoch 1's
    process = launch(killed, env={"FREEZEKIT_FAULT_CHECKPOINT_PAUSE": "0.5"})
    wait_for(lambda: epoch_of(killed / "checkpoints" / "last.pt") == 0, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = runner.invoke(app, ["run", str(tmp_path / "small.yaml"), "--output", str(killed), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in records(straight)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in records(killed)]


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    process = launch(out, env={"FREEZEKIT_FAULT_CHECKPOINT_PAUSE": "3"})
    last = out / "checkpoints" / "last.pt"
    wait_for(lambda: epoch_of(last) == 0, process)  # epoch 0 is written...
    wait_for(lambda: any(p.name.startswith(".last.pt.tmp") for p in last.parent.iterdir()), process)  # ...1 is being
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert epoch_of(last) == 0  # whole, and the one before
    result = runner.invoke(app, ["run", str(tmp_path / "small.yaml"), "--output", str(out), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert epoch_of(last) == 2
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = runner.invoke(app, ["run", str(tmp_path / "small.yaml"), "--output", str(out), "--resume"])
    assert result.exit_code == 0 and f"small has run all its 3 epochs ({last}): nothing to resume" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written  # nothing rewritten


@pytest.mark.parametrize("cache", ["true", "false"])
def test_cache_setting_is_honoured(cache, tmp_path):
    probe = SMALL.replace("unfreeze: [layer4, fc]", "unfreeze: fc").replace("augment: true", "augment: false")
    probe = probe.split("schedule:")[0] + "train: {epochs: 2, batch_size: 32}\n"
    run(loads(probe, overrides=[f"train.cache_features={cache}"]), output=tmp_path / "r", quiet=True)
    assert all(r["cached_features"] == (cache == "true") for r in records(tmp_path / "r") if "split" in r)


def test_cache_and_no_cache_reach_the_same_accuracy(tmp_path):
    probe = SMALL.replace("unfreeze: [layer4, fc]", "unfreeze: fc").replace("augment: true", "augment: false")
    probe = probe.split("schedule:")[0] + "train: {epochs: 4, batch_size: 32}\n"
    finals = {}
    for cache in ("true", "false"):
        run(loads(probe, overrides=[f"train.cache_features={cache}"]), output=tmp_path / cache, quiet=True)
        finals[cache] = [r for r in records(tmp_path / cache) if r.get("split") == "val"][-1]
    assert finals["true"]["accuracy"] == finals["false"]["accuracy"]
    assert finals["true"]["loss"] == pytest.approx(finals["false"]["loss"], rel=1e-4)
    with pytest.raises(RunError, match="cache_features: true, but the features cannot be cached: augmentation"):
        run(loads(probe, overrides=["train.cache_features=true", "data.augment=true"]), output=tmp_path / "x",
            quiet=True)


@pytest.mark.parametrize("name, head", [("test_resnet", "fc"), ("test_efficientnet", "classifier")])
def test_head_dropout_in_the_models_own_forward_keeps_the_features_uncached(name, head, tmp_path):
    """timm drops the pooled features with F.dropout in forward_head, outside any module: cached,
    the probe trained exactly as if drop_rate were 0."""
    def probe(drop_rate: float, cache: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{drop_rate}-{cache}"
        run(loads(f"""
seed: 2
model: {{name: "timm:{name}", kwargs: {{drop_rate: {drop_rate}}}}}
data: {{image_size: 32, train_size: 48, val_size: 16}}
policy: [{{freeze: "*"}}, {{unfreeze: {head}}}]
train: {{epochs: 2, batch_size: 16, cache_features: {cache}}}
""", "probe.yaml"), output=out, quiet=True)
        assert {r["cached_features"] for r in records(out) if "split" in r} == {cache == "auto" and drop_rate == 0}
        return weights(out)

    dropped, uncached = probe(0.5, "auto"), probe(0.5, "false")
    assert all(torch.equal(dropped[k], uncached[k]) for k in uncached)
    assert not torch.equal(dropped[f"{head}.weight"], probe(0.0, "auto")[f"{head}.weight"])  # it did drop


def test_attention_dropout_of_torchvision_vit_keeps_the_features_uncached():
    """nn.MultiheadAttention keeps its rate as a float, ``dropout``, and drops inside its forward."""
    import torchvision

    from freezekit.train.features import why_not_cacheable

    for rate, reason in ((0.0, None), (0.1, "encoder.layers.encoder_layer_0.self_attention (MultiheadAttention)")):
        with torch.device("meta"):
            vit = torchvision.models.vit_b_16(attention_dropout=rate, num_classes=3)
        fk.Policy(fk.freeze("*"), fk.unfreeze("heads")).apply(vit)
        said = why_not_cacheable(vit, augment=False)
        assert said == reason if reason is None else said.startswith(reason)


def test_runs_refuse_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    out = tmp_path / "r"
    recipe = loads(SMALL.replace("epochs: 3", "epochs: 1"), "small.yaml")
    run(recipe, output=out, quiet=True)
    with pytest.raises(RunError, match="already holds a run; resume it with --resume"):
        run(recipe, output=out, quiet=True)
    with pytest.raises(RunError, match="--resume: no checkpoint"):
        run(recipe, output=tmp_path / "empty", resume=True, quiet=True)
    with pytest.raises(RunError, match=r"the recipe changed since .* \(optimizer\)"):
        run(loads(SMALL.replace("epochs: 3", "epochs: 1").replace("3.0e-3", "1.0e-3"), "small.yaml"), output=out,
            resume=True, quiet=True)


def test_a_foreign_checkpoint_is_refused(tmp_path):
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"not a torch file at all")
    result = runner.invoke(app, ["run", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(out), "--resume"])
    assert result.exit_code == 1 and "cannot be read" in result.output and "Traceback" not in result.output


def test_image_folder_data_and_a_local_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from freezekit.train.data import shapes

    train, val, classes = shapes(image_size=24, train_size=24, val_size=12, seed=1)
    for split_name, split in (("train", train), ("val", val)):
        save_images(tmp_path / "data" / split_name, split, classes)
    import timm

    source = timm.create_model("test_resnet", pretrained=False, num_classes=7)  # another head: not loaded
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "start.safetensors")
    recipe = loads(f"""
model: {{name: "timm:test_resnet", checkpoint: "{tmp_path / 'start.safetensors'}"}}
data: {{kind: image_folder, path: "{tmp_path / 'data'}", image_size: 32}}
policy: [{{freeze: "*"}}, {{unfreeze: fc}}]
train: {{epochs: 1, batch_size: 8}}
""", "folder.yaml")
    result = run(recipe, output=tmp_path / "out", quiet=True)
    assert result.epochs == 1
    saved = weights(tmp_path / "out")
    assert torch.equal(saved["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])
    assert saved["fc.weight"].shape[0] == 3  # the data's classes, not the checkpoint's seven
