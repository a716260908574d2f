"""fk.grads against torch.autograd.grad written by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import tv_resnet

import freezekit as fk


def test_grads_equal_autograd_and_leave_dot_grad_alone():
    model = tv_resnet("resnet18")
    fk.Policy(fk.freeze("layer1")).apply(model)
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
    got = fk.grads(loss, model, select="layer4.1.*", retain_graph=True)
    chosen = [(n, p) for n, p in model.named_parameters() if n.startswith("layer4.1.")]
    by_hand = torch.autograd.grad(loss, [p for _, p in chosen])
    assert list(got) == [n for n, _ in chosen]
    assert all(torch.equal(got[n], g) for (n, _), g in zip(chosen, by_hand))
    assert all(p.grad is None for p in model.parameters())


def test_grads_skip_frozen_and_fill_unused_with_zeros():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), torch.nn.Linear(1, 1))
    model[0].requires_grad_(False)
    out = model[1](model[0](torch.ones(1, 2))).sum()
    got = fk.grads(out, model)
    assert list(got) == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert torch.equal(got["2.weight"], torch.zeros(1, 1))
    with pytest.raises(ValueError, match="picks no trainable parameter"):
        fk.grads(model[1](torch.ones(1, 2)).sum(), model, select="0.*")
    with pytest.raises(TypeError, match="loss: expected a one-element tensor"):
        fk.grads(torch.ones(2), model)
