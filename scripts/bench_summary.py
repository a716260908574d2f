"""Time ``fk.summary`` against a bare ``named_parameters()`` walk, on meta-device models of 500 to
94,000 parameter tensors.

    python scripts/bench_summary.py            # ViT-B and ResNet-50 families, five sizes each
    python scripts/bench_summary.py --quick    # the two smallest sizes

The models are the same as bench_apply.py's: timm's vit_base_patch16_224 (depth scaled) and
resnet50 (blocks scaled) on the meta device. The baseline is ``for n, p in model.named_parameters():
pass``; the summary includes picking the depth and collapsing blocks. Both run in this process,
alternating, after ``gc.collect()``; the figure is the median. Target: at most 3x at every size.
"""

from __future__ import annotations

import gc
import statistics
import time

import typer
from bench_apply import RESNET_BLOCKS, VIT_DEPTHS, build

import freezekit as fk


def main(
    quick: bool = typer.Option(False, help="Only the two smallest sizes of each family."),
    family: list[str] = typer.Option(["vit", "resnet"], help="Model families: vit, resnet."),
    repeats: int = typer.Option(0, help="Timed runs per size (0: enough for about a second of work)."),
) -> None:
    """Print summary time / bare walk time per model size (target <= 3)."""
    print(f"{'model':24s} {'tensors':>8s} {'bare walk':>10s} {'summary':>10s} {'ratio':>6s} {'rows':>5s}")
    worst = 0.0
    for fam in family:
        sizes = VIT_DEPTHS if fam == "vit" else RESNET_BLOCKS
        for size in sizes[:2] if quick else sizes:
            model = build(fam, size)
            n = sum(1 for _ in model.parameters())
            bare, ours = [], []
            for _ in range(repeats or max(5, min(41, 40_000 // n))):
                gc.collect()
                start = time.perf_counter()
                for _name, _param in model.named_parameters():
                    pass
                bare.append(time.perf_counter() - start)
                gc.collect()
                start = time.perf_counter()
                table = fk.summary(model)
                ours.append(time.perf_counter() - start)
            b, o = statistics.median(bare), statistics.median(ours)
            worst = max(worst, o / b)
            label = f"{fam} ({'depth' if fam == 'vit' else 'blocks'} {size})"
            print(f"{label:24s} {n:8d} {b * 1e3:8.2f}ms {o * 1e3:8.2f}ms {o / b:6.2f} {len(table.rows):5d}", flush=True)
    print(f"worst ratio {worst:.2f} (target <= 3)")


if __name__ == "__main__":
    typer.run(main)
