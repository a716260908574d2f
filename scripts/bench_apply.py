"""Time ``policy.apply`` against a bare ``requires_grad_`` loop, on meta-device models of 500 to
94,000 parameter tensors.

    python scripts/bench_apply.py                 # ViT-B and ResNet-50 families, five sizes each
    python scripts/bench_apply.py --quick         # the two smallest sizes

The models are timm's own ``vit_base_patch16_224`` (``depth`` scaled) and ``resnet50`` (``layers``
scaled), built on the meta device: real module structure, no memory. The baseline is what people
write by hand, ``for p in model.parameters(): p.requires_grad_(False)``. Both run in this process,
alternating, each from the same starting state (everything trainable, nothing locked), after a
``gc.collect()``; the figure is the median. The policy has ten rules of every kind a real policy
uses: the catch-all, prefix and suffix globs, a regex, a type family, a position, a combination,
an eval lock and a literal name.
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings

import timm
import torch
import torch.nn as nn
import typer

import freezekit as fk

VIT_DEPTHS = [40, 165, 830, 3330, 7830]  # 488 ... 93,968 parameter tensors
RESNET_BLOCKS = [50, 220, 1105, 4440, 10440]  # 500 ... 94,000


def vit_policy() -> fk.Policy:
    return fk.Policy(
        fk.freeze("*"),
        fk.unfreeze("blocks.1*"),
        fk.freeze(fk.norms()),
        fk.unfreeze("*.bias"),
        fk.eval_mode("blocks.2*"),
        fk.freeze(r"re:blocks\.3\d*\.mlp\..*"),
        fk.unfreeze(fk.last("blocks", 4)),
        fk.freeze(fk.types(nn.LayerNorm) & fk.glob("blocks.4*")),
        fk.unfreeze("head"),
        fk.freeze("*.attn.qkv.weight"),
    )


def resnet_policy() -> fk.Policy:
    return fk.Policy(
        fk.freeze("*"),
        fk.unfreeze("layer4*"),
        fk.freeze(fk.norms()),
        fk.unfreeze("*.bn3.*"),
        fk.eval_mode("layer3.1*"),
        fk.freeze(r"re:layer2\.\d*7\.conv\d\..*"),
        fk.unfreeze(fk.last("layer3", 2)),
        fk.freeze(fk.types(nn.Conv2d) & fk.glob("layer1*")),
        fk.unfreeze("fc"),
        fk.freeze("*.downsample.*"),
    )


def build(family: str, size: int) -> nn.Module:
    with torch.device("meta"):
        if family == "vit":
            return timm.create_model("vit_base_patch16_224", depth=size, pretrained=False)
        return timm.create_model("resnet50", layers=[size // 4, size // 4, size // 4, size - 3 * (size // 4)],
                                 pretrained=False)


def measure(model: nn.Module, policy: fk.Policy, repeats: int) -> tuple[float, float]:
    params = list(model.parameters())

    def reset() -> None:
        for p in params:
            p.requires_grad_(True)
        gc.collect()

    def baseline() -> None:
        for p in model.parameters():
            p.requires_grad_(False)

    bare, ours = [], []
    for _ in range(repeats):
        reset()
        start = time.perf_counter()
        baseline()
        bare.append(time.perf_counter() - start)
        reset()
        start = time.perf_counter()
        applied = policy.apply(model)
        ours.append(time.perf_counter() - start)
        applied.undo()
    return statistics.median(bare), statistics.median(ours)


def main(
    quick: bool = typer.Option(False, help="Only the two smallest sizes of each family."),
    family: list[str] = typer.Option(["vit", "resnet"], help="Model families: vit, resnet."),
    repeats: int = typer.Option(0, help="Timed runs per size (0: enough for about a second of work)."),
) -> None:
    """Print apply time / bare-loop time per model size; the target is at most 1.5x at every size."""
    warnings.simplefilter("ignore", fk.DeadRuleWarning)
    print(f"{'model':24s} {'tensors':>8s} {'modules':>8s} {'bare loop':>10s} {'apply':>10s} {'ratio':>6s} "
          f"{'us/tensor':>9s}")
    worst = 0.0
    for fam in family:
        sizes = VIT_DEPTHS if fam == "vit" else RESNET_BLOCKS
        policy = vit_policy() if fam == "vit" else resnet_policy()
        for size in sizes[:2] if quick else sizes:
            model = build(fam, size)
            n = sum(1 for _ in model.parameters())
            bare, ours = measure(model, policy, repeats or max(5, min(41, 40_000 // n)))
            worst = max(worst, ours / bare)
            label = f"{fam} ({'depth' if fam == 'vit' else 'blocks'} {size})"
            print(f"{label:24s} {n:8d} {sum(1 for _ in model.modules()):8d} {bare * 1e3:8.2f}ms {ours * 1e3:8.2f}ms "
                  f"{ours / bare:6.2f} {ours / n * 1e6:9.2f}", flush=True)
    print(f"worst ratio {worst:.2f} (target <= 1.5)")


if __name__ == "__main__":
    typer.run(main)
