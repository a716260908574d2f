"""Phases and schedules: once each, in order, optimizer in step, and exactly resumable."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import flags, image_batch, timm_model
from hypothesis import given, settings
from hypothesis import strategies as st

import freezekit as fk

POOL = [
    fk.Policy(fk.freeze("*"), fk.unfreeze("fc")),
    fk.Policy(fk.unfreeze(fk.last("layer", 1))),
    fk.Policy(fk.freeze("layer4.0*")),
    fk.Policy(fk.unfreeze("layer3*", "layer4*")),
    fk.Policy(fk.freeze("*"), fk.unfreeze("layer2*")),
    fk.Policy(fk.unfreeze("*")),
]
OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9),
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
}


def one_step(model, optimizer, seed):
    x, y = image_batch(2, classes=1000, seed=seed)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


@settings(max_examples=12, deadline=None)
@given(picks=st.lists(st.tuples(st.sampled_from(range(len(POOL))), st.integers(0, 2)), min_size=1, max_size=4),
       optimizer=st.sampled_from(sorted(OPTIMIZERS)), visits=st.lists(st.integers(0, 12), min_size=1, max_size=5))
def test_phases_never_duplicate_and_frozen_never_moves(picks, optimizer, visits):
    model = timm_model("test_resnet")
    at, phases = 0, []
    for policy, gap in picks:
        phases.append(fk.Phase(at, POOL[policy]))
        at += gap
    schedule = fk.Schedule(*phases)
    fk.Policy(fk.freeze("*"), fk.unfreeze("fc")).apply(model)
    opt = OPTIMIZERS[optimizer](fk.param_groups(model, lr=1e-2, weight_decay=0.05))
    for step, epoch in enumerate(sorted(visits)):  # skipped epochs: the schedule catches up
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fk.DeadRuleWarning)
            schedule.update(model, opt, epoch=epoch)
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        assert {id(p) for p in model.parameters() if p.requires_grad} <= set(ids)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        one_step(model, opt, step)
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n
    assert schedule.completed == sum(p.at <= max(visits) for p in phases)  # each due phase, once


PROBE = fk.Policy(fk.freeze("*"), fk.unfreeze("fc"))


def later_phases():
    return fk.Schedule(fk.Phase(2, fk.Policy(fk.unfreeze("layer4")), lr_mult=0.1),
                       fk.Phase(4, fk.Policy(fk.unfreeze("layer3"))))


def make_run(model=None):
    """The usual shape: a starting policy, the optimizer over what it leaves trainable, and phases
    that add to it later."""
    if model is None:
        torch.manual_seed(0)
        model = timm_model("test_resnet")
    PROBE.apply(model)
    optimizer = torch.optim.AdamW(fk.param_groups(model, lr=1e-2, weight_decay=0.05))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    return model, later_phases(), optimizer, scheduler


def run_epochs(model, schedule, optimizer, scheduler, epochs):
    for epoch in epochs:
        schedule.update(model, optimizer, epoch=epoch, scheduler=scheduler)
        for step in range(2):
            one_step(model, optimizer, seed=100 * epoch + step)
            scheduler.step()


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one():
    model, schedule, optimizer, scheduler = make_run()
    run_epochs(model, schedule, optimizer, scheduler, range(0, 6))

    first, s1, o1, c1 = make_run()
    run_epochs(first, s1, o1, c1, range(0, 3))  # stop after epoch 2: phase 1 done, phase 2 not yet
    checkpoint = copy.deepcopy({"model": first.state_dict(), "optimizer": o1.state_dict(),
                                "scheduler": c1.state_dict(), "schedule": s1.state_dict()})

    torch.manual_seed(123)  # a different process, a fresh model
    fresh = timm_model("test_resnet")
    fresh.load_state_dict(checkpoint["model"])
    fresh, schedule2, optimizer2, scheduler2 = make_run(fresh)  # the same code as the first run
    schedule2.load_state_dict(checkpoint["schedule"])
    events = schedule2.replay(fresh, optimizer2, scheduler2)
    assert [e.phase for e in events] == [0] and all(e.replayed for e in events)
    assert [g["name"] for g in optimizer2.param_groups] == [g["name"] for g in o1.param_groups]
    optimizer2.load_state_dict(checkpoint["optimizer"])
    scheduler2.load_state_dict(checkpoint["scheduler"])
    assert flags(fresh) == flags(first)
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in o1.param_groups]
    run_epochs(fresh, schedule2, optimizer2, scheduler2, range(3, 6))
    assert flags(fresh) == flags(model)
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_update_replays_then_catches_up_in_order():
    model = timm_model("test_resnet")
    schedule = fk.Schedule(fk.Phase(0, PROBE), *later_phases().phases)
    events = schedule.update(model, None, epoch=7)
    assert [(e.phase, e.at) for e in events] == [(0, 0), (1, 2), (2, 4)] and schedule.completed == 3
    assert schedule.update(model, None, epoch=8) == []
    assert str(events[1]).startswith("phase 1 at epoch 2: ")
    again = fk.Schedule(*schedule.phases)
    again.load_state_dict(schedule.state_dict())
    fresh = timm_model("test_resnet")
    assert [e.replayed for e in again.update(fresh, None, epoch=8)] == [True, True, True]
    assert flags(fresh) == flags(model)


def test_step_phases_and_mixed_units():
    model = timm_model("test_resnet")
    schedule = fk.Schedule(fk.Phase(0, fk.Policy(fk.freeze("*"))), fk.Phase(10, fk.Policy(fk.unfreeze("fc")),
                                                                            unit="step"))
    schedule.update(model, None, epoch=0, step=3)
    assert schedule.completed == 1 and not model.fc.weight.requires_grad
    schedule.update(model, None, step=10)
    assert model.fc.weight.requires_grad


def test_gradual_unfreeze_and_config_round_trip():
    schedule = fk.gradual_unfreeze(["layer4", "layer3", ["layer2", "layer1"]], start=2, every=3, lr_mult=0.5)
    assert [p.at for p in schedule.phases] == [2, 5, 8] and all(p.lr_mult == 0.5 for p in schedule.phases)
    config = yaml.safe_load(yaml.safe_dump(schedule.to_config()))
    again = fk.Schedule.from_config(config)
    assert again.to_config() == config and again.phases == schedule.phases
    ulmfit = fk.Schedule.from_config({"gradual_unfreeze": {"groups": ["layer4", "layer3"], "start": 1}})
    assert [p.policy for p in ulmfit.phases] == [fk.Policy(fk.unfreeze("layer4")), fk.Policy(fk.unfreeze("layer3"))]


@pytest.mark.parametrize("config,message", [
    ([{"at": 1}], r"schedule\[0\]: expected \{at: N, policy"),
    ([{"at": 1, "policy": [{"unfreeze": "fc"}], "lr_mul": 0.1}],
     r"schedule\[0\]\.lr_mul: unknown key 'lr_mul'; did you mean 'lr_mult'\?"),
    ([{"at": -1, "policy": [{"unfreeze": "fc"}]}], r"schedule\[0\]: Phase\(\): at: expected"),
    ([{"at": 1, "policy": [{"unfreez": "fc"}]}], r"schedule\[0\]\.policy\[0\]: expected exactly one action key"),
    ({"gradual_unfreeze": {"groups": [], "start": 1}}, r"schedule\.gradual_unfreeze\.groups: expected a non-empty"),
    ({"gradual_unfreeze": {"groups": ["a"], "every": 0}}, r"every: expected an int >= 1"),
])
def test_config_errors_name_the_field(config, message):
    with pytest.raises(fk.ConfigError, match=message):
        fk.Schedule.from_config(config)


def test_loading_a_state_of_another_schedule_is_refused():
    schedule = fk.gradual_unfreeze(["layer4", "layer3"])
    with pytest.raises(fk.ConfigError, match="schedule with 3 phases"):
        schedule.load_state_dict({"version": 1, "completed": 3, "phases": 3})
    with pytest.raises(TypeError, match="pass epoch"):
        schedule.update(timm_model("test_resnet"), None)


# ------------------------------------------------------------------- optimizers freezekit knows about


def test_unfreezing_past_a_known_optimizer_warns_and_syncing_does_not():
    model, schedule, optimizer, _ = make_run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unknown optimizer: nothing to say
        fk.Policy(fk.unfreeze("layer4.0.conv1")).apply(model)
    fk.track_optimizer(optimizer, model)
    with pytest.warns(fk.FreezekitWarning, match=r"made \d+ parameters trainable that the AdamW does not hold "
                                                  r"\(layer4\.0\.bn1"):
        fk.Policy(fk.unfreeze("layer4")).apply(model)
    fk.sync_optimizer(optimizer, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # held now; and a schedule given the optimizer syncs before it checks
        fk.Policy(fk.unfreeze("layer4")).apply(model)
        schedule.update(model, optimizer, epoch=4)
    with pytest.warns(fk.FreezekitWarning, match=r"schedule phase 0 \(epoch 0\)"):  # a schedule not given it
        fk.Schedule(fk.Phase(0, fk.Policy(fk.unfreeze("*")))).update(model, None, epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fk.Policy(fk.unfreeze("*")).apply(model, check_optimizers=False)


def test_a_resume_in_the_wrong_order_names_the_fix():
    first, s1, o1, c1 = make_run()
    run_epochs(first, s1, o1, c1, range(0, 3))
    saved = copy.deepcopy({"optimizer": o1.state_dict(), "schedule": s1.state_dict()})
    fresh, schedule, optimizer, _ = make_run(timm_model("test_resnet"))
    fk.track_optimizer(optimizer, fresh)
    schedule.load_state_dict(saved["schedule"])
    with pytest.raises(fk.StateError, match=r"AdamW.load_state_dict: the saved optimizer has 4 parameter groups .*"
                                            r"schedule.replay\(model, optimizer\)"):
        optimizer.load_state_dict(saved["optimizer"])
    schedule.replay(fresh, optimizer)
    optimizer.load_state_dict(saved["optimizer"])  # the right order
    assert [g["name"] for g in optimizer.param_groups] == [g["name"] for g in o1.param_groups]


def test_a_phase_warns_that_its_lr_mult_misses_what_the_optimizer_held_while_frozen():
    """Over all the parameters (model.parameters()), the optimizer already holds what a phase
    unfreezes: nothing is added, and lr_mult would be ignored without a word."""
    model = timm_model("test_resnet")
    fk.Policy(fk.freeze("*"), fk.unfreeze("fc")).apply(model)
    schedule = fk.Schedule(fk.Phase(1, fk.Policy(fk.unfreeze("layer4")), lr_mult=0.1))
    everything = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(fk.FreezekitWarning, match=r"schedule phase 0 \(epoch 1\): its lr_mult 0.1 does not reach "
                                                 r"\d+ parameters the SGD held while they were frozen"):
        schedule.update(model, everything, epoch=1)
    model = timm_model("test_resnet")
    fk.Policy(fk.freeze("*"), fk.unfreeze("fc")).apply(model)
    schedule = fk.Schedule(fk.Phase(1, fk.Policy(fk.unfreeze("layer4")), lr_mult=0.1))
    trainable = torch.optim.SGD(fk.param_groups(model, lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fk.FreezekitWarning)
        schedule.update(model, trainable, epoch=1)  # the phase adds layer4, at 0.1 x
    added = [g["lr"] for g in trainable.param_groups if g["name"].startswith("sync")]
    assert added and added == pytest.approx([0.01] * len(added))
