"""What a recipe or a checkpoint from someone else cannot do: run code, fetch weights behind the
cache, or make the runner write outside its output folder (see SECURITY.md)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from conftest import RunsCode
from typer.testing import CliRunner

from freezekit.cli import app
from freezekit.recipe import RecipeError, check, loads

runner = CliRunner()

TINY = """
model: {{name: "{model}"}}
data: {{image_size: 16, train_size: 16, val_size: 8}}
train: {{epochs: 1, batch_size: 8}}
"""


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"model": {"fc.weight": torch.zeros(3, 8)}, "evil": RunsCode(marker)}, f, protocol=2)
    return path


def _invoke(args: list[str]):
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    return result


def test_a_starting_checkpoint_holding_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    weights = _evil_checkpoint(tmp_path / "start.pt", marker)
    recipe = loads(TINY.format(model="timm:test_resnet").replace('"}', f'", checkpoint: "{weights}"}}', 1), "r.yaml")
    with pytest.raises(RecipeError, match=r"r\.yaml:2: model\.checkpoint: .*start\.pt"):
        check(recipe)
    assert not marker.exists()


def test_a_factory_outside_the_allowed_packages_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "sneaky.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "import torch.nn as nn\ndef make(num_classes=3):\n    return nn.Linear(3 * 16 * 16, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(TINY.format(model="sneaky:make"))
    result = _invoke(["check", "r.yaml"])
    assert result.exit_code == 1 and "pass --allow-import sneaky" in result.output
    assert not marker.exists() and "sneaky" not in sys.modules
    policy = "policy: [{freeze: {types: [sneaky.Evil]}}]\n"
    (tmp_path / "t.yaml").write_text(TINY.format(model="timm:test_resnet") + policy)
    result = _invoke(["check", "t.yaml"])  # a type name outside torch/timm is compared as a name, not imported
    assert result.exit_code == 1 and "'sneaky.Evil' matched no module" in result.output
    assert not marker.exists() and "sneaky" not in sys.modules
    try:
        result = _invoke(["check", "r.yaml", "--allow-import", "sneaky"])  # the user vouches for it: it runs
        assert result.exit_code == 0 and marker.exists(), result.output
    finally:
        sys.modules.pop("sneaky", None)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system [touch {m}]",
                                 "!!python/object/new:pathlib.Path [{m}]",
                                 "!!python/name:os.system"])
def test_yaml_python_tags_are_refused_unrun(tag, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(TINY.format(model="timm:test_resnet") + f"seed: {tag.format(m=marker)}\n")
    result = _invoke(["check", "r.yaml"])
    assert result.exit_code == 1 and "r.yaml:" in result.output
    assert not marker.exists()


@pytest.mark.parametrize("argument", ["checkpoint_path: /etc/passwd", "pretrained_cfg_overlay: {file: x.pt}",
                                      "weights: DEFAULT"])
def test_factory_arguments_cannot_load_weights_behind_the_cache(argument):
    model = "torchvision:resnet18" if argument.startswith("weights") else "timm:test_resnet"
    text = TINY.format(model=model).replace('"}', f'", kwargs: {{{argument}}}}}', 1)
    with pytest.raises(RecipeError, match=r"r\.yaml:2: model\.kwargs: argument '\w+' would load weights"):
        check(loads(text, "r.yaml"))


@pytest.mark.parametrize("name", ["../../escape", "/etc", "a/b", ".hidden", "..", "x\\y", ""])
def test_a_name_is_one_folder_name(name, tmp_path):
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: name: a run's name is one folder name"):
        loads(f"name: {name!r}\n" + TINY.format(model="timm:test_resnet"), "r.yaml")


@pytest.mark.parametrize("where", ["/tmp/elsewhere", "../up", "runs/../../up", "~/runs"])
def test_an_output_dir_from_the_file_stays_below_the_working_folder(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(TINY.format(model="timm:test_resnet") + f"output: {{dir: {where!r}}}\n")
    result = _invoke(["run", "r.yaml"])
    assert result.exit_code == 1 and "r.yaml:5: output.dir:" in result.output and "--output" in result.output
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]  # nothing written anywhere
    # the command line is the user's own: it may put the run anywhere
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    result = _invoke(["check", "r.yaml", "--set", f"output.dir={elsewhere}"])
    assert result.exit_code == 0, result.output


def test_a_run_writes_only_below_its_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(TINY.format(model="timm:test_resnet") + "output: {dir: runs/mine}\n")
    outside = tmp_path.parent
    before = {p for p in outside.iterdir()}
    result = _invoke(["run", "r.yaml", "--quiet"])
    assert result.exit_code == 0, result.output
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()} - {Path("r.yaml")}
    assert written and all(p.parts[:2] == ("runs", "mine") for p in written), written
    assert {p for p in outside.iterdir()} == before
