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


def test_plain_objects_without_tensors_pass_through_by_reference():
    class Config:
        def __init__(self):
            self.name, self.sizes = "tiny", [1, 2]

    config, linear = Config(), torch.nn.ReLU()
    out = fk.detached({"config": config, "act": linear, "fn": len, "types": torch, "array": np.zeros(2)})
    assert out["config"] is config and out["act"] is linear and out["fn"] is len and out["types"] is torch


class Layer:
    """A cache layer of a library freezekit does not know: tensors in attributes, a link back up."""

    def __init__(self, cache, keys):
        self.cache, self.keys, self.seen = cache, keys, 3


class Cache:
    def __init__(self, keys):
        self.layers, self.note = [Layer(self, k) for k in keys], {"kind": "mine"}


def test_objects_holding_tensors_are_copied_with_their_tensors_mapped():
    w = torch.randn(3, requires_grad=True)
    cache = Cache([w * 2, w * 3])
    for helper in (fk.detached, fk.stop_gradient, fk.to_cpu):
        copy = helper({"cache": cache})["cache"]
        assert type(copy) is Cache and copy is not cache and copy.note is cache.note  # what holds no tensor is shared
        for new, old in zip(copy.layers, cache.layers, strict=True):
            assert type(new) is Layer and new is not old and new.cache is copy and new.seen == 3  # the cycle kept
            assert new.keys.grad_fn is None and not new.keys.requires_grad and torch.equal(new.keys, old.keys)
            assert old.keys.grad_fn is not None and old.cache is cache  # the original untouched
            shared = new.keys.untyped_storage().data_ptr() == old.keys.untyped_storage().data_ptr()
            assert shared == (helper is fk.stop_gradient)
    assert fk.to_python(cache).layers[0].keys == (w * 2).tolist()


class Slotted:  # keeps its tensor in a slot, outside any __dict__
    __slots__ = ("keys",)

    def __init__(self, keys):
        self.keys = keys


class Handle:  # a resource that refuses to be copied
    def __init__(self, keys):
        self.keys = keys

    def __copy__(self):
        raise TypeError("Handle objects cannot be copied")


def test_what_cannot_be_walked_raises_instead_of_staying_attached():
    import functools
    from collections import deque

    y = torch.randn(3, requires_grad=True) * 2
    cases = [(Slotted(y), "test_values.Slotted: it holds tensors outside its __dict__"),
             (Handle(y), r"test_values.Handle: copy.copy\(\) failed \(Handle objects cannot be copied\)"),
             ({y}, "builtins.set: it holds tensors outside"), (deque([y]), "collections.deque: it holds tensors"),
             (functools.partial(torch.add, y), "functools.partial: it holds tensors outside"),
             ({y: "a"}, "builtins.dict: it has tensors as keys"),
             (torch.nn.Linear(2, 2), r"torch.nn.modules.linear.Linear: it is not a value; pass its state_dict\(\)"),
             (torch.optim.SGD([torch.zeros(1, requires_grad=True)]), "torch.optim.sgd.SGD: it is not a value")]
    for value, message in cases:
        for helper in (fk.detached, fk.stop_gradient, fk.to_cpu, fk.to_numpy, fk.to_python):
            with pytest.raises(TypeError, match=f"fk.{helper.__name__}\\(\\): cannot walk a .*{message}"):
                helper({"deep": [Pair(value, 1)]})


# Hugging Face causal LMs: their outputs are ModelOutputs (OrderedDicts and dataclasses) holding a cache object.

def gpt2():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                                                                n_positions=32))


def llama():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, max_position_embeddings=64))


def cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5


def cache_tensors(cache):
    tensors = [v for layer in cache.layers for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 2 * len(cache.layers) == 4  # keys and values of both layers
    return tensors


@pytest.mark.parametrize("build", [gpt2, llama])
def test_hf_model_outputs_and_caches_come_back_detached(build):
    torch.manual_seed(0)
    model = build().eval()  # eval: no dropout, so that the caches can be compared; the parameters require grad
    out = model(torch.tensor([[1, 2, 3, 4]]), use_cache=True)
    cache = cache_of(out)
    originals = [out.logits, *cache_tensors(cache)]
    pointers = [t.untyped_storage().data_ptr() for t in originals]
    assert all(t.grad_fn is not None for t in originals)

    copy = fk.detached(out)
    assert type(copy) is type(out) and list(copy.keys()) == list(out.keys())
    assert type(cache_of(copy)) is type(cache) and cache_of(copy) is not cache
    copies = [copy.logits, *cache_tensors(cache_of(copy))]
    for new, old, pointer in zip(copies, originals, pointers, strict=True):
        assert new.grad_fn is None and not new.requires_grad and torch.equal(new, old)
        assert new.untyped_storage().data_ptr() != pointer
    assert [t.untyped_storage().data_ptr() for t in [out.logits, *cache_tensors(cache)]] == pointers
    assert all(t.grad_fn is not None for t in [out.logits, *cache_tensors(cache)])  # the original untouched

    for helper in (fk.stop_gradient, fk.to_cpu):
        other = helper(out)
        assert type(other) is type(out) and type(cache_of(other)) is type(cache)
        for new, old in zip([other.logits, *cache_tensors(cache_of(other))], originals, strict=True):
            assert new.grad_fn is None and not new.requires_grad and torch.equal(new, old)
            shared = new.untyped_storage().data_ptr() == old.untyped_storage().data_ptr()
            assert shared == (helper is fk.stop_gradient)

    with torch.no_grad():  # the copy still works as a cache, one more step: the same logits as the original's
        step = torch.tensor([[5]])
        from_copy = model(step, past_key_values=cache_of(copy), use_cache=True).logits
        from_original = model(step, past_key_values=cache, use_cache=True).logits
    assert torch.equal(from_copy, from_original) and cache_of(copy).get_seq_length() == 5
