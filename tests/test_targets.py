"""Target networks: frozen copies, Polyak and hard updates, checked against the formula by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import timm_model

import freezekit as fk


def online_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))


def test_frozen_copy_is_frozen_locked_and_independent():
    online = online_net()
    online(torch.randn(16, 4)).sum().backward()  # .grad everywhere, to be dropped by the copy
    target = fk.frozen_copy(online)
    assert all(not p.requires_grad and p.grad is None for p in target.parameters())
    target.train()
    assert not any(m.training for m in target.modules())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(target.parameters(), online.parameters()))
    assert all(p.requires_grad for p in online.parameters())
    x = torch.randn(3, 4)
    assert torch.equal(target(x), target(x))  # dropout off, statistics fixed


def test_polyak_update_matches_the_formula_for_parameters_and_buffers():
    online, target = online_net(), fk.frozen_copy(online_net())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online.train()
    online(torch.randn(16, 4))  # move the running statistics and the batch counter
    expected = {n: (0.9 * t + 0.1 * online.state_dict()[n]) if t.is_floating_point() else online.state_dict()[n]
                for n, t in target.state_dict().items()}
    fk.polyak_update(target, online, tau=0.1)
    for n, t in target.state_dict().items():
        torch.testing.assert_close(t, expected[n], rtol=0, atol=1e-6, msg=n)
    assert not any(p.requires_grad for p in target.parameters())


def _floats(module):
    return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]


def _by_hand(target, online, tau):
    """What polyak_update must do, written out: one lerp of the float tensors, copies of the rest."""
    floats = [t.clone() for t in _floats(target)]
    torch._foreach_lerp_(floats, _floats(online), tau)
    others = [t.clone() for t in online.buffers() if not t.is_floating_point()]
    return floats, others


def _moved_online(make):
    online = make()
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    return online


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)),
    lambda: timm_model("test_resnet"),
], ids=["mlp", "test_resnet"])
def test_polyak_update_is_the_hand_written_lerp_bit_for_bit(make):
    online = _moved_online(make)
    target = fk.frozen_copy(make())
    for step, tau in enumerate((0.1, 0.005, 0.3)):  # the first call matches the modules, the others reuse it
        online.train()
        online(torch.randn(4, 64) if isinstance(online, nn.Sequential) else torch.randn(2, 3, 32, 32))
        floats, others = _by_hand(target, online, tau)
        fk.polyak_update(target, online, tau)
        assert all(torch.equal(a, b) for a, b in zip(_floats(target), floats, strict=True)), step
        ints = [t for t in target.buffers() if not t.is_floating_point()]
        assert all(torch.equal(a, b) for a, b in zip(ints, others, strict=True)), step  # num_batches_tracked copied
        assert len(ints) == (15 if not isinstance(online, nn.Sequential) else 0)
    assert not any(p.requires_grad or p.grad_fn is not None for p in target.parameters())


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight


def test_polyak_update_updates_a_tied_weight_once():
    online, target = _moved_online(_Tied), fk.frozen_copy(_Tied())
    for _ in range(2):
        expected = torch.lerp(target.a.weight, online.a.weight, 0.5)  # once; twice would be 0.75 of the way
        fk.polyak_update(target, online, 0.5)
        assert target.b.weight is target.a.weight
        assert torch.equal(target.a.weight, expected)


def test_polyak_update_follows_tensors_and_modules_replaced_after_the_first_call():
    online, target = _moved_online(online_net), fk.frozen_copy(online_net())
    fk.polyak_update(target, online, 0.1)

    old = target[3].weight
    before = old.clone()
    target[3].weight = nn.Parameter(torch.randn(2, 8), requires_grad=False)
    expected = torch.lerp(target[3].weight, online[3].weight, 0.1)
    fk.polyak_update(target, online, 0.1)
    assert torch.equal(target[3].weight, expected) and torch.equal(old, before)  # the new tensor, not the old

    online[3].weight = nn.Parameter(torch.randn(2, 8))  # the source's, likewise
    expected = torch.lerp(target[3].weight, online[3].weight, 0.1)
    fk.polyak_update(target, online, 0.1)
    assert torch.equal(target[3].weight, expected)

    target[0] = nn.Linear(4, 8).requires_grad_(False)  # a whole module swapped
    expected = torch.lerp(target[0].bias, online[0].bias, 0.1)
    fk.polyak_update(target, online, 0.1)
    assert torch.equal(target[0].bias, expected)

    target[0].double()  # converted in place, through .data (no buffer replaced with it): the source follows
    expected = torch.lerp(target[0].weight, online[0].weight.double(), 0.1)
    fk.polyak_update(target, online, 0.1)
    assert target[0].weight.dtype == torch.float64 and torch.equal(target[0].weight, expected)

    target[3].weight = nn.Parameter(torch.randn(2, 9))  # and a mismatch made since is refused as ever
    with pytest.raises(fk.ModuleMismatchError, match=r"parameter '3\.weight': shape \(2, 9\) in target, \(2, 8\)"):
        fk.polyak_update(target, online, 0.1)
    assert torch.is_grad_enabled()


def test_hard_update_copies_everything():
    online, target = online_net(), fk.frozen_copy(online_net())
    with torch.no_grad():
        online[0].weight.mul_(3)
    fk.hard_update(target, online)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), online.state_dict().values()))
    fk.hard_update(target, nn.DataParallel(online))  # wrappers are seen through


def test_mismatched_networks_are_refused():
    with pytest.raises(fk.ModuleMismatchError, match=r"parameter '0\.weight': shape \(8, 4\) in target, \(8, 5\)"):
        fk.hard_update(online_net(), nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(), nn.Linear(8, 2)))
    with pytest.raises(fk.ModuleMismatchError, match=r"'3\.weight' is in target but not in source"):
        fk.polyak_update(online_net(), nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), tau=0.5)
    with pytest.raises(ValueError, match=r"tau: expected a number in \[0, 1\], got 2"):
        fk.polyak_update(online_net(), online_net(), tau=2)
    with pytest.raises(TypeError, match=r"frozen_copy\(\): module: expected a torch\.nn\.Module"):
        fk.frozen_copy("net")
