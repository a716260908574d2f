"""param_groups and sync_optimizer, checked against what the optimizer really does."""

from __future__ import annotations

import warnings
from itertools import pairwise

import pytest
import torch
import torch.nn as nn
from conftest import timm_model, tv_resnet

import freezekit as fk


def lr_of(groups):
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def wd_of(groups):
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def test_only_trainable_each_once_with_readable_names(resnet18):
    fk.Policy(fk.freeze("*"), fk.unfreeze("layer4", "fc")).apply(resnet18)
    groups = fk.param_groups(resnet18, lr=0.1, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in resnet18.parameters() if p.requires_grad}
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    for opt in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        opt(groups)


def test_no_decay_auto_covers_biases_norms_and_tokens():
    vit = timm_model("test_vit")
    wd = wd_of(fk.param_groups(vit, lr=1e-3, weight_decay=0.05))
    assert wd[id(vit.cls_token)] == wd[id(vit.pos_embed)] == 0.0
    assert wd[id(vit.blocks[0].norm1.weight)] == wd[id(vit.blocks[0].attn.qkv.bias)] == 0.0
    assert wd[id(vit.blocks[0].attn.qkv.weight)] == 0.05
    custom = fk.param_groups(vit, lr=1e-3, weight_decay=0.05, no_decay=["*.qkv.*"])
    assert wd_of(custom)[id(vit.blocks[0].attn.qkv.weight)] == 0.0
    assert wd_of(custom)[id(vit.blocks[0].norm1.weight)] == 0.05  # only what was asked
    assert set(wd_of(fk.param_groups(vit, lr=1e-3, weight_decay=0.05, no_decay=None)).values()) == {0.05}


def test_rules_last_wins_per_key(resnet18):
    groups = fk.param_groups(resnet18, lr=1.0, weight_decay=0.1, rules=[
        ("layer4*", {"lr_mult": 0.1}),
        ("layer4.1*", {"lr": 0.5}),  # absolute, and later: decides layer4.1's rate
        ("layer4.1.conv1.weight", {"wd_mult": 0.0}),  # speaks only about decay: the rate stays 0.5
        ("fc", {"lr_mult": 10, "weight_decay": 0.3}),
    ])
    lr, wd = lr_of(groups), wd_of(groups)
    assert lr[id(resnet18.layer4[0].conv1.weight)] == pytest.approx(0.1)
    assert lr[id(resnet18.layer4[1].conv1.weight)] == 0.5 and wd[id(resnet18.layer4[1].conv1.weight)] == 0.0
    assert lr[id(resnet18.fc.weight)] == 10 and wd[id(resnet18.fc.weight)] == wd[id(resnet18.fc.bias)] == 0.3
    assert lr[id(resnet18.layer1[0].conv1.weight)] == 1.0 and wd[id(resnet18.layer1[0].conv1.weight)] == 0.1
    assert {g["name"] for g in groups} >= {"rule0.decay", "rule1.no_decay", "rule3.decay"}


def test_layer_decay_is_geometric_on_vit():
    vit = timm_model("test_vit")
    lr = lr_of(fk.param_groups(vit, lr=1.0, layer_decay=0.5))
    blocks = [lr[id(b.attn.qkv.weight)] for b in vit.blocks]
    assert all(b / a == pytest.approx(2.0) for a, b in pairwise(blocks))
    assert lr[id(vit.patch_embed.proj.weight)] == pytest.approx(blocks[0] / 2)
    assert lr[id(vit.head.weight)] == 1.0 and lr[id(vit.cls_token)] == lr[id(vit.patch_embed.proj.weight)]


def test_layer_decay_by_names_without_a_group_matcher():
    model = tv_resnet("resnet18")  # torchvision: no group_matcher, layers named layer1..layer4
    ids, n = fk.optim.layer_ids(model)
    assert (ids["conv1.weight"], ids["layer1.0.conv1.weight"], ids["layer4.1.bn2.bias"], ids["fc.weight"]) == \
        (0, 1, 4, 5) and n == 6
    custom = nn.Module()
    custom.embed = nn.Embedding(10, 4)
    custom.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    custom.head = nn.Linear(4, 2)
    lr = lr_of(fk.param_groups(custom, lr=1.0, layer_decay=0.1))
    assert [lr[id(m.weight)] for m in (custom.embed, *custom.layers, custom.head)] == \
        pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])


def test_bad_arguments_name_themselves(resnet18):
    with pytest.raises(ValueError, match=r"param_groups\(\): lr: expected a positive number, got -1"):
        fk.param_groups(resnet18, lr=-1)
    with pytest.raises(ValueError, match=r"rules\[0\]: unknown keys \['lr_mul'\]"):
        fk.param_groups(resnet18, lr=1, rules=[("fc", {"lr_mul": 2})])
    with pytest.raises(TypeError, match=r"rules\[0\]: expected \(selector"):
        fk.param_groups(resnet18, lr=1, rules=["fc"])
    with pytest.raises(fk.PatternError):
        fk.param_groups(resnet18, lr=1, rules=[("re:fc[", {"lr_mult": 2})])


