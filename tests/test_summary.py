"""fk.summary and `freezekit summary`: totals, collapsing, depth, previews, formats, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import Tied, flags, meta_model, modes, timm_model, tv_resnet
from typer.testing import CliRunner

import freezekit as fk
from freezekit.cli import app


def classification_models():
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = torchvision.models.get_model_weights(name)
        yield pytest.param(name, {w.meta["num_params"] for w in weights}, id=name)


@pytest.mark.parametrize("name,published", list(classification_models()))
def test_totals_equal_torchvision_published_num_params(name, published):
    # torchvision builds GoogLeNet's auxiliary heads, then drops them after loading its weights;
    # the published count is of the model without them.
    config = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, **config)
    except Exception as e:  # the contract: every model that builds on the meta device
        pytest.skip(f"{name} does not build on the meta device: {type(e).__name__}")
    totals = fk.summary(model).totals
    assert totals["total"] in published and totals["total"] == totals["trainable"]  # weights of several configs
    assert totals["frozen"] == totals["detached"] == totals["saved_bytes"] == 0


def test_vit_b_and_resnet50_fit_one_screen_with_collapsed_blocks():
    vit = fk.summary(meta_model("vit_base_patch16_224"))
    names = [r.name for r in vit.rows]
    assert "blocks.0-11" in names and len(vit.rows) <= 40
    assert next(r for r in vit.rows if r.name == "blocks.0-11").count == 12
    r50 = fk.summary(tv_resnet("resnet50").to("meta"))
    assert {"layer1.1-2", "layer3.1-5"} <= {r.name for r in r50.rows} and len(r50.rows) <= 40
    assert fk.summary(tv_resnet("resnet50").to("meta"), depth=r50.depth + 1).rows.__len__() > 40


def test_runs_split_where_status_differs():
    s = fk.summary(meta_model("vit_base_patch16_224"),
                   policy=fk.Policy(fk.freeze("*"), fk.unfreeze(fk.last("blocks", 2), "head")))
    rows = {r.name: r for r in s.rows}
    assert rows["blocks.0-9"].status == "frozen" and rows["blocks.10-11"].status == "trainable"
    assert rows["blocks"].status == "partial" and rows["blocks"].trainable == rows["blocks.10-11"].parameters
    assert rows["head"].status == "trainable" and rows["cls_token"].status == "frozen"


def test_depth_is_honoured():
    model = timm_model("test_resnet")
    one = fk.summary(model, depth=1)
    assert {r.depth for r in one.rows} == {1} and one.depth == 1
    two = fk.summary(model, depth=2)
    assert max(r.depth for r in two.rows) == 2 and len(two.rows) > len(one.rows)
    with pytest.raises(ValueError, match="depth: expected a positive int"):
        fk.summary(model, depth=0)


def test_tied_weights_count_once_and_detached_are_counted():
    tied = fk.summary(Tied())
    assert tied.totals["total"] == sum(p.numel() for p in Tied().parameters()) == 20 * 8 + 8 * 8 + 8
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    s = fk.summary(model, policy=fk.Policy(fk.detach("0"), fk.freeze("1.bias")))
    assert (s.totals["detached"], s.totals["frozen"], s.totals["trainable"]) == (20, 2, 8)
    assert [r.status for r in s.rows] == ["detached", "partial"]
    assert s.totals["saved_bytes"] == (20 + 2) * 4 * 3  # gradient + two Adam moments, float32


def test_preview_changes_nothing_and_matches_the_applied_model():
    model = tv_resnet("resnet18")
    policy = fk.Policy(fk.freeze("*"), fk.unfreeze("layer4", "fc"), fk.eval_mode("layer1"))
    before = (flags(model), modes(model))
    preview = fk.summary(model, policy=policy)
    assert (flags(model), modes(model)) == before
    policy.apply(model)
    assert fk.summary(model).to_dict() == preview.to_dict()
    assert next(r for r in preview.rows if r.name == "layer1").mode == "eval-locked"


def test_three_formats():
    s = fk.summary(timm_model("test_vit"), policy=fk.Policy(fk.freeze("*"), fk.unfreeze("head")))
    data = json.loads(s.to_json())
    assert list(data) == ["model", "rows", "totals"]
    assert set(data["rows"][0]) == {"name", "type", "parameters", "trainable", "status", "mode", "tied"}
    assert set(data["totals"]) == {"total", "trainable", "frozen", "detached", "trainable_pct", "saved_bytes"}
    text = str(s)
    assert text.splitlines()[1].split() == ["name", "type", "parameters", "trainable", "status", "mode"]
    assert "trainable (" in text.splitlines()[-1]
    md = s.to_markdown()
    assert "| name | type | parameters | trainable | status | mode |" in md and "| head | Linear |" in md


runner = CliRunner()


def test_cli_summary_formats_and_patterns():
    result = runner.invoke(app, ["summary", "timm:vit_base_patch16_224", "--freeze", "*", "--unfreeze", "head",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["totals"]["trainable"] == 769_000
    result = runner.invoke(app, ["summary", "torchvision:resnet18", "--depth", "1", "--format", "markdown"])
    assert result.exit_code == 0 and "| layer4 | Sequential |" in result.stdout
    result = runner.invoke(app, ["summary", "torchvision:resnet18", "--detach", "layer1"])
    assert result.exit_code == 0 and "detached" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["timm:vit_bsae_patch16_224"], "did you mean timm:vit_base_patch16_224"),
    (["torchvision:resnet19"], "did you mean torchvision:resnet18"),
    (["resnet18"], "expected timm:NAME, torchvision:NAME"),
    (["torchvision:resnet18", "--freeze", "layer5*"], "'layer5*' matched nothing in ResNet; closest: 'layer"),
    (["torchvision:resnet18", "--unfreeze", "re:layer["], "bad regular expression 'layer\\['"),
    (["os:system"], "importing 'os' is not allowed"),
])
def test_cli_summary_errors(args, message):
    result = runner.invoke(app, ["summary", *args])
    assert result.exit_code == 1
    assert message.replace("\\[", "[") in result.output and "Traceback" not in result.output


def test_cli_summary_in_a_real_process_prints_plain_text_when_piped():
    ok = subprocess.run([sys.executable, "-m", "freezekit", "summary", "timm:resnet50", "--freeze", "*"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "\x1b[" not in ok.stdout and "layer4" in ok.stdout
    assert "freezing saves" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "freezekit", "summary", "timm:resnet5O"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "did you mean" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_summary_of_a_recipe_previews_its_policy():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "linear_probe.yaml"
    result = runner.invoke(app, ["summary", "--recipe", str(recipe), "--format", "json"])
    assert result.exit_code == 0, result.output
    totals = json.loads(result.stdout)["totals"]
    assert 0 < totals["trainable"] < totals["total"] and totals["frozen"] > 0
    assert runner.invoke(app, ["summary"]).exit_code == 1
