"""Recipes: the bundled ones check; bad ones say file:line: field: problem, exit non-zero, write nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from freezekit.cli import app
from freezekit.recipe import RecipeError, check, load, loads
from freezekit.recipe.bundled import bundled

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
runner = CliRunner()


@pytest.mark.parametrize("path", [p for p, _ in bundled()], ids=lambda p: p.stem)
def test_every_bundled_recipe_checks_and_opens_with_its_command(path):
    lines = path.read_text().splitlines()
    assert lines[0] == f"# freezekit run recipes/{path.name}" and lines[1].startswith("# ") and len(lines[1]) > 20
    prepared = check(load(path))
    assert prepared.phases and prepared.phases[0].summary.totals["trainable"] > 0


def test_recipes_command_lists_them_all():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    names = {p.stem for p, _ in bundled()}
    assert names >= {"quickstart", "linear_probe", "lp_ft", "gradual_unfreeze", "bitfit", "norm_only",
                     "layer_decay_vit", "frozen_stages"}
    assert all(name in result.stdout for name in names)


def test_check_prints_the_plan_of_every_phase():
    result = runner.invoke(app, ["check", str(ROOT / "recipes" / "lp_ft.yaml")])
    assert result.exit_code == 0, result.output
    assert "== start:" in result.stdout and "== schedule[0] at epoch 3, lr x0.1:" in result.stdout
    assert "sync2.decay" in result.stdout and "lr 0.0003" in result.stdout


def bad_recipes():
    for path in sorted(ASSETS.glob("invalid_*.yaml")):
        expected = [line.removeprefix("# expect: ") for line in path.read_text().splitlines()
                    if line.startswith("# expect: ")]
        yield pytest.param(path, expected, id=path.stem.removeprefix("invalid_"))


def evil_checkpoint(folder: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    torch.save({"weight": Payload()}, folder / "evil.pt")


@pytest.mark.parametrize("path,expected", list(bad_recipes()))
def test_bad_recipe_catalogue(path, expected, tmp_path, monkeypatch):
    shutil.copy(path, tmp_path / path.name)
    evil_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    for command in (["check", path.name], ["run", path.name, "--output", "out"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        for message in expected:
            assert message in result.output, f"{message!r} not in {result.output!r}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned.txt").exists()


def test_there_are_at_least_twenty_bad_recipes():
    assert len(list(bad_recipes())) >= 20


def test_all_problems_are_reported_together():
    text = "model: {name: 'timm:test_resnet'}\npolicy:\n  - unfreeze: layer9\n  - freeze: lyer1\n" \
           "optimizer: {groups: [{select: nothing, lr_mult: 2}]}\n"
    with pytest.raises(RecipeError) as e:
        check(loads(text, "r.yaml"))
    assert [p.line for p in e.value.problems] == [5, 3, 4]
    text = "model: {name: 'timm:test_resnet', num_classes: 5}\npolicy:\n  - freeze: lyer1\n" \
           "  - {unfreeze: fc, norm: eval}\n  - {freeze: layer2, nrm: eval}\n" \
           "schedule: [{at: 1, policy: [{unfreeze: layer9}]}]\n"
    with pytest.raises(RecipeError) as e:  # every rule's problem; the patterns too, as the rules are whole
        check(loads(text, "r.yaml"))
    assert [(p.line, p.field) for p in e.value.problems] == [(1, "model.num_classes"), (4, "policy[1].norm"),
                                                              (5, "policy[2].nrm")]
    with pytest.raises(RecipeError, match=r"r\.yaml:6: schedule\[0\]\.polcy: unknown key 'polcy'; did you mean "
                                          r"'policy'\? \(a phase takes at, policy, unit, lr_mult\)"):
        check(loads(text.replace("policy: [{unfreeze: layer9}]", "polcy: [{unfreeze: layer9}]"), "r.yaml"))
    fixed = text.replace(", norm: eval", "").replace("nrm", "norm")
    with pytest.raises(RecipeError) as e:
        check(loads(fixed, "r.yaml"))
    assert [(p.line, p.field) for p in e.value.problems] == [(1, "model.num_classes"), (3, "policy[0].freeze"),
                                                              (6, "schedule[0].policy[0].unfreeze")]


def test_set_overrides_take_yaml_values():
    recipe = load(ROOT / "recipes" / "quickstart.yaml", ["train.epochs=2", "optimizer.lr=1e-4",
                                                         "policy[1].unfreeze=[fc]", "data.augment=true"])
    assert recipe.train.epochs == 2 and recipe.optimizer.lr == 1e-4 and recipe.data.augment is True
    assert recipe.policy[1] == {"unfreeze": ["fc"]}
    with pytest.raises(RecipeError, match=r"quickstart\.yaml: train\.epochs: Input should be a valid integer"):
        load(ROOT / "recipes" / "quickstart.yaml", ["train.epochs=two"])
    with pytest.raises(RecipeError, match=r"--set: expected key\.path=value"):
        load(ROOT / "recipes" / "quickstart.yaml", ["train.epochs"])
    with pytest.raises(RecipeError, match=r"train\.epocs: unknown key 'epocs'; did you mean 'epochs'"):
        load(ROOT / "recipes" / "quickstart.yaml", ["train.epocs=2"])


def test_defaults_and_resolved_form_round_trip():
    recipe = loads("model: {name: 'timm:test_resnet'}", "minimal.yaml")
    assert recipe.name == "minimal" and recipe.data.kind == "shapes" and recipe.train.cache_features == "auto"
    again = loads(yaml.safe_dump(recipe.model_dump(mode="json")), "again.yaml")
    assert again.model_dump() == recipe.model_dump()


def test_imports_need_allow_import():
    text = "model:\n  name: torchvision.models:resnet18\n"  # allowed package: fine
    assert check(loads(text)).num_classes == 3
    outside = "model:\n  name: collections:OrderedDict\n"
    with pytest.raises(RecipeError, match="importing 'collections' is not allowed; pass --allow-import collections"):
        check(loads(outside))
    with pytest.raises(RecipeError, match=r"returned OrderedDict, not an nn\.Module"):
        check(loads(outside), allow_import=["collections"])


def test_a_real_process_reports_without_traceback(tmp_path):
    shutil.copy(ASSETS / "invalid_unknown_key.yaml", tmp_path / "bad.yaml")
    result = subprocess.run([sys.executable, "-m", "freezekit", "check", "bad.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "bad.yaml:4: train.epocs: unknown key 'epocs'; did you mean 'epochs'?" in result.stderr


def test_pretrained_offline_says_the_weights_are_not_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    (tmp_path / "r.yaml").write_text("model:\n  name: timm:resnet18\n  pretrained: true\ntrain: {epochs: 1}\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "r.yaml", "--output", "out"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "pretrained weights are not in the local cache" in result.output
