"""The runner's streamed data: the order and sharding of batches, the model's own preprocessing,
exact resume with decoding workers, unreadable images, CIFAR batches, and the exported model."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import assert_same_run, records, save_images, two_ranks
from PIL import Image
from typer.testing import CliRunner

from freezekit.cli import app
from freezekit.recipe import loads
from freezekit.train.data import shapes
from freezekit.train.loader import EpochBatches, batches
from freezekit.train.preprocess import data_config
from freezekit.train.run import RunError, run
from freezekit.train.sources import image_folder

cli = CliRunner()
DIST = Path(__file__).parent / "dist"


def shapes_folder(root: Path, train: int = 48, val: int = 24, size: int = 40, split: bool = True) -> Path:
    """The built-in shapes as an image folder of JPEGs (train/ and val/, or one folder of classes)."""
    train_set, val_set, classes = shapes(image_size=size, train_size=train, val_size=val, seed=3)
    for split_name, part in (("train", train_set), ("val", val_set)):
        save_images(root / split_name if split else root, part, classes, name=split_name + "{i:03d}.jpg")
    return root


def folder_recipe(data: Path, *extra: str) -> str:
    return "\n".join([
        'model: {name: "timm:test_resnet"}',
        f'data: {{kind: image_folder, path: "{data}", image_size: 32, augment: true, auto_augment: rand-m9-mstd0.5,'
        ' workers: 2}',
        'policy: [{freeze: "*"}, {unfreeze: [layer4, fc]}]',
        "schedule: [{at: 1, policy: [{unfreeze: layer3}]}]",
        "train: {epochs: 2, batch_size: 8, checkpoint_every: 2}",
        *extra])


# -- order and sharding


def test_an_epoch_started_mid_way_yields_only_the_batches_after_that_point():
    sampler = EpochBatches(37, 5, seed=4)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3  # keys before it are never asked for
    assert sorted(i for batch in full for i, _ in batch) == list(range(37))
    sampler.set_epoch(3)
    assert [i for i, _ in next(iter(sampler))] != [i for i, _ in full[0]]  # another epoch, another order
    assert {seed for batch in full for _, seed in batch} != {seed for batch in sampler for _, seed in batch}


def test_a_training_epoch_leaves_out_a_last_batch_of_one_image(tmp_path):
    """BatchNorm cannot train on one image pooled to 1x1: a run on 17 images in batches of 8 stopped
    after its first epoch. Another image is left out each epoch; validation reads every image."""
    left_out = set()
    for epoch in range(4):
        sampler = EpochBatches(17, 8, seed=0)
        sampler.set_epoch(epoch)
        seen = [i for batch in sampler for i, _ in batch]
        assert len(sampler) == 2 and len(seen) == 16 and len(set(seen)) == 16
        left_out |= set(range(17)) - set(seen)
    assert len(left_out) > 1
    assert [len(b) for b in batches(18, 8, 0, 0)] == [8, 8, 2] and [len(b) for b in batches(1, 8, 0, 0)] == [1]
    assert [len(b) for b in batches(17, 8, 0, 0, shuffle=False)] == [8, 8, 1]
    assert [len(b) for b in batches(33, 8, 0, 0, rank=1, world=2)] == [8, 8]  # 17 a rank: as many steps on each
    recipe = loads('model: {name: "timm:test_resnet"}\ndata: {image_size: 32, train_size: 17, val_size: 5}\n'
                   "train: {epochs: 2, batch_size: 8}\n", "17.yaml")
    run(recipe, output=tmp_path / "run", quiet=True)  # raised in epoch 0 when it trained on the 17th image alone
    assert [r["epoch"] for r in records(tmp_path / "run") if r.get("split") == "train"] == [0, 1]


@pytest.mark.parametrize("n", [40, 43])
def test_two_ranks_cover_every_image_once_per_epoch_as_distributed_sampler_does(n):
    for epoch in range(2):
        ranks = [[i for b in batches(n, 4, 0, epoch, rank=r, world=2) for i in b.tolist()] for r in range(2)]
        sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=2, rank=0, shuffle=False)
        assert len(ranks[0]) == len(ranks[1]) == len(sampler)
        seen = ranks[0] + ranks[1]
        assert sorted(set(seen)) == list(range(n)) and len(seen) - n == n % 2  # one image twice when odd


def test_two_torchrun_ranks_decode_every_image_of_a_folder_once_per_epoch(tmp_path):
    data = shapes_folder(tmp_path / "data", train=30, val=6)
    reports = two_ranks(DIST / "shard_app.py", tmp_path / "out", str(data))
    for epoch in ("0", "1"):
        seen = [p for r in reports for p in r["epochs"][epoch]]
        assert len(seen) == 30 and len(set(seen)) == 30  # every training image once, on one rank
        assert set(reports[0]["epochs"][epoch]).isdisjoint(reports[1]["epochs"][epoch])
    assert reports[0]["epochs"]["0"] != reports[0]["epochs"]["1"]


# -- the model's own preprocessing


def recipe_for(model: str, data: str = "{kind: shapes}"):
    return loads(f'model: {{name: "{model}"}}\ndata: {data}\n', "r.yaml")


def test_the_preprocessing_is_the_models_own_unless_the_recipe_says_otherwise(tmp_path):
    shapes_folder(tmp_path / "d", train=3, val=3)
    folder = f'{{kind: image_folder, path: "{tmp_path / "d"}"}}'
    timm_recipe = recipe_for("timm:test_resnet", folder)
    cfg = data_config(timm_recipe, timm.create_model("test_resnet", pretrained=False))
    assert cfg == {"input_size": [3, 160, 160], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                   "crop_pct": 0.95, "crop_mode": "center"}
    import torchvision

    tv = recipe_for("torchvision:resnet18", folder)
    cfg = data_config(tv, torchvision.models.resnet18())
    assert (cfg["input_size"], cfg["interpolation"], cfg["crop_pct"]) == ([3, 224, 224], "bilinear", 224 / 256)
    assert cfg["mean"] == [0.485, 0.456, 0.406]
    custom = recipe_for("timm:test_resnet", f'{{kind: image_folder, path: "{tmp_path / "d"}", image_size: 96, '
                                            'mean: [0.1, 0.2, 0.3], crop_pct: 1.0, interpolation: bicubic}')
    cfg = data_config(custom, timm.create_model("test_resnet", pretrained=False))
    assert (cfg["input_size"], cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]) == \
        ([3, 96, 96], [0.1, 0.2, 0.3], [0.5] * 3, 1.0, "bicubic")


def test_evaluation_keeps_the_aspect_ratio_and_crops_the_centre(tmp_path):
    from freezekit.train.preprocess import transforms

    recipe = recipe_for("timm:test_resnet")
    cfg = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3,
           "crop_pct": 1.0, "crop_mode": "center"}
    _, evaluate = transforms(cfg, recipe)
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, 32:64] = 255  # a white square in the middle third: all that is left after a centre crop
    out = evaluate(Image.fromarray(wide))
    assert out.shape == (3, 32, 32) and out.min() > 0.95


# -- exact resume with workers, mid-epoch


def test_a_run_killed_mid_epoch_with_workers_resumes_to_the_same_weights_as_one_without(tmp_path):
    data = shapes_folder(tmp_path / "data")
    (tmp_path / "r.yaml").write_text(folder_recipe(data).replace(  # every kind of draw: crops, policy, mixing,
        "workers: 2}", "workers: 2, mixup: 0.2, cutmix: 1.0}").replace(  # and dropout, from the global generator
        '"timm:test_resnet"}', '"timm:test_resnet", kwargs: {drop_rate: 0.3}}'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEZEKIT_FAULT")} | {"OMP_NUM_THREADS": "1"}

    def freezekit(out: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "freezekit", "run", str(tmp_path / "r.yaml"), "--output",
                               str(tmp_path / out), "--quiet", *args], env={**env, **extra}, capture_output=True,
                              text=True, timeout=300)

    assert freezekit("straight", "--set", "data.workers=0").returncode == 0
    killed = freezekit("killed", FREEZEKIT_FAULT_KILL_AT="step:8")  # epoch 1 (6 steps each), after its checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 2)  # written mid-epoch, at step 8
    resumed = freezekit("killed", "--resume", "--set", "data.workers=0")  # the workers may differ too
    assert resumed.returncode == 1 and "recipe changed" in resumed.stderr  # ...but only as the recipe says
    resumed = freezekit("killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = tmp_path / "straight"
    recipe = straight / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("workers: 0", "workers: 2"))
    assert_same_run(straight, tmp_path / "killed")


# -- unreadable images


def test_an_unreadable_image_is_named_by_its_path_or_skipped_as_the_recipe_says(tmp_path):
    data = shapes_folder(tmp_path / "data", train=15, val=8)
    bad = data / "train" / "circle" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "r.yaml").write_text(folder_recipe(data).replace("epochs: 2", "epochs: 1"))
    result = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "fail"), "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output
    assert f"cannot read {bad}" in lines[0] and "data.on_error: skip" in lines[0]
    result = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "skip"), "--quiet",
                              "--set", "data.on_error=skip"])
    assert result.exit_code == 0, result.output
    skipped = [r for r in records(tmp_path / "skip") if r.get("event") == "skipped"]
    assert [r["path"] for r in skipped] == [str(bad)]
    train = next(r for r in records(tmp_path / "skip") if r.get("split") == "train")
    assert train["accuracy"] * 15 == round(train["accuracy"] * 15)  # over the 15 readable images, not 16



def test_a_run_stops_its_decoding_workers_when_it_returns_or_fails(tmp_path):
    """Kept from epoch to epoch, the workers must not outlive the run in the calling process (a
    notebook, a sweep), even while the error that stopped it is held, and its traceback with it."""
    data = shapes_folder(tmp_path / "data", train=15, val=8)
    recipe = loads(folder_recipe(data).replace("epochs: 2", "epochs: 1"), "r.yaml")
    before = set(multiprocessing.active_children())
    run(recipe, output=tmp_path / "done", quiet=True)
    assert set(multiprocessing.active_children()) == before
    (data / "train" / "circle" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(RunError, match="cannot read") as failed:
        run(recipe, output=tmp_path / "failed", quiet=True)
    assert failed.traceback and set(multiprocessing.active_children()) == before


# -- data kinds


def test_one_folder_of_classes_is_split_by_a_seeded_fraction(tmp_path):
    data = shapes_folder(tmp_path / "data", train=60, val=0, split=False)
    train, val, classes = image_folder(data, 0.25, seed=7)
    assert classes == ["circle", "square", "triangle"] and len(train) + len(val) == 60
    assert not {p for p, _ in train} & {p for p, _ in val}
    for label in range(3):  # a quarter of each class
        total = sum(1 for _, y in train + val if y == label)
        assert sum(1 for _, y in val if y == label) == round(total * 0.25)
    assert image_folder(data, 0.25, seed=7) == (train, val, classes)
    assert image_folder(data, 0.25, seed=8)[1] != val


def test_a_folder_changed_since_the_run_is_refused_by_resume_and_by_eval(tmp_path):
    """One image more redraws the val_fraction split: resumed, the run would train on images it
    validated on, and eval would report on another split, both without a word."""
    data = shapes_folder(tmp_path / "data", train=30, val=0, split=False)
    (tmp_path / "r.yaml").write_text(folder_recipe(data, "").replace("path:", "val_fraction: 0.25, path:")
                                     .replace("epochs: 2", "epochs: 1").replace("workers: 2", "workers: 0"))
    run_dir = tmp_path / "run"

    def freezekit(*args: str):
        return cli.invoke(app, [*args, "--quiet"] if args[0] == "run" else args)

    assert freezekit("run", str(tmp_path / "r.yaml"), "--output", str(run_dir)).exit_code == 0
    assert freezekit("run", str(tmp_path / "r.yaml"), "--output", str(run_dir), "--resume").exit_code == 0
    assert freezekit("eval", str(run_dir), "--workers", "0").exit_code == 0
    records = (run_dir / "metrics.jsonl").read_text()

    def refused(said: str) -> None:
        result = freezekit("run", str(tmp_path / "r.yaml"), "--output", str(run_dir), "--resume")
        assert result.exit_code == 1 and len(result.output.splitlines()) == 1 and "Traceback" not in result.output
        assert f"data.path: {data}: its images changed since {run_dir / 'checkpoints' / 'last.pt'}" in result.output
        assert said in result.output and (run_dir / "metrics.jsonl").read_text() == records

    before = [len(split) for split in image_folder(data, 0.25, 0)[:2]]
    save_images(data, shapes(40, 3, 1, seed=9)[0], ["circle", "square", "triangle"], name="new{i}.jpg")
    now = [len(split) for split in image_folder(data, 0.25, 0)[:2]]
    refused(f"train: {before[0]} -> {now[0]} images; val: {before[1]} -> {now[1]} images")
    for added in data.rglob("new*.jpg"):
        added.unlink()
    first = sorted((data / "circle").iterdir())[0]
    first.rename(first.with_name("zz" + first.name))  # as many images, one under another name
    refused("train: other images or labels, as many")
    result = freezekit("eval", str(run_dir), "--workers", "0")
    assert result.exit_code == 1 and "its validation split is not the run's; give --data PATH" in result.output


def test_a_val_fraction_that_rounds_to_no_image_is_named(tmp_path):
    data = shapes_folder(tmp_path / "data", train=8, val=0, split=False)
    (tmp_path / "r.yaml").write_text(folder_recipe(data).replace("path:", "val_fraction: 0.1, path:"))
    result = cli.invoke(app, ["run", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1 and "Traceback" not in result.output
    assert f"data.val_fraction: 0.1 of each class in '{data}' rounds to no image" in result.output


def _cifar(root: Path, marker: Path | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 8).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return root


def test_cifar_python_batches_are_read_from_a_local_folder(tmp_path):
    root = _cifar(tmp_path / "cifar")
    recipe = loads(f'model: {{name: "timm:test_resnet"}}\ndata: {{kind: cifar10, path: "{root}", image_size: 32}}\n'
                   'policy: [{freeze: "*"}, {unfreeze: fc}]\ntrain: {epochs: 1, batch_size: 16}\n', "c.yaml")
    result = run(recipe, output=tmp_path / "run", quiet=True)
    assert result.epochs == 1
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["label_names"][:3] == ["airplane", "automobile", "bird"] and config["num_classes"] == 10
    val = [r for r in records(tmp_path / "run") if r.get("split") == "val"]
    assert len(val) == 1 and 0 <= val[0]["accuracy"] <= 1


def test_a_cifar_file_that_would_run_code_is_refused(tmp_path):
    from conftest import RunsCode

    root = _cifar(tmp_path / "cifar")
    marker = tmp_path / "ran"
    (root / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({b"label_names": RunsCode(marker)}))
    (tmp_path / "c.yaml").write_text(f'model: {{name: "timm:test_resnet"}}\ndata: {{kind: cifar10, path: "{root}"}}\n')
    result = cli.invoke(app, ["check", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1 and "data.path" in result.output and "no readable cifar10" in result.output
    assert not marker.exists()


# -- what a run leaves


def test_the_exported_model_reloads_through_timm_and_reproduces_the_validation_accuracy(tmp_path):
    from timm.data import create_transform, resolve_data_config

    data = shapes_folder(tmp_path / "data")
    recipe = loads(folder_recipe(data).replace("checkpoint_every: 2", "checkpoint_every: null"), "r.yaml")
    run(recipe, output=tmp_path / "run", quiet=True)
    model = timm.create_model(f"local-dir:{tmp_path / 'run' / 'model'}", pretrained=True).eval()
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and model.pretrained_cfg["label_names"] == ["circle", "square",
                                                                                           "triangle"]
    transform = create_transform(**config)
    files = sorted((data / "val").rglob("*.jpg"))
    labels = torch.tensor([model.pretrained_cfg["label_names"].index(f.parent.name) for f in files])
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    last = [r for r in records(tmp_path / "run") if r.get("split") == "val"][-1]
    assert accuracy == pytest.approx(last["accuracy"], abs=1e-9)


def test_curves_png_is_a_plot_of_the_run(tmp_path):
    recipe = loads('model: {name: "timm:test_resnet"}\ndata: {train_size: 64, val_size: 32, image_size: 24}\n'
                   'policy: [{freeze: "*"}, {unfreeze: fc}]\nschedule: [{at: 1, policy: [{unfreeze: layer4}]}]\n'
                   'train: {epochs: 2, batch_size: 16}\n', "c.yaml")
    run(recipe, output=tmp_path / "run", quiet=True)
    with Image.open(tmp_path / "run" / "curves.png") as png:
        assert png.format == "PNG" and png.width > 400 and len(png.convert("RGB").getcolors(1 << 20)) > 10
    from freezekit.train.curves import curves_figure

    figure = curves_figure(records(tmp_path / "run"))
    loss = figure.axes[0]
    val = [r["loss"] for r in records(tmp_path / "run") if r.get("split") == "val"]
    assert any(list(line.get_ydata()) == val for line in loss.get_lines())


def test_a_linear_probe_on_an_image_folder_is_the_same_with_cached_features(tmp_path):
    data = shapes_folder(tmp_path / "data", train=32, val=16)
    probe = folder_recipe(data).replace("augment: true, auto_augment: rand-m9-mstd0.5,", "augment: false,")
    probe = probe.replace("{unfreeze: [layer4, fc]}", "{unfreeze: fc}").replace(
        "schedule: [{at: 1, policy: [{unfreeze: layer3}]}]", "")
    finals = {}
    for cache in ("true", "false"):
        run(loads(probe, overrides=[f"train.cache_features={cache}"]), output=tmp_path / cache, quiet=True)
        finals[cache] = [r for r in records(tmp_path / cache) if r.get("split") == "val"]
        assert all(r["cached_features"] == (cache == "true") for r in finals[cache])
    assert [r["accuracy"] for r in finals["true"]] == [r["accuracy"] for r in finals["false"]]
    assert finals["true"][-1]["loss"] == pytest.approx(finals["false"][-1]["loss"], rel=1e-4)


def test_a_phase_that_drops_the_feature_cache_mid_epoch_reads_images_from_that_step_on(tmp_path):
    recipe = loads('model: {name: "timm:test_resnet"}\ndata: {train_size: 64, val_size: 32, image_size: 24}\n'
                   'policy: [{freeze: "*"}, {unfreeze: fc}]\n'
                   'schedule: [{at: 3, unit: step, policy: [{unfreeze: layer4}]}]\n'
                   'train: {epochs: 2, batch_size: 16}\n', "p.yaml")  # 4 steps an epoch: cached for 3 of them
    run(recipe, output=tmp_path / "run", quiet=True)
    events = records(tmp_path / "run")
    assert [(r["epoch"], r["step"]) for r in events if r.get("event") == "phase"] == [(0, 3)]
    assert [r["cached_features"] for r in events if r.get("split") == "train"] == [False, False]
    assert all(r["loss"] == r["loss"] for r in events if "split" in r)  # finite, not NaN
