"""Target networks: frozen copies, Polyak and hard updates, checked against the formula by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

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
