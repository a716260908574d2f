"""The freeze map: reading it, saving it with a checkpoint, and re-creating it on a fresh model."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import yaml
from conftest import flags, modes, timm_model, tv_resnet

import freezekit as fk

POLICY = fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze("layer4.1", "fc"), fk.eval_mode("layer2.0"),
                   fk.detach("layer1"), fk.detach("fc", at="input", no_grad=False))


def test_state_reads_everything():
    model = tv_resnet("resnet18")
    POLICY.apply(model)
    st = fk.state(model)
    assert st.parameters["fc.weight"] == "trainable" and st.parameters["layer3.0.conv1.weight"] == "frozen"
    assert st.parameters["layer4.1.bn1.weight"] == "trainable"
    assert {"layer2.0", "layer2.0.conv1"} <= set(st.eval_locked) and "layer2.1" not in st.eval_locked
    assert "layer3.0.bn1" in st.frozen_bn and "layer4.1.bn1" not in st.frozen_bn
    assert [(b.module, b.at, b.no_grad) for b in st.boundaries] == [("layer1", "output", True), ("fc", "input", False)]
    text = str(st)
    assert "eval-locked: layer2.0" in text and "boundary at output of layer1" in text


@pytest.mark.parametrize("via", ["dict", "yaml", "torch.save"])
def test_state_round_trips_onto_a_fresh_model(via):
    model = tv_resnet("resnet18")
    POLICY.apply(model)
    saved = fk.state_dict(model)
    if via == "yaml":
        saved = yaml.safe_load(yaml.safe_dump(saved))
    elif via == "torch.save":
        buf = io.BytesIO()
        torch.save({"freezekit": saved}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)["freezekit"]
    fresh = tv_resnet("resnet18")
    applied = fk.load_state(fresh, saved)
    assert fk.state(fresh) == fk.state(model)
    model.train(), fresh.train()
    assert flags(fresh) == flags(model) and modes(fresh) == modes(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))
    applied.undo()
    assert fk.state(fresh) == fk.state(tv_resnet("resnet18"))


def test_load_state_is_a_no_op_when_already_there():
    model = timm_model("test_vit")
    fk.Policy(fk.freeze("*"), fk.unfreeze("head")).apply(model)
    assert fk.load_state(model, fk.state_dict(model)).changes == []


@pytest.mark.parametrize("earlier", [
    fk.Policy(fk.eval_mode("layer3")),  # locks the saved map lacks
    fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze("fc"), fk.detach("layer1")),  # an earlier point
    fk.Policy(fk.freeze("layer2"), fk.eval_mode("layer4.1"), fk.detach("layer1")),
])
def test_load_state_moves_a_model_that_already_carries_a_map(earlier):
    """The usual pattern applies the starting policy in the model's __init__; resuming then loads
    a later point of the schedule into that model."""
    model = tv_resnet("resnet18")
    POLICY.apply(model)
    fresh = tv_resnet("resnet18")
    earlier.apply(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fk.load_state(fresh, fk.state_dict(model))
    assert fk.state(fresh) == fk.state(model)
    fresh.train()
    assert [m.training for m in fresh.modules()] == [m.training for m in model.train().modules()]


def test_state_that_does_not_fit_is_refused():
    model = tv_resnet("resnet18")
    POLICY.apply(model)
    saved = fk.state_dict(model)
    with pytest.raises(fk.StateError, match=r"does not fit VisionTransformer \(saved from ResNet\)"):
        fk.load_state(timm_model("test_vit"), saved)
    broken = dict(saved, parameters={("layer9" + k[6:] if k.startswith("layer1") else k): v
                                     for k, v in saved["parameters"].items()})
    with pytest.raises(fk.StateError, match=r"parameter 'layer9\.0\.conv1\.weight' is not in ResNet \(closest: "):
        fk.load_state(tv_resnet("resnet18"), broken)
    with pytest.raises(fk.StateError, match=r"state\.parameters: expected a mapping"):
        fk.load_state(tv_resnet("resnet18"), dict(saved, parameters={"fc.weight": "melted"}))
    with pytest.raises(fk.StateError, match=r"state\.version: expected 1"):
        fk.load_state(tv_resnet("resnet18"), dict(saved, version=7))
    other = tv_resnet("resnet18")
    fk.Policy(fk.detach("layer3")).apply(other)
    with pytest.raises(fk.StateError, match=r"has 1 gradient boundaries the state lacks \(at the output of 'layer3'"):
        fk.load_state(other, saved)
    assert issubclass(fk.StateError, ValueError)
