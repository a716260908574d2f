"""audit: each finding fires on a model built to have that bug, and none on healthy models."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Tied, image_batch, timm_model, tv_resnet

import freezekit as fk


def trained_once(model, classes=10):
    x, y = image_batch(2, classes=classes)
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("make,classes", [(lambda: tv_resnet("resnet18"), 10), (lambda: timm_model("test_vit"), 1000),
                                          (lambda: timm_model("test_convnext"), 1000)])
def test_healthy_models_have_no_findings(make, classes):
    model = make()
    assert fk.audit(model) == []
    head = "fc" if hasattr(model, "fc") else "head"
    fk.Policy(fk.freeze("*"), fk.unfreeze(head)).apply(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.05)
    trained_once(model, classes)
    optimizer.step()
    findings = fk.audit(model, optimizer)
    assert findings == [] and str(findings) == "audit: no freezing problems found"


def test_fk001_stale_grad_and_fk003_optimizer_moves_frozen():
    model = tv_resnet("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained_once(model)
    for p in model.layer1.parameters():
        p.requires_grad_(False)  # frozen by hand: .grad stays
    findings = fk.audit(model, optimizer)
    assert findings.codes == ["FK001", "FK003", "FK004"]
    assert "layer1.0.conv1.weight" in findings[0].names and "layer1.0.conv1.weight" in findings[1].names
    assert "set_to_none" in findings[0].fix
    assert findings[2].names[0] == "layer1.0.bn1"  # and their BatchNorms still update in training


def test_fk002_trainable_not_in_optimizer():
    model = tv_resnet("resnet18")
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    fk.Policy(fk.freeze("layer1")).apply(model)
    (finding,) = fk.audit(model, optimizer)
    assert finding.code == "FK002" and "layer4.0.conv1.weight" in finding.names and "fc.weight" not in finding.names
    assert "fk.sync_optimizer" in finding.fix


def test_fk004_drifting_statistics_unless_chosen():
    model = tv_resnet("resnet18")
    for p in model.layer2.parameters():
        p.requires_grad_(False)
    (finding,) = fk.audit(model)
    assert finding.code == "FK004" and "layer2.0.bn1" in finding.names and "layer3.0.bn1" not in finding.names
    chosen = tv_resnet("resnet18")
    applied = fk.Policy(fk.freeze("layer2", norm="train")).apply(chosen)
    assert fk.audit(chosen) == []  # the policy said so
    applied.undo()
    assert all("_freezekit_stats_adapt" not in m.__dict__ for m in chosen.modules())


def test_fk005_ddp_built_for_another_trainable_set(process_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tv_resnet("resnet18")
    fk.Policy(fk.freeze("*"), fk.unfreeze("fc")).apply(model)
    ddp = DDP(model)
    assert fk.audit(ddp) == []
    fk.Policy(fk.unfreeze("layer4")).apply(ddp)  # the classic: unfreeze after wrapping
    (finding,) = fk.audit(ddp)
    assert finding.code == "FK005" and "built for 2 trainable tensors" in finding.title
    assert "layer4.0.conv1.weight" in finding.names


def test_fk006_reentrant_checkpointing_fed_by_frozen_inputs():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    model = tv_resnet("resnet18")
    model.layer3 = checkpoint_wrapper(model.layer3, checkpoint_impl=CheckpointImpl.REENTRANT)
    fk.Policy(fk.freeze("*"), fk.unfreeze("layer3", "fc")).apply(model)
    (finding,) = fk.audit(model)
    assert finding.code == "FK006" and finding.names == ("layer3",)
    x, y = image_batch(2)
    model.train()
    with pytest.warns(UserWarning, match="requires_grad"):
        F.cross_entropy(model(x), y).backward()
    assert model.layer3[0].conv1.weight.grad is None  # the bug is real: no gradient got through
    fk.Policy(fk.unfreeze("layer2.1")).apply(model)
    assert fk.audit(model) == []

    vit = timm_model("test_vit")
    vit.set_grad_checkpointing(True)
    fk.Policy(fk.freeze("*"), fk.unfreeze(fk.last("blocks", 1), "head")).apply(vit)
    reentrant = timm.layers.use_reentrant_ckpt()
    try:
        timm.layers.set_reentrant_ckpt(True)
        assert fk.audit(vit).codes == ["FK006"]
        timm.layers.set_reentrant_ckpt(False)
        assert fk.audit(vit) == []
    finally:
        timm.layers.set_reentrant_ckpt(reentrant)


def test_fk007_tied_parameters_in_conflict():
    model = Tied()
    model.out.weight = nn.Parameter(model.emb.weight.data)  # tied through .data: two tensors, one storage
    model.out.weight.requires_grad_(False)
    (finding,) = fk.audit(model)
    assert finding.code == "FK007" and set(finding.names) == {"emb.weight", "out.weight"}

    shared = Tied()
    fk.Policy(fk.detach("emb")).apply(shared)  # one tensor, behind a boundary under one name only
    (finding,) = fk.audit(shared)
    assert finding.code == "FK007" and finding.names == ("emb.weight",)


def test_report_reads_well():
    model = tv_resnet("resnet18")
    trained_once(model)
    model.layer1.requires_grad_(False)
    text = str(fk.audit(model))
    assert text.startswith("audit: 2 problems")
    assert "FK001 frozen parameters hold a stale .grad: layer1.0.conv1.weight" in text and "fix: " in text
