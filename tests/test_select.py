"""Selectors: what each picks, their algebra, names through wrappers, and the matching engine."""

from __future__ import annotations

import fnmatch
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import Shared, Tied, meta_model, timm_model, tv_resnet
from hypothesis import given, settings
from hypothesis import strategies as st

import freezekit as fk
from freezekit.index import ModelIndex
from freezekit.matching import NameList, regex_spans_subtrees


def by_hand(model: nn.Module, predicate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a selector should pick, computed the slow obvious way from named_modules()."""
    picked = [n for n, _ in model.named_modules() if predicate(n)]
    modules = [n for n, _ in model.named_modules() if any(n == p or n.startswith(p + ".") or p == "" for p in picked)]
    params = [n for n, _ in model.named_parameters()
              if predicate(n) or any(n.startswith(p + ".") or p == "" for p in picked)]
    return tuple(modules), tuple(params)


@pytest.mark.parametrize("pattern", ["layer4*", "*.bias", "layer[12].0.*", "fc", "*bn?", "layer3.1", "*"])
def test_glob_matches_fnmatch_on_every_name(resnet18, pattern):
    sel = fk.glob(pattern).select(resnet18, strict=False)
    want = by_hand(resnet18, lambda n: fnmatch.fnmatchcase(n, pattern))
    assert (sel.modules, sel.parameters) == want


@pytest.mark.parametrize("pattern", [r"layer[12]\.0\..*", r"layer1\.*", r"layer1\\.*", r"fc|layer4.*", r"layer\d.*$",
                                     r".*bn\d", r"(?!layer).*", r".*"])
def test_regex_matches_fullmatch_on_every_name(resnet18, pattern):
    # regexes ending in an unescaped .* (with nothing that sees past a match) skip subtree expansion
    sel = fk.regex(pattern).select(resnet18, strict=False)
    want = by_hand(resnet18, lambda n: re.fullmatch(pattern, n) is not None)
    assert (sel.modules, sel.parameters) == want


@pytest.mark.parametrize(("pattern", "spans"), [
    (r"a.*", True), (r"a\.*", False), (r"a\\.*", True), (r"a\\\.*", False), (r"a|b.*", False),
    (r"a\b.*", False), (r"a$.*", False), (r"(?!x).*", False), (r"a.*?", False), (r"(a.*)", False)])
def test_regex_spans_subtrees_only_where_an_extension_still_matches(pattern, spans):
    assert regex_spans_subtrees(pattern) is spans
    if spans:  # then every name that extends a match by ".child" matches too
        match = pattern.replace("\\\\", "\\")[:-2]  # the literal before .*
        assert re.fullmatch(pattern, match) and re.fullmatch(pattern, match + ".b.c")


def test_plain_strings_are_globs_and_re_prefix_is_regex(resnet18):
    frozen = fk.Policy(fk.freeze("layer1.*")).plan(resnet18).frozen
    assert frozen == list(fk.glob("layer1.*").select(resnet18).parameters)
    sel = fk.regex(r"layer[12]\.0\.conv\d").select(resnet18)
    assert sel.modules == ("layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2")
    frozen = fk.Policy(fk.freeze(r"re:layer[12]\.0\.conv\d")).plan(resnet18).frozen
    assert frozen == ["layer1.0.conv1.weight", "layer1.0.conv2.weight",
                      "layer2.0.conv1.weight", "layer2.0.conv2.weight"]


def test_selection_is_in_model_order(resnet18):
    sel = (fk.glob("fc") | fk.glob("conv1") | fk.glob("layer2.0.bn1")).select(resnet18)
    order = [n for n, _ in resnet18.named_parameters()]
    assert list(sel.parameters) == [n for n in order if n in set(sel.parameters)]
    assert sel.modules == ("conv1", "layer2.0.bn1", "fc")


def test_names_types_norms(resnet18):
    assert fk.names("layer1.0.conv1.weight").select(resnet18).parameters == ("layer1.0.conv1.weight",)
    assert fk.names("layer1.0").select(resnet18).modules[0] == "layer1.0"
    bns = fk.types(nn.BatchNorm2d).select(resnet18).modules
    assert set(bns) == {n for n, m in resnet18.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert fk.types("BatchNorm2d").select(resnet18) == fk.types(nn.BatchNorm2d).select(resnet18)
    assert fk.types("torch.nn.BatchNorm2d").select(resnet18) == fk.types(nn.BatchNorm2d).select(resnet18)
    assert fk.norms().select(resnet18).modules == bns


def test_types_by_string_matches_subclasses_and_foreign_classes_without_import():
    m = timm_model("test_efficientnet")
    act_bns = {n for n, mod in m.named_modules() if type(mod).__name__ == "BatchNormAct2d"}
    assert act_bns
    selected = set(fk.types("timm.layers.BatchNormAct2d").select(m).modules)
    assert selected == act_bns | {f"{n}.{c}" for n in act_bns for c in ("drop", "act")}  # with their children
    assert act_bns <= set(fk.types("BatchNorm2d").select(m).modules)  # a subclass is an instance
    cls = type(m)
    full = f"{cls.__module__}.{cls.__qualname__}"
    assert fk.types(full).select(m).modules[0] == ""


def test_types_rejects_what_is_not_a_module_class():
    with pytest.raises(TypeError, match=r"not a torch\.nn\.Module class"):
        fk.types(int)
    with pytest.raises(fk.PatternError, match=r"torch\.nn\.NoSuchNorm"):
        fk.types("torch.nn.NoSuchNorm")
    with pytest.raises(TypeError, match="module classes or class names"):
        fk.types(3)


def test_first_last_on_containers_and_numbered_families(vit, resnet18):
    n = len(vit.blocks)
    assert fk.first("blocks", 1).select(vit).modules[0] == "blocks.0"
    assert fk.last("blocks", 1).select(vit).modules[0] == f"blocks.{n - 1}"
    assert {m.split(".")[0] for m in fk.first("layer", 2).select(resnet18).modules} == {"layer1", "layer2"}
    assert {m.split(".")[0] for m in fk.last("layer", 1).select(resnet18).modules} == {"layer4"}
    assert fk.first("layer4", 1).select(resnet18).modules[0] == "layer4.0"
    assert fk.first("blocks", 100).select(vit).parameters == fk.glob("blocks.*").select(vit).parameters
    assert not fk.first("blocks", 0).select(vit)
    with pytest.raises(ValueError, match="n >= 0"):
        fk.first("blocks", -1)
    with pytest.raises(TypeError, match="expected an int"):
        fk.last("blocks", 1.5)


def test_first_numbered_family_sorts_numerically():
    m = nn.Module()
    for i in (1, 2, 10, 3):
        m.add_module(f"stage{i}", nn.Linear(2, 2))
    assert [s.split(".")[0] for s in fk.first("stage", 3).select(m).modules] == ["stage1", "stage2", "stage3"]
    assert fk.last("stage", 1).select(m).modules == ("stage10",)


def test_where_sees_modules_and_parameters(resnet18):
    sel = fk.where(lambda name, obj: isinstance(obj, nn.Parameter) and obj.ndim == 1 and name.startswith("fc"))
    assert sel.select(resnet18).parameters == ("fc.bias",)
    with pytest.raises(TypeError, match="callable"):
        fk.where("fc")


def test_combinators_work_on_resolved_sets(resnet18):
    everything_but_norms = (fk.glob("*") - fk.norms()).select(resnet18)
    assert not any("bn" in n or n.endswith("downsample.1") for n in everything_but_norms.modules)
    assert "" in everything_but_norms.modules  # the root is still selected...
    assert not any("bn" in n for n in everything_but_norms.parameters)  # ...but not re-expanded
    outside_fc = (~fk.glob("fc*")).select(resnet18)
    assert "" in outside_fc.modules and "fc" not in outside_fc.modules
    assert {n for n, _ in resnet18.named_parameters()} - set(outside_fc.parameters) == {"fc.weight", "fc.bias"}
    both = (fk.types(nn.Conv2d) & "layer4*").select(resnet18)
    assert both.modules and all((m.startswith("layer4") and "conv" in m) or "downsample.0" in m for m in both.modules)
    left = ("fc" | fk.names("conv1")).select(resnet18)
    assert left.modules == ("conv1", "fc")
    explicit = (fk.glob("layer1") - fk.norms() | fk.glob("fc")).select(resnet18)
    assert (("layer1" - fk.norms()) | "fc").select(resnet18) == explicit


def test_tied_parameters_are_one_parameter():
    m = Tied()
    sel = fk.glob("out").select(m)
    assert sel.parameters == ("emb.weight",)  # the tensor's first name, once
    assert fk.names("out.weight").select(m).parameters == ("emb.weight",)


def test_shared_module_is_matched_by_either_name():
    m = Shared()
    assert fk.glob("again.0").select(m).modules == ("first.0",)
    assert fk.glob("again.1.weight").select(m).parameters == ("first.1.weight",)


def test_bad_regex_is_a_clear_error():
    with pytest.raises(fk.PatternError, match=r"bad regular expression 'layer\[': "):
        fk.regex("layer[")
    with pytest.raises(fk.PatternError, match="bad regular expression"):
        fk.freeze("re:(unclosed")
    assert issubclass(fk.PatternError, ValueError)


def test_selector_arguments_are_type_checked():
    with pytest.raises(TypeError, match="glob\\(\\): expected pattern strings, got int 3"):
        fk.glob(3)
    with pytest.raises(TypeError, match="right operand of \\|"):
        fk.glob("a") | 3
    with pytest.raises(TypeError, match="at least one pattern"):
        fk.glob()


# ----------------------------------------------------------------------------------- wrappers


def test_names_through_data_parallel_and_compile(resnet18):
    want = fk.glob("layer4.*").select(resnet18)
    assert fk.glob("layer4.*").select(nn.DataParallel(resnet18)) == want
    assert fk.glob("layer4.*").select(torch.compile(resnet18)) == want
    assert fk.unwrap(torch.compile(nn.DataParallel(resnet18))) is resnet18


def test_names_through_compiled_and_checkpointed_submodules(resnet18):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    want = fk.glob("layer4.*").select(resnet18)
    resnet18.layer4[0] = torch.compile(resnet18.layer4[0])
    resnet18.layer4[1] = checkpoint_wrapper(resnet18.layer4[1])
    assert fk.glob("layer4.*").select(resnet18) == want
    applied = fk.Policy(fk.freeze("layer4.1.bn1", norm="frozen_bn")).apply(resnet18)
    assert isinstance(resnet18.layer4[1]._checkpoint_wrapped_module.bn1, fk.FrozenBatchNorm)
    applied.undo()
    assert isinstance(resnet18.layer4[1]._checkpoint_wrapped_module.bn1, nn.BatchNorm2d)


def test_names_through_ddp_and_fsdp2(process_group):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tv_resnet("resnet18")
    want = fk.Policy(fk.freeze("*"), fk.unfreeze("layer4.1*", "fc")).plan(model).trainable
    ddp = DDP(model)
    fk.Policy(fk.freeze("*"), fk.unfreeze("layer4.1*", "fc")).apply(ddp)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == want

    sharded = tv_resnet("resnet18")
    for block in (*sharded.layer3, *sharded.layer4):
        fully_shard(block)
    fully_shard(sharded)
    fk.Policy(fk.freeze("*"), fk.unfreeze("layer4.1*", "fc")).apply(sharded)
    assert [n for n, p in sharded.named_parameters() if p.requires_grad] == want


# ------------------------------------------------------------------------------ the matching engine


names_strategy = st.lists(st.text(alphabet="ab.-]![^\\0é_1", max_size=6), min_size=1, max_size=40, unique=True)


@settings(max_examples=300, deadline=None)
@given(names=names_strategy, pattern=st.text(alphabet="ab.-]![*?^\\0é1", max_size=7))
def test_glob_engine_equals_fnmatchcase(names, pattern):
    got = NameList(names).glob(pattern)
    assert got.tolist() == [fnmatch.fnmatchcase(n, pattern) for n in names]


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.text(alphabet="ab.1", max_size=24), min_size=1, max_size=40, unique=True),
       pattern=st.text(alphabet="ab.1*?", max_size=24))
def test_glob_engine_equals_fnmatchcase_on_long_names(names, pattern):
    # literals of 8 characters and more are compared a word at a time
    got = NameList(names).glob(pattern)
    assert got.tolist() == [fnmatch.fnmatchcase(n, pattern) for n in names]


@settings(max_examples=300, deadline=None)
@given(names=names_strategy,
       pattern=st.sampled_from([r"a.*", r"[^a]+", r"\S*b", r"(?i)A.*", r"a|b\.", r".*\b1", r"^a.*$", r"(?=a)..",
                                r"\s*a", r"[\s\S]*", r"(a)\1", r".?\.?", r"é+|1"]))
def test_regex_engine_equals_fullmatch(names, pattern):
    compiled = re.compile(pattern)
    assert NameList(names).regex(compiled).tolist() == [bool(compiled.fullmatch(n)) for n in names]


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.text(alphabet="ab._1", max_size=6), min_size=1, max_size=60, unique=True),
       pieces=st.lists(st.sampled_from(["a", "b", r"\.", ".", "1", "*", "?", "+", "*+", "?+", r"\s", r"[^x]", r"\W",
                                        r"(\s\w+)?", r"(?s:.)", r"\D", "[ab]", "(a|b)", r"\w", "_"]),
                       min_size=1, max_size=6))
def test_regex_engine_equals_fullmatch_where_the_regex_could_match_a_newline(names, pieces):
    # a regex that can match a newline must not run into the next name of the blob, nor, made
    # possessive, fail a name it matches alone
    try:
        compiled = re.compile("".join(pieces))
    except re.error:
        return
    assert NameList(names).regex(compiled).tolist() == [bool(compiled.fullmatch(n)) for n in names]


def test_a_regex_that_could_match_a_newline_matches_only_whole_names():
    names = ["xab", "cd", "_", *(f"n{i}" for i in range(30))]  # many names: the literal "xab" narrows the search
    for pattern in (r"xab\scd", r"xab(\s\w+)?", r"_\s?+", r"xab[^z]cd", r"(?s)xab.cd"):
        compiled = re.compile(pattern)
        assert NameList(names).regex(compiled).tolist() == [bool(compiled.fullmatch(n)) for n in names], pattern


def test_brackets_read_as_fnmatch_reads_them():
    # a range that runs backwards is dropped, and what is left is negated if it then starts with "!"
    names = ["1", "1!", "1]", "1.", "11", "1a", "1-", "!", "]", "a", *(f"n{i}" for i in range(30))]
    for pattern in ("1[?-1!]", "1[?-1!a]", "[!]]", "1[]-a]", "1[a-]", "*[!]a]", "1[z-a-c]", "1[\\]"):
        assert NameList(names).glob(pattern).tolist() == [fnmatch.fnmatchcase(n, pattern) for n in names], pattern


def test_names_with_newlines_fall_back_to_per_name_matching():
    m = nn.Module()
    m.add_module("odd\nname", nn.Linear(2, 2))
    m.add_module("plain", nn.Linear(2, 2))
    assert fk.glob("odd*").select(m).modules == ("odd\nname",)
    assert fk.glob("*.weight").select(m).parameters == ("odd\nname.weight", "plain.weight")


def test_index_expands_subtrees_like_named_modules():
    m = meta_model("vit_base_patch16_224", depth=3)
    index = ModelIndex(m)
    assert index.module_names == [n for n, _ in m.named_modules()]
    assert index.param_names == [n for n, _ in m.named_parameters()]
    hits = np.zeros(len(index.names.names), dtype=bool)
    hits[index.names.find("blocks.1")] = True
    _, params = index.expand(hits)
    assert [index.param_names[i] for i in params.nonzero()[0]] == \
        [n for n, _ in m.named_parameters() if n.startswith("blocks.1.")]
