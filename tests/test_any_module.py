"""Models nobody here wrote: transformers (BERT, GPT-2, Llama, T5, ViT from tiny configs), a PEFT
LoRA model, torchvision detection and segmentation models; tied weights; names through wrappers;
suggestions that know what people mean; a selector strict like a policy."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import tv_resnet
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torchvision.ops.misc import FrozenBatchNorm2d

import freezekit as fk

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def t5():
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100)
    return transformers.T5ForConditionalGeneration(config)


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def hf_vit():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    return transformers.ViTForImageClassification(config)


def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


# ------------------------------------------------------------------------------------- norm layers


@pytest.mark.parametrize("make,norm_class,count", [(llama, "LlamaRMSNorm", 5), (t5, "T5LayerNorm", 12),
                                                   (bert, "LayerNorm", 5), (gpt2, "LayerNorm", 5)])
def test_norm_layers_of_transformers_are_norm_layers(make, norm_class, count):
    model = make()
    by_hand = sorted(n for n, m in model.named_modules() if type(m).__name__ == norm_class)
    assert len(by_hand) == count
    assert sorted(fk.norms().select(model).modules) == by_hand
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fk.TiedWeightsWarning)
        fk.Policy(fk.freeze("*", norm="trainable")).apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in by_hand for p, _ in model.get_submodule(m).named_parameters()}


# ------------------------------------------------------------------------------------- tied weights


def test_a_tied_tensor_decided_through_one_name_says_so_and_the_summary_agrees():
    model = t5()
    assert model.lm_head.weight is model.shared.weight is model.decoder.embed_tokens.weight
    policy = fk.Policy(fk.freeze("encoder"))
    with pytest.warns(fk.TiedWeightsWarning, match=r"shared\.weight is one tensor under 4 names: policy\[0\] "
                                                   r"freeze\('encoder'.*through encoder\.embed_tokens\.weight, and so "
                                                   r"also shared\.weight \(no rule\), decoder\.embed_tokens\.weight"):
        plan = policy.plan(model)
    assert "tied: shared.weight is one tensor" in str(plan)
    rows = {r.name: r for r in fk.summary(model, depth=2, policy=policy).rows}
    assert rows["decoder"].status == "partial"  # its embedding is the encoder's, frozen
    assert (rows["lm_head"].tied, rows["lm_head"].status, rows["lm_head"].parameters) == ("shared", "frozen", 3200)
    assert rows["decoder.embed_tokens"].tied == "shared"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every name decided alike: nothing to say
        fk.Policy(fk.freeze("*")).plan(model)


def test_the_last_rule_through_any_name_wins_and_the_plan_names_the_losers():
    model = gpt2()
    with pytest.warns(fk.TiedWeightsWarning, match=r"policy\[1\] unfreeze\('lm_head'\) makes it trainable through "
                                                   r"lm_head\.weight, and so also transformer\.wte\.weight "
                                                   r"\(policy\[0\] freeze\('\*'"):
        fk.Policy(fk.freeze("*"), fk.unfreeze("lm_head")).apply(model)
    assert model.transformer.wte.weight.requires_grad  # one tensor
    row = next(r for r in fk.summary(model, depth=1).rows if r.name == "lm_head")
    assert (row.tied, row.status, row.trainable) == ("transformer.wte", "trainable", 3200)
    assert "lm_head (tied to transformer.wte)" in str(fk.summary(model, depth=1))


def test_grads_key_a_tied_tensor_by_the_name_selected():
    model = gpt2()
    loss = model(torch.randint(0, 100, (1, 5)), labels=torch.randint(0, 100, (1, 5))).loss
    by_head = fk.grads(loss, model, select="lm_head", retain_graph=True)
    by_embedding = fk.grads(loss, model, select="transformer.wte")
    assert list(by_head) == ["lm_head.weight"] and list(by_embedding) == ["transformer.wte.weight"]
    assert torch.equal(by_head["lm_head.weight"], by_embedding["transformer.wte.weight"])


def test_peft_lora_counts_match_peft_and_freezekit_leaves_only_what_peft_trains():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    s = fk.summary(model)
    assert (s.totals["trainable"], s.totals["total"]) == (trainable, total)
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    with fk.Policy(fk.freeze("*"), fk.unfreeze("*lora_*")).applied(model):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == before
    fk.Policy(fk.unfreeze(fk.norms())).apply(model)  # and the Llama norms inside the PEFT wrapper are norms
    assert {n for n, p in model.named_parameters() if p.requires_grad} - before == \
        {n for n, p in model.named_parameters() if "norm" in n}


# ---------------------------------------------------------------------------- names through wrappers


@pytest.mark.parametrize("wrap,spelled", [
    (nn.DataParallel, "module.fc"),
    (torch.compile, "_orig_mod.fc"),
    (lambda m: torch.compile(nn.DataParallel(m)), "_orig_mod.module.fc"),
])
def test_names_copied_from_a_wrapper_mean_the_inner_names(wrap, spelled):
    model = tv_resnet("resnet18")
    wrapped = wrap(model)
    assert f"{spelled}.weight" in dict(wrapped.named_parameters())
    for selector in (spelled, f"{spelled}.*", f"re:{spelled.replace('.', chr(92) + '.')}\\..*",
                     fk.names(f"{spelled}.weight", f"{spelled}.bias")):
        assert fk.Policy(fk.freeze("*"), fk.unfreeze(selector)).plan(wrapped).trainable == ["fc.weight", "fc.bias"]


def test_checkpoint_wrapped_names_mean_the_inner_names():
    model = tv_resnet("resnet18")
    model.layer1[0].conv1 = checkpoint_wrapper(model.layer1[0].conv1)
    spelled = "layer1.0.conv1._checkpoint_wrapped_module.weight"
    assert spelled in dict(model.named_parameters())
    assert fk.names(spelled).select(model).parameters == ("layer1.0.conv1.weight",)
    assert fk.glob("layer1.0.conv1._checkpoint_wrapped_module.*").select(model).parameters == ("layer1.0.conv1.weight",)


# --------------------------------------------------------------------------------- suggestions


@pytest.mark.parametrize("make,word,actual", [
    (lambda: tv_resnet("resnet18"), "head", "fc"),
    (hf_vit, "head", "classifier"),
    (gpt2, "classifier", "lm_head"),
    (lambda: torchvision.models.vgg11(), "fc", "classifier.6"),  # what get_classifier() / the usual names give
])
def test_a_common_word_for_the_classifier_names_the_models_own(make, word, actual):
    model = make()
    with pytest.raises(fk.NoMatchError) as caught:
        fk.Policy(fk.unfreeze(word)).plan(model)
    if actual == "classifier.6":
        assert "its classifier is 'classifier'" in str(caught.value)
    else:
        assert f"matched nothing in {type(model).__name__}; its classifier is {actual!r}" in str(caught.value)


def test_with_nothing_close_the_top_level_parts_are_shown():
    with pytest.raises(fk.NoMatchError, match=r"'zebra' matched nothing in ResNet; its top-level parts are conv1, bn1, "
                                              r"relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc"):
        fk.Policy(fk.unfreeze("zebra")).plan(tv_resnet("resnet18"))


# ------------------------------------------------------------------------------------- consistency


def test_select_is_strict_like_a_policy_unless_asked_not_to_be():
    model = tv_resnet("resnet18")
    with pytest.raises(fk.NoMatchError, match=r"glob\('head'\): 'head' matched nothing in ResNet; its classifier is "):
        fk.glob("head").select(model)
    assert not fk.glob("head").select(model, strict=False)
    assert fk.glob("fc").select(model).modules == ("fc",)


def test_unfreezing_torchvisions_frozen_batchnorms_says_they_stay_fixed():
    model = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    with pytest.warns(fk.FreezekitWarning, match=r"unfreeze\('layer4'\) covers 10 FrozenBatchNorm2d whose weight and "
                                                 r"bias are buffers, not parameters: they stay fixed"):
        plan = fk.Policy(fk.freeze("*"), fk.unfreeze("layer4")).plan(model)
    assert "note: policy[1] unfreeze('layer4') covers 10 FrozenBatchNorm2d" in str(plan)
