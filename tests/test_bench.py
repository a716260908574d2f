"""The benchmarks cannot rot: every one runs, at its smallest, and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_runs_at_its_smallest(tmp_path):
    env = {**os.environ, "FREEZEKIT_BENCH_RESULTS": str(tmp_path)}  # not over the real results
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "all", "--smoke"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== against the targets" in result.stdout
    for name in ("apply", "summary", "step", "runner", "cache", "values", "verify", "polyak", "data"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["rows"] and {"worst", "target", "verdict"} <= set(data["summary"]) and data["machine"]["torch"]


def test_the_apply_benchmark_runs_on_its_own(tmp_path):
    env = {**os.environ, "FREEZEKIT_BENCH_RESULTS": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "apply", "--smoke"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ratio" in result.stdout
    assert json.loads((tmp_path / "apply.json").read_text())["rows"][0]["tensors"] > 400
