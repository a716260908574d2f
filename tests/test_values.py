"""Value helpers: detached copies, no shared storage, no graphs, any nesting."""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict, defaultdict, namedtuple
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import freezekit as fk

Pair = namedtuple("Pair", "a b")


@dataclass
class Out:
    loss: torch.Tensor
    extra: dict
    note: str = field(default="n", init=False)


def nested(t: torch.Tensor):
    return {"t": t, "pair": Pair(t, 3), "list": [t, "text", None], "out": Out(t.sum(), {"k": (t,)}),
            "od": OrderedDict(a=t), "dd": defaultdict(list, b=[t])}


def tensors_of(tree):
    return [tree["t"], tree["pair"].a, tree["list"][0], tree["out"].loss, tree["out"].extra["k"][0], tree["od"]["a"],
            tree["dd"]["b"][0]]


def test_detached_copies_every_tensor_and_keeps_structure():
    w = torch.randn(3, requires_grad=True)
    y = w * 2
    tree = fk.detached(nested(y))
    assert isinstance(tree["pair"], Pair) and isinstance(tree["out"], Out) and isinstance(tree["od"], OrderedDict)
    assert isinstance(tree["dd"], defaultdict) and tree["dd"].default_factory is list
    assert tree["list"][1:] == ["text", None] and tree["pair"].b == 3 and tree["out"].note == "n"
    for t in tensors_of(tree):
        assert not t.requires_grad and t.grad_fn is None
        assert t.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
    base = torch.zeros(3)
    snap = fk.detached(base)
    base.add_(1)
    assert torch.equal(snap, torch.zeros(3))


def test_detached_holds_no_graph_alive():
    w = torch.randn(1000, requires_grad=True)
    y = (w * 3).exp()  # the graph saves y itself
    ref = weakref.ref(y)
    kept = fk.detached({"y": y})
    del y
    gc.collect()
    assert ref() is None and kept["y"].shape == (1000,)  # nothing kept the graph, or y, alive


def test_stop_gradient_shares_storage():
    w = torch.randn(3, requires_grad=True)
    y = w * 2
    sg = fk.stop_gradient({"y": y})["y"]
    assert sg.data_ptr() == y.data_ptr() and not sg.requires_grad
    assert fk.detached(y, clone=False).data_ptr() == y.data_ptr()
    with pytest.raises(TypeError, match="clone: expected True or False"):
        fk.detached(y, clone="yes")


def test_logging_helpers():
    w = torch.tensor([1.5, 2.5], requires_grad=True)
    logged = fk.to_python({"loss": (w * 2).sum(), "vec": w * 2, "step": 7, "name": "x"})
    assert logged == {"loss": 8.0, "vec": [3.0, 5.0], "step": 7, "name": "x"} and isinstance(logged["loss"], float)
    arrays = fk.to_numpy([w, w.to(torch.bfloat16)])
    assert isinstance(arrays[0], np.ndarray) and arrays[1].dtype == np.float32 and arrays[0].tolist() == [1.5, 2.5]
    arrays[0][0] = 99.0
    assert w[0].item() == 1.5  # a copy, not a view
    cpu = fk.to_cpu(w)
    assert cpu.device.type == "cpu" and not cpu.requires_grad and cpu.data_ptr() != w.data_ptr()
    assert fk.to_python(torch.tensor(3)) == 3 and fk.to_python(Pair(torch.tensor(1.0), "b")) == Pair(1.0, "b")


def test_non_tensors_pass_through_untouched():
    marker = object()
    assert fk.detached(marker) is marker
    assert fk.detached([1, "a", marker])[2] is marker
