"""The policy engine on real architectures, checked against plain PyTorch written by hand."""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    ConvNet,
    Tied,
    flags,
    image_batch,
    meta_model,
    modes,
    snapshot,
    timm_model,
    trainable,
    tv_resnet,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import freezekit as fk

REAL = {
    "tv_resnet18": lambda: tv_resnet("resnet18"),
    "tv_resnet50": lambda: tv_resnet("resnet50"),
    "test_resnet": lambda: timm_model("test_resnet"),
    "test_vit": lambda: timm_model("test_vit"),
    "test_convnext": lambda: timm_model("test_convnext"),
}
META = ["resnet50", "vit_base_patch16_224", "convnext_tiny", "efficientnet_b0", "swin_tiny_patch4_window7_224"]


def head_of(model: nn.Module) -> str:
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None)
    return cfg["classifier"] if cfg else "fc"


def all_models():
    for name, make in REAL.items():
        yield name, make
    for name in META:
        yield f"meta:{name}", lambda name=name: meta_model(name)


MODELS = list(all_models())


# -------------------------------------------------------------------------------------- selecting


@pytest.mark.parametrize("name,make", MODELS, ids=[n for n, _ in MODELS])
def test_linear_probe_leaves_exactly_the_head_trainable(name, make):
    model = make()
    head = head_of(model)
    fk.Policy(fk.freeze("*"), fk.unfreeze(head)).apply(model)
    by_hand = {n for n, _ in model.named_parameters() if n.startswith(head + ".")}
    assert by_hand and trainable(model) == by_hand


@pytest.mark.parametrize("name,make", MODELS, ids=[n for n, _ in MODELS])
def test_plan_changes_nothing_and_predicts_apply(name, make):
    model = make()
    policy = fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze(head_of(model)), fk.eval_mode(fk.norms()),
                       strict=False)
    before = (flags(model), modes(model), [id(m) for m in model.modules()], snapshot(model))
    plan = policy.plan(model)
    after = (flags(model), modes(model), [id(m) for m in model.modules()], snapshot(model))
    assert before[:3] == after[:3]
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3] if before[3][k].device.type != "meta")
    policy.apply(model)
    assert {n for n, p in plan.parameters.items() if p.requires_grad} == trainable(model)
    assert {n: m.eval_locked for n, m in plan.modules.items()} == \
        {n: fk.lock.is_locked(m) for n, m in model.named_modules()}


RULE_POOL = [
    fk.freeze("*"), fk.unfreeze("layer4*"), fk.freeze("*.bias"), fk.unfreeze(fk.norms()),
    fk.freeze(fk.first("layer", 2)), fk.unfreeze("fc"), fk.freeze("re:layer\\d\\.1\\..*"),
    fk.freeze(fk.types(nn.Conv2d)), fk.unfreeze("layer2.0"), fk.freeze("*", norm="trainable"),
]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(range(len(RULE_POOL))), min_size=1, max_size=6))
def test_last_rule_wins_like_a_hand_simulation(rule_ids):
    model = tv_resnet("resnet18")
    expected = flags(model)
    norm_params = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for n in
                   (f"{n}.weight", f"{n}.bias")}
    for i in rule_ids:  # plain PyTorch semantics: apply each rule's selection in order
        rule = RULE_POOL[i]
        for name in rule.selectors[0].select(model).parameters:
            value = rule.action == "unfreeze" or (rule.norm == "trainable" and name in norm_params)
            expected[name] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fk.DeadRuleWarning)
        fk.Policy(*(RULE_POOL[i] for i in rule_ids)).apply(model)
    assert flags(model) == expected


def test_last_rule_wins_both_ways(resnet18):
    fk.Policy(fk.freeze("*"), fk.unfreeze("layer4*"), fk.freeze("layer4.1.bn*")).apply(resnet18)
    got = trainable(resnet18)
    assert "layer4.0.conv1.weight" in got and "layer4.1.conv1.weight" in got
    assert "layer4.1.bn1.weight" not in got and "fc.weight" not in got
    with pytest.warns(fk.DeadRuleWarning, match=r"policy\[0\] unfreeze\('layer4\*'\) is dead"):
        fk.Policy(fk.unfreeze("layer4*"), fk.freeze("*")).apply(resnet18)
    assert trainable(resnet18) == set()


