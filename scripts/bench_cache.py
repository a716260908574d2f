"""Time a ten-epoch linear probe of timm's test_resnet on shapes, with and without cached features.

    python scripts/bench_cache.py

The recipe is recipes/linear_probe.yaml; both runs go through the runner in this process (imports
paid before timing), each into its own temporary folder, and report wall time and final validation
accuracy. Target: the cached run takes at most a fifth of the time, with the same accuracy.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import typer

from freezekit.recipe import load
from freezekit.train.run import run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "linear_probe.yaml"


def main(epochs: int = typer.Option(10, help="Epochs of each run.")) -> None:
    """Print both runs' time and accuracy, and the ratio (target <= 0.2)."""
    results = {}
    for cache in ("false", "true", "false", "true"):  # alternating; the second pair is reported
        with tempfile.TemporaryDirectory() as folder:
            recipe = load(RECIPE, [f"train.epochs={epochs}", f"train.cache_features={cache}"])
            start = time.perf_counter()
            result = run(recipe, output=Path(folder) / "run", quiet=True)
            results[cache] = (time.perf_counter() - start, result.final["val"]["accuracy"])
    (slow, acc_slow), (fast, acc_fast) = results["false"], results["true"]
    print(f"linear probe, {epochs} epochs: without cache {slow:.2f}s (val accuracy {acc_slow:.1%}), "
          f"with cache {fast:.2f}s (val accuracy {acc_fast:.1%}); time ratio {fast / slow:.2f} (target <= 0.2)")


if __name__ == "__main__":
    typer.run(main)
