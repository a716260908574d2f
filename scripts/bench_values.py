"""Time ``fk.detached`` on a nested structure of 1,000 tensors against a bare detach-clone loop.

    python scripts/bench_values.py

The structure is what a training loop logs: a dict of lists of small tensors, some namedtuples and
dataclasses, a few non-tensors. The baseline is the loop people write over the same tensors,
``[t.detach().clone() for t in tensors]`` (it does not even rebuild the structure). Both run in
this process, alternating, after ``gc.collect()``; the figure is the median. Target: <= 1.2x.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections import namedtuple
from dataclasses import dataclass

import torch
import typer

import freezekit as fk

Pair = namedtuple("Pair", "logits target")


@dataclass
class Step:
    loss: torch.Tensor
    extras: dict


def structure(n: int, size: int) -> tuple[dict, list[torch.Tensor]]:
    w = torch.randn(size, requires_grad=True)
    made = [w * i for i in range(n)]  # tensors with a graph, like real activations
    tree = {
        "layers": [made[i] for i in range(0, n // 2)],
        "pairs": [Pair(made[i], made[i + 1]) for i in range(n // 2, 3 * n // 4, 2)],
        "steps": [Step(made[i], {"grad_norm": made[i + 1], "name": f"s{i}"}) for i in range(3 * n // 4, n - 1, 2)],
        "epoch": 3,
    }
    if n % 2:
        tree["last"] = made[-1]
    return tree, made


def main(
    tensors: int = typer.Option(1000, help="Tensors in the structure."),
    size: int = typer.Option(64, help="Elements per tensor."),
    repeats: int = typer.Option(200, help="Timed runs of each."),
) -> None:
    """Print fk.detached time / bare loop time (target <= 1.2)."""
    tree, flat = structure(tensors, size)
    bare, ours = [], []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        [t.detach().clone() for t in flat]
        bare.append(time.perf_counter() - start)
        gc.collect()
        start = time.perf_counter()
        fk.detached(tree)
        ours.append(time.perf_counter() - start)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{tensors} tensors of {size} elements: bare loop {b * 1e3:.3f} ms, fk.detached {o * 1e3:.3f} ms, "
          f"ratio {o / b:.2f} (target <= 1.2)")


if __name__ == "__main__":
    typer.run(main)
