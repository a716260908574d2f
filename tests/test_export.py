"""The exported model: timm and torchvision load it by themselves, with its data config and class
names, and give the fine-tuned model's outputs exactly; ``freezekit predict`` reads it."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from conftest import timm_model, tv_resnet
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import freezekit as fk
from freezekit.cli import app
from freezekit.norm import FrozenBatchNorm
from freezekit.train.export import CONFIG, WEIGHTS, export, load

CLASSES = ["circle", "square", "triangle"]


def preprocessing(size: int) -> dict:
    """A data config as the runner resolves it (JSON-ready lists)."""
    return {"input_size": [3, size, size], "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "crop_pct": 1.0, "crop_mode": "squash"}
runner = CliRunner()


def _fine_tuned(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every weight and BatchNorm statistic moved, then frozen as a run freezes it."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "running_var" in name:  # stays positive
                tensor.add_(torch.rand_like(tensor) * 0.1)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
    fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze("fc")).apply(model)
    assert any(isinstance(m, FrozenBatchNorm) for m in model.modules())
    return model.eval()


@pytest.fixture
def batch():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_timm_export_loads_in_timm_alone_with_the_same_outputs(tmp_path, batch):
    model = _fine_tuned(timm_model("test_resnet", num_classes=3))
    expected = model(batch)
    folder = export(torch.compile(model), "timm:test_resnet", tmp_path / "model", preprocessing(32), CLASSES)

    fresh = timm.create_model("test_resnet", num_classes=3)
    fresh.load_state_dict(load_file(folder / WEIGHTS), strict=True)  # the plain architecture's keys
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_file = timm.create_model("test_resnet", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(
        file=str(folder / WEIGHTS), num_classes=3)).eval()
    ours, config = load(folder)
    for loaded in (fresh.eval(), by_folder, by_file, ours):
        assert torch.equal(loaded(batch), expected)
    cfg = by_folder.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["interpolation"] == "bilinear"
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    assert (cfg["crop_pct"], cfg["crop_mode"], cfg["num_classes"], cfg["label_names"]) == (1.0, "squash", 3, CLASSES)
    assert config["architecture"] == "test_resnet" and config["label_names"] == CLASSES
    assert not ours.training


def test_torchvision_export_loads_in_torchvision_alone_with_the_same_outputs(tmp_path, batch):
    model = _fine_tuned(tv_resnet("resnet18", num_classes=3))
    expected = model(batch)
    folder = export(torch.nn.DataParallel(model), "torchvision:resnet18", tmp_path / "model", preprocessing(32),
                    CLASSES)

    fresh = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    fresh.load_state_dict(load_file(folder / WEIGHTS), strict=True)
    ours, config = load(folder)
    for loaded in (fresh.eval(), ours):
        assert torch.equal(loaded(batch), expected)
    saved = json.loads((folder / CONFIG).read_text())
    assert saved == config
    assert (saved["architecture"], saved["num_classes"], saved["label_names"]) == ("torchvision:resnet18", 3, CLASSES)
    assert saved["pretrained_cfg"] == {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0,
                                       "crop_mode": "squash", "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225]}


def test_export_replaces_the_folder_whole(tmp_path):
    model = timm_model("test_resnet", num_classes=3)
    export(model, "timm:test_resnet", tmp_path / "model", preprocessing(32), CLASSES)
    (tmp_path / "model" / "stale.txt").write_text("from before")
    export(model, "timm:test_resnet", tmp_path / "model", preprocessing(16), CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [CONFIG, WEIGHTS]
    assert load(tmp_path / "model")[1]["pretrained_cfg"]["input_size"] == [3, 16, 16]


def test_export_and_load_errors_name_the_problem(tmp_path):
    model = timm_model("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match="3 outputs, but 2 classes"):
        export(model, "timm:test_resnet", tmp_path / "model", preprocessing(32), CLASSES[:2])
    with pytest.raises(ValueError, match="unknown keys \\['size'\\]"):
        export(model, "timm:test_resnet", tmp_path / "model", {"size": 32}, CLASSES)
    assert not tmp_path.joinpath("model").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no config\.json"):
        load(tmp_path / "empty")
    folder = export(model, "timm:test_resnet", tmp_path / "model", preprocessing(32), CLASSES)
    (folder / CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not JSON"):
        load(folder)
    (folder / CONFIG).write_text("{}")
    with pytest.raises(ValueError, match="missing architecture, num_classes, pretrained_cfg"):
        load(folder)


@pytest.fixture
def run_dir(tmp_path):
    model = _fine_tuned(timm_model("test_resnet", num_classes=3))
    export(model, "timm:test_resnet", tmp_path / "run" / "model", preprocessing(32), CLASSES)
    return tmp_path / "run"


def _images(folder, n=2):
    paths = []
    for i in range(n):
        pixels = torch.randint(0, 256, (40 + 8 * i, 48, 3), generator=torch.Generator().manual_seed(i))
        paths.append(folder / f"image{i}.png")
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(paths[-1])
    return paths


def test_predict_prints_every_class_with_probabilities_summing_to_one(run_dir, tmp_path):
    images = _images(tmp_path)
    result = runner.invoke(app, ["predict", str(run_dir), *map(str, images), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [lines[0], lines[4]] == [str(images[0]), str(images[1])]
    for rows in (lines[1:4], lines[5:8]):
        names, probs = zip(*(row.split() for row in rows))
        assert sorted(names) == CLASSES
        assert list(map(float, probs)) == sorted(map(float, probs), reverse=True)
        assert sum(map(float, probs)) == pytest.approx(1, abs=2e-4)
    result = runner.invoke(app, ["predict", str(run_dir / "model"), str(images[0]), "--top-k", "1"])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2 and lines[1] == result.stdout.splitlines()[1]


@pytest.mark.parametrize("problem", ["corrupt image", "missing image", "no model", "top-k 0"])
def test_predict_fails_in_one_line_without_traceback(run_dir, tmp_path, problem):
    good = str(_images(tmp_path, 1)[0])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0))
                        .to(torch.uint8).numpy().tobytes())
    args, named = {"corrupt image": ([str(run_dir), good, str(corrupt)], str(corrupt)),
                   "missing image": ([str(run_dir), str(tmp_path / "nope.png")], "nope.png"),
                   "no model": ([str(tmp_path), good], str(tmp_path)),
                   "top-k 0": ([str(run_dir), good, "--top-k", "0"], "--top-k")}[problem]
    result = runner.invoke(app, ["predict", *args])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert named in result.output and result.stdout == ""
    if result.exit_code == 1:
        assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