def test_sync_adds_once_with_the_base_rate_and_split_decay(resnet18):
    fk.Policy(fk.freeze("*"), fk.unfreeze("fc")).apply(resnet18)
    optimizer = torch.optim.AdamW(fk.param_groups(resnet18, lr=3e-4, weight_decay=0.05))
    assert not fk.sync_optimizer(optimizer, resnet18)  # nothing to do
    fk.Policy(fk.unfreeze("layer4")).apply(resnet18)
    report = fk.sync_optimizer(optimizer, resnet18, lr_mult=0.1)
    assert report.groups == ["sync2.decay", "sync2.no_decay"] and "layer4.0.conv1.weight" in report.added
    new = optimizer.param_groups[2:]
    assert [g["lr"] for g in new] == pytest.approx([3e-5, 3e-5]) and [g["weight_decay"] for g in new] == [0.05, 0.0]
    assert not fk.sync_optimizer(optimizer, resnet18, lr_mult=0.1)  # never twice
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert "added 10 parameters" in str(report) or "added" in str(report)


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_sync_takes_the_decay_of_an_optimizer_built_elsewhere(resnet18, decay):
    """Split by hand (as Hugging Face's Trainer does), its decay is not in the optimizer's defaults:
    new groups read the groups' (they took AdamW's default 0.01, or none at all with SGD)."""
    fk.Policy(fk.freeze("*"), fk.unfreeze("fc")).apply(resnet18)
    for make in (torch.optim.AdamW, torch.optim.SGD):
        optimizer = make([{"params": [resnet18.fc.weight], "weight_decay": decay},
                          {"params": [resnet18.fc.bias], "weight_decay": 0.0}], lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fk.FreezekitWarning)  # the optimizer does not hold layer4 yet
            fk.Policy(fk.unfreeze("layer4")).apply(resnet18)
        fk.sync_optimizer(optimizer, resnet18)
        wd = wd_of(optimizer.param_groups)
        assert wd[id(resnet18.layer4[0].conv1.weight)] == decay and wd[id(resnet18.layer4[0].bn1.weight)] == 0.0
        fk.Policy(fk.freeze("layer4")).apply(resnet18)


def test_sync_clears_frozen_grads_and_can_drop_state(resnet18):
    optimizer = torch.optim.SGD(resnet18.parameters(), lr=0.1, momentum=0.9)
    resnet18(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    resnet18(torch.randn(2, 3, 32, 32)).sum().backward()
    fk.Policy(fk.freeze("layer1")).apply(resnet18)
    resnet18.layer1[0].conv1.weight.grad = torch.ones_like(resnet18.layer1[0].conv1.weight)  # stale again
    report = fk.sync_optimizer(optimizer, resnet18, drop_state=True)
    assert report.cleared == ["layer1.0.conv1.weight"] and "layer1.0.conv1.weight" in report.dropped
    assert resnet18.layer1[0].conv1.weight not in optimizer.state


def scheduler_cases():
    def lam(o):
        return torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s)

    def cosine(o):
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30)

    def onecycle(o):
        return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20)

    def linear(o):
        return torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5)

    def sequential(o):
        return torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
                                                          torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30)],
                                                     milestones=[3])

    def step(o):
        return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)

    return [lam, cosine, onecycle, linear, sequential, step]


@pytest.mark.parametrize("make", scheduler_cases(), ids=lambda f: f.__name__)
def test_each_scheduler_keeps_stepping_after_a_group_is_added(make):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fk.Policy(fk.freeze("0")).apply(model)
    optimizer = torch.optim.SGD(fk.param_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    scheduler = make(optimizer)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    fk.Policy(fk.unfreeze("0")).apply(model)
    fk.sync_optimizer(optimizer, model, lr_mult=0.5, scheduler=scheduler)
    ratio = optimizer.param_groups[-1]["lr"] / optimizer.param_groups[0]["lr"]
    assert ratio == pytest.approx(0.5)  # joins at the schedule's current point
    for _ in range(6):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[-1]["lr"] / optimizer.param_groups[0]["lr"] == pytest.approx(ratio)
    assert len(scheduler.get_last_lr()) == len(optimizer.param_groups)


def test_reduce_on_plateau_learns_about_new_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fk.Policy(fk.freeze("0")).apply(model)
    optimizer = torch.optim.SGD(fk.param_groups(model, lr=0.1), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
    fk.Policy(fk.unfreeze("0")).apply(model)
    fk.sync_optimizer(optimizer, model, scheduler=plateau)
    for loss in (1.0, 2.0, 3.0):
        plateau.step(loss)
    assert optimizer.param_groups[-1]["lr"] < 0.1
