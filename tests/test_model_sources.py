"""Models from outside timm's classifiers, in the CLI and recipes, offline: torchvision detection and
segmentation models with no weights at all, Hugging Face models from a local directory (``hf:``),
and ``summary --policy FILE --kwargs``."""

from __future__ import annotations

import json
import sys

import pytest
import torch.hub
from typer.testing import CliRunner

from freezekit.cli import app
from freezekit.models import UnknownModelError, build

runner = CliRunner()


@pytest.fixture
def offline(monkeypatch):
    """Any weight download fails the test (the machine may well have a network)."""
    def refuse(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def test_a_detection_model_summarizes_offline_with_no_weights(offline):
    result = invoke("summary", "torchvision:maskrcnn_resnet50_fpn", "--freeze", "backbone.body.layer1*",
                    "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    frozen = sum(p.numel() for n, p in build("torchvision:maskrcnn_resnet50_fpn", device="meta").named_parameters()
                 if n.startswith("backbone.body.layer1"))
    assert data["totals"]["frozen"] == frozen > 0


@pytest.mark.parametrize("name", ["torchvision:fasterrcnn_resnet50_fpn", "torchvision:deeplabv3_resnet50"])
def test_pretrained_false_passes_the_no_weights_values(name, offline):
    model = build(name, device="meta")
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())  # a trained backbone's norm
    build(name, device="meta", weights_backbone=None)  # the workaround users wrote is allowed too
    with pytest.raises(UnknownModelError, match="'weights_backbone' would load weights"):
        build(name, device="meta", weights_backbone="DEFAULT")


def test_a_recipe_for_a_detection_backbone_checks(tmp_path, offline):
    recipe = tmp_path / "detect.yaml"
    recipe.write_text("model: {name: torchvision:fasterrcnn_resnet50_fpn}\n"
                      "policy:\n  - freeze: backbone.body\n  - unfreeze: backbone.body.layer4\n"
                      "schedule:\n  - at: 1\n    policy: [{unfreeze: backbone.body.layer3}]\n")
    result = invoke("check", str(recipe))
    assert result.exit_code == 0, result.output
    assert "schedule[0] at epoch 1" in result.output


@pytest.fixture
def hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3,
                                    architectures=["ViTForImageClassification"])
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


def test_hf_models_from_a_local_directory(hf_dir, tmp_path):
    model = build(f"hf:{hf_dir}", device="meta")
    assert type(model).__name__ == "ViTForImageClassification" and next(model.parameters()).is_meta
    assert build(f"hf:{hf_dir}", num_classes=5).classifier.out_features == 5
    policy = tmp_path / "policy.yaml"
    policy.write_text("- freeze: '*'\n- unfreeze: {last: {of: vit.layers, n: 1}}\n- unfreeze: {types: LayerNorm}\n"
                      "- unfreeze: 're:classifier\\..*'\n")
    result = invoke("summary", f"hf:{hf_dir}", "--policy", str(policy), "--kwargs", "num_labels=4", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["rows"]}
    assert rows["classifier"]["parameters"] == 33 * 4 and rows["classifier"]["status"] == "trainable"
    assert rows["vit"]["status"] == "partial"


def test_a_recipe_trains_a_local_hf_model(hf_dir, tmp_path):
    recipe = tmp_path / "hf.yaml"
    recipe.write_text(f"model: {{name: 'hf:{hf_dir}', pretrained: true}}\n"
                      "data: {image_size: 32, train_size: 32, val_size: 16}\n"
                      "policy: [{freeze: '*'}, {unfreeze: classifier}]\n"
                      "train: {epochs: 1, batch_size: 16}\n")
    assert invoke("check", str(recipe)).exit_code == 0
    result = invoke("run", str(recipe), "--output", str(tmp_path / "run"), "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_hf_errors_name_the_fix(tmp_path, monkeypatch):
    result = invoke("summary", f"hf:{tmp_path / 'nowhere'}")
    assert result.exit_code == 1 and "not a directory with a config.json, nor a model id in the local" in result.output
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(UnknownModelError, match=r"pip install 'freezekit\[transformers\]'"):
        build("hf:anything")


def test_summary_options_are_checked(tmp_path):
    assert "--set changes a --recipe" in invoke("summary", "timm:test_vit", "--set", "seed=1").output
    bad = tmp_path / "bad.yaml"
    bad.write_text("- freez: '*'\n")
    result = invoke("summary", "timm:test_vit", "--policy", str(bad))
    assert result.exit_code == 1 and "did you mean 'freeze'" in result.output
