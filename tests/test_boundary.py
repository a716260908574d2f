"""Gradient boundaries, checked against the same detach written by hand."""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tv_resnet

import freezekit as fk


def resnet_by_hand(model: nn.Module, x: torch.Tensor, cut: str, no_grad: bool = True) -> torch.Tensor:
    """torchvision's ResNet.forward, with the output of ``cut`` detached by hand."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, name)
        if name == cut:
            with torch.set_grad_enabled(not no_grad and torch.is_grad_enabled()):
                x = layer(x)
            x = x.detach()
        else:
            x = layer(x)
    return model.fc(torch.flatten(model.avgpool(x), 1))


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("no_grad", [True, False])
def test_output_boundary_equals_detach_by_hand(no_grad):
    ours, hand = tv_resnet("resnet18"), tv_resnet("resnet18")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    ours.eval(), hand.eval()
    fk.Policy(fk.detach("layer3", no_grad=no_grad)).apply(ours)
    out = ours(x)
    ref = resnet_by_hand(hand, x, "layer3", no_grad)
    assert torch.equal(out, ref)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(ref, y).backward()
    mine, theirs = grads_of(ours), grads_of(hand)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert (mine[name] is None) == (theirs[name] is None), name
        if mine[name] is not None:
            assert torch.equal(mine[name], theirs[name]), name
    assert mine["layer4.0.conv1.weight"] is not None and mine["layer2.0.conv1.weight"] is None


def test_eval_outputs_unchanged_and_undo_restores_training():
    model, fresh = tv_resnet("resnet18").eval(), tv_resnet("resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    applied = fk.Policy(fk.detach("layer2"), fk.detach("fc", at="input")).apply(model)
    assert torch.equal(model(x), ref)
    applied.undo()
    assert all("forward" not in m.__dict__ for m in model.modules())
    model(x).sum().backward()
    fresh(x).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(grads_of(model).values(), grads_of(fresh).values()))


def test_no_grad_boundary_stores_no_activations():
    def saved(model, x):
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return count[0]

    x = torch.randn(2, 3, 32, 32)
    plain, kept, dropped = tv_resnet("resnet18"), tv_resnet("resnet18"), tv_resnet("resnet18")
    fk.Policy(fk.detach("layer1", "layer2", "layer3", no_grad=False)).apply(kept)
    fk.Policy(fk.detach("layer1", "layer2", "layer3")).apply(dropped)
    assert saved(dropped, x) < saved(kept, x) == saved(plain, x)


Pair = namedtuple("Pair", "a b")


@dataclass
class Out:
    value: torch.Tensor
    extra: dict


class Emitter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale=None):
        y = self.lin(x) * (1 if scale is None else scale)
        return {"t": (y, [y]), "nt": Pair(y, 3), "dc": Out(y, {"k": y}), "od": OrderedDict(q=y), "s": "text"}


class Consumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emit = Emitter()
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        o = self.emit(x, scale=x.mean())
        return self.head(o["t"][0] + o["t"][1][0] + o["nt"].a + o["dc"].value + o["dc"].extra["k"] + o["od"]["q"])


def test_output_boundary_detaches_every_structure():
    model = Consumer()
    fk.Policy(fk.detach("emit")).apply(model)
    out = model.emit(torch.randn(2, 4))
    tensors = [out["t"][0], out["t"][1][0], out["nt"].a, out["dc"].value, out["dc"].extra["k"], out["od"]["q"]]
    assert all(not t.requires_grad for t in tensors)
    assert isinstance(out["nt"], Pair) and isinstance(out["dc"], Out) and isinstance(out["od"], OrderedDict)
    assert out["s"] == "text" and out["nt"].b == 3


def test_input_boundary_cuts_positional_and_keyword_inputs():
    model = Consumer()
    fk.Policy(fk.detach("emit", at="input")).apply(model)
    x = torch.randn(2, 4, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is None  # nothing flowed back out through the emitter's inputs...
    assert model.emit.lin.weight.grad is not None  # ...while the emitter itself trained


@pytest.mark.parametrize("at", ["output", "input"])
def test_compiled_boundary_adds_no_graph_break(at):
    import torch._dynamo as dynamo

    x = torch.randn(2, 4)
    plain = dynamo.explain(Consumer())(x)
    model = Consumer()
    fk.Policy(fk.detach("emit", at=at)).apply(model)
    dynamo.reset()
    ours = dynamo.explain(model)(x)
    assert (ours.graph_count, ours.graph_break_count) == (plain.graph_count, plain.graph_break_count) == (1, 0)


def test_compiled_boundary_trains_like_eager():
    eager, compiled = Consumer(), Consumer()
    compiled.load_state_dict(eager.state_dict())
    for m in (eager, compiled):
        fk.Policy(fk.detach("emit")).apply(m)
    x = torch.randn(3, 4)
    eager(x).sum().backward()
    torch.compile(compiled, backend="aot_eager")(x).sum().backward()
    assert compiled.emit.lin.weight.grad is None and eager.emit.lin.weight.grad is None
    assert torch.allclose(compiled.head.weight.grad, eager.head.weight.grad)


def test_boundary_survives_deepcopy_and_pickle():
    model = Consumer()
    fk.Policy(fk.detach("emit")).apply(model)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        other(torch.randn(2, 4)).sum().backward()
        assert other.emit.lin.weight.grad is None and other.head.weight.grad is not None
        assert fk.state(other).boundaries == fk.state(model).boundaries


def test_detached_parameters_count_as_detached():
    model = Consumer()
    plan = fk.Policy(fk.detach("emit")).plan(model)
    assert plan.parameters["emit.lin.weight"].status == "detached"
    fk.Policy(fk.detach("emit")).apply(model)
    assert fk.state(model).parameters == {"emit.lin.weight": "detached", "emit.lin.bias": "detached",
                                          "head.weight": "trainable", "head.bias": "trainable"}


def test_stacked_boundaries_undo_in_order():
    model = Consumer()
    a = fk.Policy(fk.detach("emit", at="input")).apply(model)
    b = fk.Policy(fk.detach("emit")).apply(model)
    assert [x.at for x in fk.boundary.boundaries(model.emit)] == ["output", "input"]
    b.undo()
    assert [x.at for x in fk.boundary.boundaries(model.emit)] == ["input"]
    a.undo()
    assert "forward" not in model.emit.__dict__


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp_steps(model: nn.Module, steps: int = 3) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        ddp(torch.randn(4, 4)).sum().backward()
        optimizer.step()


def test_model_wrapped_in_ddp_after_a_boundary_trains(process_group):
    model = Consumer()
    fk.Policy(fk.detach("emit")).apply(model)  # emit's parameters still require grad, yet get none
    before = model.emit.lin.weight.clone()
    ddp_steps(model)
    assert torch.equal(model.emit.lin.weight, before)

    by_hand = Consumer()  # the same cut written by hand: DDP waits for gradients that never come
    by_hand.forward = lambda x: by_hand.head(by_hand.emit(x)["t"][0].detach())
    with pytest.raises(RuntimeError, match="finished reduction"):
        ddp_steps(by_hand)
