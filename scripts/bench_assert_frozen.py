"""Time a resnet50 CPU training step with and without ``fk.assert_frozen`` around it.

    python scripts/bench_assert_frozen.py

The model is torchvision's resnet50 (random init), fine-tuned with its last stage and head
trainable and everything else frozen (BatchNorm statistics locked), AdamW with weight decay over
the trainable parameters. Steps alternate, with and without the check, after warm-up; the figure is
the median. Target: the check adds at most 5%.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
import typer

import freezekit as fk


def main(
    steps: int = typer.Option(10, help="Timed steps of each kind."),
    batch: int = typer.Option(8, help="Images per step."),
    size: int = typer.Option(128, help="Image side in pixels."),
) -> None:
    """Print the step time with and without assert_frozen, and the overhead."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    fk.Policy(fk.freeze("*"), fk.unfreeze("layer4", "fc")).apply(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def checked() -> None:
        with fk.assert_frozen(model):
            step()

    for fn in (step, checked, step):  # warm-up; the first check also takes the baseline checksums
        fn()
    plain, guarded = [], []
    for _ in range(steps):
        for fn, out in ((step, plain), (checked, guarded)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    p, g = statistics.median(plain), statistics.median(guarded)
    print(f"resnet50 step (batch {batch}, {size}px): {p * 1e3:.1f} ms; with assert_frozen {g * 1e3:.1f} ms; "
          f"overhead {100 * (g / p - 1):+.1f}% (target <= +5%)")


if __name__ == "__main__":
    typer.run(main)