def test_tied_parameter_is_decided_once_by_the_last_rule():
    m = Tied()
    fk.Policy(fk.freeze("emb")).apply(m)
    assert not m.out.weight.requires_grad
    m = Tied()
    with pytest.warns(fk.DeadRuleWarning):
        fk.Policy(fk.freeze("emb"), fk.unfreeze("out")).apply(m)
    assert m.emb.weight.requires_grad


# -------------------------------------------------------------------------------- training safety


def train_steps(model, optimizer, steps=3, classes=10, seed=0, size=32):
    for i in range(steps):
        x, y = image_batch(4, size=size, classes=classes, seed=seed + i)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def by_hand_probe(model: nn.Module, head: str):
    """The linear probe as people write it in plain PyTorch: flags off, head on, and every norm
    layer outside the head put back into eval mode after each model.train()."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head + "."))
        if not p.requires_grad:
            p.grad = None
    norms = [m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not n.startswith(head)]
    original_train = model.train

    def train(mode=True):
        original_train(mode)
        for m in norms:
            m.eval()
        return model

    model.train = train


@pytest.mark.parametrize("name,opt", [(n, o) for n in ("tv_resnet18", "test_resnet", "test_vit", "test_convnext")
                                      for o in ("sgd", "adamw")] + [("tv_resnet50", "adamw")])
def test_probe_trains_exactly_like_hand_written_pytorch(name, opt):
    classes = 1000 if name.startswith("test_") else 10
    ours, hand = REAL[name](), REAL[name]()
    hand.load_state_dict(ours.state_dict())
    head = head_of(ours)
    # both start by training everything one step, so .grad and optimizer state are filled...
    opt_ours, opt_hand = make_optimizer(opt, ours.parameters()), make_optimizer(opt, hand.parameters())
    train_steps(ours, opt_ours, 1, classes)
    train_steps(hand, opt_hand, 1, classes)
    x, y = image_batch(4, classes=classes, seed=99)
    F.cross_entropy(ours(x), y).backward()  # ...and .grad is full when the freeze comes
    F.cross_entropy(hand(x), y).backward()
    fk.Policy(fk.freeze("*"), fk.unfreeze(head)).apply(ours)
    by_hand_probe(hand, head)
    frozen = {n: t.clone() for n, t in snapshot(ours).items() if not n.startswith(head + ".")}
    train_steps(ours, opt_ours, 3, classes, seed=10)
    train_steps(hand, opt_hand, 3, classes, seed=10)
    now = snapshot(ours)
    for n, t in frozen.items():  # frozen weights and every statistic: bit-identical
        assert torch.equal(now[n], t), n
    for n, t in snapshot(hand).items():  # and the trained head equals the hand-written run's
        assert torch.equal(now[n], t), n
    assert any(not torch.equal(now[n], t) for n, t in snapshot(REAL[name]()).items() if n.startswith(head))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_frozen_stays_frozen_with_an_optimizer_that_holds_everything(opt):
    model = ConvNet()
    optimizer = make_optimizer(opt, model.parameters())
    train_steps(model, optimizer, 2, classes=3, size=8)
    x, y = image_batch(4, size=8, classes=3, seed=5)
    F.cross_entropy(model(x), y).backward()  # stale .grad everywhere, momentum and Adam state too
    fk.Policy(fk.freeze("*"), fk.unfreeze("head.2")).apply(model)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head.2"))
    frozen = {n: t for n, t in snapshot(model).items() if not n.startswith("head.2")}
    train_steps(model, optimizer, 3, classes=3, size=8, seed=20)
    now = snapshot(model)
    assert all(torch.equal(now[n], t) for n, t in frozen.items())


@pytest.mark.parametrize("mode", ["eval", "frozen_bn"])
def test_norm_statistics_never_move(mode, resnet18):
    fk.Policy(fk.freeze("*", norm=mode), fk.unfreeze("fc")).apply(resnet18)
    stats = {n: b.clone() for n, b in resnet18.named_buffers()}
    optimizer = make_optimizer("sgd", [p for p in resnet18.parameters() if p.requires_grad])
    train_steps(resnet18, optimizer, 3)
    assert all(torch.equal(b, stats[n]) for n, b in resnet18.named_buffers())


def test_norm_train_lets_statistics_move_and_trainable_keeps_affine_trainable(resnet18):
    fk.Policy(fk.freeze("layer1", norm="train")).apply(resnet18)
    resnet18.train()
    assert resnet18.layer1[0].bn1.training and not resnet18.layer1[0].bn1.weight.requires_grad
    before = resnet18.layer1[0].bn1.running_mean.clone()
    resnet18(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, resnet18.layer1[0].bn1.running_mean)

    model = tv_resnet("resnet18")
    fk.Policy(fk.freeze("*", norm="trainable")).apply(model)
    norm_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
                   for p in ("weight", "bias")}
    assert trainable(model) == norm_params
    model.train()
    assert all(m.training for m in model.modules())


def test_later_rules_release_locks_and_swaps(resnet18):
    fk.Policy(fk.freeze("*"), fk.unfreeze("layer4")).apply(resnet18)
    resnet18.train()
    assert resnet18.layer4[0].bn1.training and not resnet18.layer3[0].bn1.training
    model = tv_resnet("resnet18")
    fk.Policy(fk.eval_mode("layer1"), fk.freeze("layer1", norm="train")).apply(model)
    model.train()
    assert model.layer1[0].bn1.training  # the norm layers were released...
    assert not model.layer1[0].training and not model.layer1[0].conv1.training  # ...the rest stays locked
    model = tv_resnet("resnet18")
    fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze("layer4.0")).apply(model)
    assert isinstance(model.layer3[0].bn1, fk.FrozenBatchNorm)
    assert type(model.layer4[0].bn1) is nn.BatchNorm2d and model.layer4[0].bn1.weight.requires_grad


@pytest.mark.parametrize("norm", ["eval", "frozen_bn"])
def test_released_modules_take_the_mode_the_model_is_in_not_a_stale_one(norm):
    """Lightning's validation loop calls eval() and then writes each module's saved ``training``
    back directly; a lock (or a frozen BatchNorm) saw only the eval(). What an unfreeze releases
    must train like the model around it."""
    model = tv_resnet("resnet18")
    fk.Policy(fk.freeze("*", norm=norm), fk.unfreeze("fc")).apply(model)
    model.train()
    saved = {name: m.training for name, m in model.named_modules()}
    model.eval()
    for name, m in model.named_modules():  # what Lightning's _ModuleMode.restore does
        m.training = saved[name]
    fk.Policy(fk.unfreeze("layer4")).apply(model)
    bn = model.layer4[0].bn1
    assert type(bn) is nn.BatchNorm2d
    assert all(m.training for m in model.layer4.modules())
    frozen = model.layer3[0].bn1
    assert isinstance(frozen, fk.FrozenBatchNorm) if norm == "frozen_bn" else not frozen.training
    model.eval()  # and a later eval() still reaches them
    assert not bn.training


# ---------------------------------------------------------------------------------- frozen BatchNorm


def warmed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn_like(x) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("make,shape", [
    (lambda: tv_resnet("resnet18"), (2, 3, 32, 32)),
    (ConvNet, (2, 3, 8, 8)),
    (lambda: timm_model("test_efficientnet"), (2, 3, 32, 32)),  # timm BatchNormAct2d
])
def test_frozen_bn_keeps_outputs_keys_and_parameters(make, shape):
    x = torch.randn(*shape)
    model = warmed(make(), x)
    ref = model(x)
    keys, count = list(model.state_dict()), sum(p.numel() for p in model.parameters())
    params = {n: p for n, p in model.named_parameters()}
    # dropout would change train-mode outputs: keep it off, the freezekit way
    applied = fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.eval_mode(fk.types(nn.Dropout), strict=False)).apply(model)
    swapped = [m for m in model.modules() if isinstance(m, fk.FrozenBatchNorm)]
    assert swapped and not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
                               for m in model.modules())
    assert list(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == count
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizer references stay valid
    model.train()  # a frozen BatchNorm ignores the mode
    assert torch.equal(model(x), ref)
    applied.undo()
    model.eval()
    assert torch.equal(model(x), ref)


def test_frozen_bn_undo_after_the_model_moved_dtype(resnet18):
    originals = {n: m for n, m in resnet18.named_modules() if isinstance(m, nn.BatchNorm2d)}
    applied = fk.Policy(fk.freeze("*", norm="frozen_bn")).apply(resnet18)
    resnet18.double()
    applied.undo()
    for n, m in resnet18.named_modules():
        if n in originals:
            assert m is originals[n] and m.running_mean.dtype == torch.float64 and m.weight.dtype == torch.float64
    resnet18.eval()(torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_bn_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    fk.Policy(fk.freeze("*", norm="frozen_bn")).apply(model)
    model.train()
    assert type(model[1]) is nn.BatchNorm1d and model[1].training  # nothing fixed to normalize with


# ------------------------------------------------------------------------------------ undo and locks


def full_state(model):
    return (flags(model), modes(model), [(n, id(m), type(m)) for n, m in model.named_modules()],
            {n: ("train" in m.__dict__, "forward" in m.__dict__) for n, m in model.named_modules()})


@pytest.mark.parametrize("name", ["tv_resnet18", "test_vit", "test_convnext"])
def test_undo_restores_everything_bit_for_bit(name):
    model = REAL[name]()
    model.get_submodule(next(n for n, _ in model.named_children())).requires_grad_(False)  # irregular start
    model.train()
    before, weights = full_state(model), snapshot(model)
    a = fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze(head_of(model))).apply(model)
    b = fk.Policy(fk.eval_mode(fk.norms(), strict=False), fk.detach(fk.first(
        "layer" if name == "tv_resnet18" else ("blocks" if name == "test_vit" else "stages"), 1))).apply(model)
    c = fk.Policy(fk.unfreeze("*")).apply(model)
    model.train()
    model.eval()
    model.train()
    c.undo()
    b.undo()
    a.undo()
    assert full_state(model) == before
    assert all(torch.equal(t, weights[n]) for n, t in snapshot(model).items())


def test_undo_out_of_order_is_refused_and_twice_is_harmless(resnet18):
    a = fk.Policy(fk.freeze("layer1")).apply(resnet18)
    b = fk.Policy(fk.unfreeze("layer1.0")).apply(resnet18)
    with pytest.raises(fk.FreezekitError, match="undo out of order"):
        a.undo()
    b.undo()
    a.undo()
    a.undo()
    assert all(p.requires_grad for p in resnet18.parameters())


def test_applied_context_manager(resnet18):
    with fk.Policy(fk.freeze("*")).applied(resnet18) as handle:
        assert trainable(resnet18) == set() and handle.changes
    assert len(trainable(resnet18)) == len(list(resnet18.parameters()))


def test_a_failure_midway_leaves_the_model_untouched(resnet18, monkeypatch):
    before = full_state(resnet18)

    def flaky(modules):  # locks four, then fails
        original(list(modules)[:4])
        raise RuntimeError("boom")

    original = fk.lock.lock_all
    monkeypatch.setattr(fk.lock, "lock_all", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze("layer4"), fk.eval_mode("layer1")).apply(resnet18)
    assert full_state(resnet18) == before


def test_eval_lock_survives_train_deepcopy_and_pickle(resnet18):
    fk.Policy(fk.freeze("layer1"), fk.eval_mode("layer2.0.bn1")).apply(resnet18)
    for model in (resnet18, copy.deepcopy(resnet18), pickle.loads(pickle.dumps(resnet18))):
        model.train()
        assert not model.layer1[0].bn1.training and not model.layer2[0].bn1.training
        assert model.layer2[0].bn2.training and model.layer1[0].training
    buf = io.BytesIO()
    torch.save(resnet18, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded.train()
    assert not loaded.layer1[0].bn1.training


def test_released_module_takes_the_mode_last_asked(resnet18):
    resnet18.eval()
    applied = fk.Policy(fk.eval_mode("layer1")).apply(resnet18)
    assert not resnet18.layer1.training
    applied.undo()
    assert not resnet18.layer1.training  # eval was asked before the apply
    applied = fk.Policy(fk.eval_mode("layer1")).apply(resnet18)
    resnet18.train()
    assert not resnet18.layer1.training
    applied.undo()
    assert resnet18.layer1.training  # train was asked while locked


def test_eval_mode_keeps_dropout_off():
    model = timm_model("test_vit", drop_rate=0.5, proj_drop_rate=0.5)
    fk.Policy(fk.eval_mode("blocks")).apply(model)
    model.train()
    assert all(not m.training for n, m in model.named_modules() if n.startswith("blocks"))
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(model.forward_features(x), model.forward_features(x))  # the blocks' dropout is off
    fk.Policy(fk.unfreeze("blocks")).apply(model)
    assert not torch.equal(model.forward_features(x), model.forward_features(x))  # and back on


# ---------------------------------------------------------------------------------- errors and plans


def test_no_match_names_rule_pattern_and_closest(resnet18):
    before = flags(resnet18)
    with pytest.raises(fk.NoMatchError) as e:
        fk.Policy(fk.freeze("*"), fk.unfreeze("layer5*", "fc"), fk.freeze("lyaer1.0.conv1")).apply(resnet18)
    msg = str(e.value)
    assert re.search(r"policy\[1\]\.unfreeze: 'layer5\*' matched nothing in ResNet; closest: 'layer\d'", msg)
    assert "policy[2].freeze: 'lyaer1.0.conv1' matched nothing in ResNet; closest: 'layer1.0.conv1'" in msg
    assert len(e.value.problems) == 2
    assert flags(resnet18) == before  # nothing half-applied
    assert isinstance(e.value, ValueError)


def test_no_match_in_big_models_suggests_fast(vit):
    with pytest.raises(fk.NoMatchError, match=r"'blocks\.\*\.atn\.qkv' matched nothing in VisionTransformer; "
                                              r"closest: 'blocks\.0\.attn\.qkv'"):
        fk.Policy(fk.freeze("blocks.*.atn.qkv")).plan(vit)


def test_other_no_match_messages(resnet18):
    with pytest.raises(fk.NoMatchError, match=r"'BatchNorm3d' matched no module of ResNet; closest: 'BatchNorm2d'"):
        fk.Policy(fk.freeze(fk.types("BatchNorm3d"))).plan(resnet18)
    with pytest.raises(fk.NoMatchError, match=r"'layerz' is not a container"):
        fk.Policy(fk.freeze(fk.first("layerz", 1))).plan(resnet18)
    with pytest.raises(fk.NoMatchError, match=r"selected nothing in ResNet: every match was excluded"):
        fk.Policy(fk.freeze(fk.glob("fc") - fk.glob("fc*"))).plan(resnet18)
    with pytest.raises(fk.NoMatchError, match=r"'nothing\*' \(in glob\('nothing\*'\) \| glob\('fc'\)\) matched"):
        fk.Policy(fk.freeze(fk.glob("nothing*") | "fc")).plan(resnet18)


def test_strict_false_on_rule_or_policy(resnet18):
    fk.Policy(fk.freeze("layer5*", strict=False), fk.freeze("fc")).apply(resnet18)
    fk.Policy(fk.freeze("layer5*"), strict=False).apply(resnet18)
    assert trainable(resnet18) == {n for n, _ in resnet18.named_parameters()} - {"fc.weight", "fc.bias"}


def test_plan_reports_changes_states_and_rules(resnet18):
    policy = fk.Policy(fk.freeze("*", norm="frozen_bn"), fk.unfreeze("fc"), fk.detach("layer1"),
                       fk.eval_mode("layer2.0"))
    plan = policy.plan(resnet18)
    text = str(plan)
    assert "policy[1] unfreeze('fc'): 2 parameters trainable" in text and "fc.weight" in text
    kinds = {c.kind for c in plan.changes}
    assert kinds == {"requires_grad", "frozen_bn", "eval_lock", "boundary"}
    assert plan.parameters["fc.weight"].status == "trainable" and plan.parameters["fc.weight"].rule == policy.rules[1]
    assert plan.parameters["layer1.0.conv1.weight"].status == "frozen"
    assert plan.modules["layer1.0.bn1"].frozen_bn and plan.modules["layer1.0.bn1"].type == "FrozenBatchNorm"
    assert plan.modules["layer1"].boundaries == ("output",)
    assert plan.modules["layer2.0"].eval_locked
    assert plan.trainable == ["fc.weight", "fc.bias"]
    applied = policy.apply(resnet18)
    assert [str(c) for c in applied.changes] == [str(c) for c in plan.changes]
    assert policy.plan(resnet18).changes == []  # all done already: no second boundary either


def test_detached_status_in_plan():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    plan = fk.Policy(fk.detach("0"), fk.freeze("1.bias")).plan(model)
    assert {n: p.status for n, p in plan.parameters.items()} == \
        {"0.weight": "detached", "0.bias": "detached", "1.weight": "trainable", "1.bias": "frozen"}


# ---------------------------------------------------------------------------------------- configs


def test_config_round_trip_every_selector_kind():
    policy = fk.Policy(
        fk.freeze("*", norm="frozen_bn"), fk.unfreeze("fc", "layer4.*"), fk.freeze(fk.regex(r"layer\d", "x")),
        fk.unfreeze(fk.names("layer1.0")), fk.eval_mode(fk.types(nn.BatchNorm2d, "timm.layers.BatchNormAct2d")),
        fk.freeze(fk.norms(), norm="trainable"), fk.unfreeze(fk.first("layer", 2) | fk.last("layer4", 1)),
        fk.freeze((fk.glob("a", "b") & "re:c") - ~fk.glob("d")), fk.detach("layer1", at="input", no_grad=False),
        fk.unfreeze("re:layer2", strict=False),
    )
    import yaml

    config = yaml.safe_load(yaml.safe_dump(policy.to_config()))
    again = fk.Policy.from_config(config)
    assert again.to_config() == config and fk.Policy.from_config(again.to_config()) == again
    model, twin = tv_resnet("resnet18"), tv_resnet("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fk.DeadRuleWarning)
        for p, m in ((policy, model), (again, twin)):
            fk.Policy(p, strict=False).apply(m)
    assert full_state(model)[:2] == full_state(twin)[:2]
    assert config[0] == {"freeze": "*", "norm": "frozen_bn"}
    assert config[4] == {"eval_mode": {"types": ["BatchNorm2d", "timm.layers.BatchNormAct2d"]}}


def test_where_has_no_config_form():
    with pytest.raises(TypeError, match="where\\(\\) selects with a Python function"):
        fk.Policy(fk.freeze(fk.where(lambda n, o: True))).to_config()


@pytest.mark.parametrize("config,message", [
    ([{"freez": "*"}], r"policy\[0\]: expected exactly one action key .* found none; did you mean 'freeze'\?"),
    ([{"freeze": "*", "norm": "evl"}], r"policy\[0\]: freeze\(\): norm: 'evl' is not one of .*did you mean 'eval'\?"),
    ([{"freeze": "*", "at": "input"}], r"policy\[0\]\.at: not an option of freeze"),
    ([{"unfreeze": {"regx": "a"}}], r"policy\[0\]\.unfreeze: unknown selector 'regx'; did you mean 'regex'\?"),
    ([{"unfreeze": ["a", {"first": {"of": "blocks"}}]}], r"policy\[0\]\.unfreeze\[1\]\.first: expected \{of"),
    ([{"detach": "a", "no_grad": "yes"}], r"policy\[0\]: detach\(\): no_grad: expected True or False"),
    ([{"freeze": []}], r"policy\[0\]\.freeze: expected a pattern"),
    ({"freeze": "*"}, r"policy: expected a list of rules"),
    ([{"freeze": "*", "unfreeze": "fc"}], r"found 'freeze', 'unfreeze'"),
    ([{"freeze": {"regex": "a["}}], r"bad regular expression 'a\['"),
])
def test_config_errors_name_the_field(config, message):
    with pytest.raises((fk.ConfigError, fk.PatternError), match=message):
        fk.Policy.from_config(config)


def test_rule_arguments_are_checked():
    with pytest.raises(TypeError, match="freeze\\(\\) needs at least one selector"):
        fk.freeze()
    with pytest.raises(ValueError, match="norm: 'frozen' is not one of eval, frozen_bn, train, trainable"):
        fk.freeze("*", norm="frozen")
    with pytest.raises(ValueError, match="at: 'outptu' is not one of output, input; did you mean 'output'"):
        fk.detach("*", at="outptu")
    with pytest.raises(TypeError, match="Policy\\(\\) argument 1: expected a rule"):
        fk.Policy("freeze *")
    nested = fk.Policy(fk.Policy(fk.freeze("a")), fk.unfreeze("b"))
    assert nested == fk.Policy(fk.freeze("a")) + fk.Policy(fk.unfreeze("b"))
