"""assert_frozen: catches what moved, stays quiet when nothing did, and is cheap when nothing does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, tv_resnet

import freezekit as fk
import freezekit.verify as verify


def probe():
    model = tv_resnet("resnet18")
    fk.Policy(fk.freeze("*"), fk.unfreeze("fc")).apply(model)
    return model


def step(model, optimizer):
    x, y = image_batch(4)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_healthy_training_passes():
    model = probe()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        with fk.assert_frozen(model):
            step(model, optimizer)


def test_optimizer_moving_frozen_weights_is_named():
    model = probe()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step(model, optimizer)
    for p in model.layer4.parameters():
        p.grad = torch.zeros_like(p)  # zero_grad(set_to_none=False) style: weight decay still applies
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(fk.FrozenParameterChanged) as e, fk.assert_frozen(model):
        optimizer.step()
    moved = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, before[n])]
    assert moved and e.value.names == moved  # every one that moved, in model order, and nothing else
    assert all(n.startswith("layer4.") for n in moved) and "layer4.0.conv1.weight" in str(e.value)
    assert isinstance(e.value, AssertionError)


def test_locked_statistics_are_watched():
    model = probe()
    with pytest.raises(fk.FrozenParameterChanged, match=r"layer1\.0\.bn1\.running_mean"), fk.assert_frozen(model):
        model.layer1[0].bn1.running_mean.add_(1)


def test_writes_that_change_nothing_and_unfreezing_inside_are_fine():
    model = probe()
    with fk.assert_frozen(model), torch.no_grad():
        model.layer2[0].conv1.weight.mul_(1.0)  # written, but the same values
    with fk.assert_frozen(model):
        fk.Policy(fk.unfreeze("layer3")).apply(model)
        with torch.no_grad():
            model.layer3[0].conv1.weight.add_(1)  # unfrozen on purpose inside the block


def test_writes_through_data_need_values_true():
    model = probe()
    with fk.assert_frozen(model):
        model.layer1[0].conv1.weight.data.mul_(2)  # bypasses the version counter
    with pytest.raises(fk.FrozenParameterChanged, match=r"layer1\.0\.conv1\.weight"), \
            fk.assert_frozen(model, values=True):
        model.layer1[0].conv1.weight.data.mul_(2)


def test_swapped_element_is_caught():
    t = torch.arange(12.0).reshape(3, 4)
    swapped = t.clone()
    swapped[0, 1], swapped[2, 3] = t[2, 3], t[0, 1]
    assert verify.checksum(t) != verify.checksum(swapped)
    assert verify.checksum(t) == verify.checksum(t.clone())


def test_steady_state_checksums_nothing(monkeypatch):
    model = probe()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with fk.assert_frozen(model):
        step(model, optimizer)
    calls = []
    original = verify.checksum
    monkeypatch.setattr(verify, "checksum", lambda t: calls.append(t) or original(t))
    with fk.assert_frozen(model):
        step(model, optimizer)
    assert calls == []
