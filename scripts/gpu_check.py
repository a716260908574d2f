"""The runner on a CUDA GPU: each precision, channels_last and torch.compile train the quickstart and
an LP-FT recipe (a phase that unfreezes everything) to a finite loss and a sensible accuracy, an
fp16 run killed mid-epoch resumes to the same weights, and an image folder is read by workers into
pinned memory. Prints a table, writes bench-results/gpu_check.json and exits 1 if a check failed.
Without a CUDA GPU it says so and exits 0, having run nothing.

    python scripts/gpu_check.py        # meant to take under five minutes on one GPU
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS, if asked

import torch
import typer

from freezekit.recipe import load
from freezekit.train.checkpoint import load as load_checkpoint
from freezekit.train.run import run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART, LP_FT = ROOT / "recipes" / "quickstart.yaml", ROOT / "recipes" / "lp_ft.yaml"
IMAGES = 1024  # the shapes recipes' data.train_size
# The kill and the resume run with deterministic kernels: cuDNN's default ones add in any order.
DETERMINISTIC = ("import torch; torch.backends.cudnn.deterministic = True; "
                 "torch.use_deterministic_algorithms(True, warn_only=True); "
                 "from freezekit.cli import main; main()")


def trained(check: str, recipe: Path, sets: list[str], folder: Path, images: int = IMAGES,
            min_accuracy: float = 0.6) -> dict[str, Any]:
    """One run on the GPU, as a row: its epoch times, images/s and final validation accuracy."""
    start = time.perf_counter()
    try:
        result = run(load(recipe, ["train.device=cuda", *sets]), output=folder / check, quiet=True)
    except Exception as e:  # a check that failed is a row of the table, not the end of the script
        return {"check": check, "ok": False, "note": f"{type(e).__name__}: {e}"[:200]}
    lines = [json.loads(line) for line in (folder / check / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in lines if r.get("split") == "train"]
    median, accuracy = statistics.median(seconds), result.final["val"]["accuracy"]
    losses = [result.final[split]["loss"] for split in ("train", "val")]
    finite = all(torch.isfinite(torch.tensor(losses)))
    ok = finite and accuracy >= min_accuracy
    note = "" if ok else f"losses {losses}" if not finite else f"val accuracy under {min_accuracy}"
    return {"check": check, "ok": bool(ok), "first_epoch_s": round(seconds[0], 2), "epoch_s": round(median, 2),
            "images_per_s": round(images / median), "val_accuracy": round(accuracy, 3),
            "wall_s": round(time.perf_counter() - start, 1), "note": note}


def image_folder(root: Path, per_class: int = 256) -> int:
    """JPEGs of the shapes data in root/train/CLASS and root/val/CLASS; the number of training images."""
    from PIL import Image

    from freezekit.train.data import shapes

    train, val, classes = shapes(image_size=64, train_size=3 * per_class, val_size=per_class, seed=0)
    for split, data in (("train", train), ("val", val)):
        for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
            (root / split / classes[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / split / classes[label] / f"{i}.jpg")
    return len(train.labels)


def resume_exactness(folder: Path) -> dict[str, Any]:
    """fp16 killed at step 40 (mid-epoch, after the step-36 checkpoint) and resumed, against the
    same run straight through, twice: if those two differ, the GPU is not deterministic."""
    sets = ["train.device=cuda", "train.precision=fp16", "train.epochs=3", "train.checkpoint_every=12"]
    saved = torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for name in ("straight", "again"):
            run(load(QUICKSTART, sets), output=folder / name, quiet=True)
        killed = subprocess.run([sys.executable, "-c", DETERMINISTIC, "run", str(QUICKSTART),
                                 *[a for s in sets for a in ("--set", s)], "--output", str(folder / "killed"),
                                 "--quiet"], env=os.environ | {"FREEZEKIT_FAULT_KILL_AT": "step:40"},
                                capture_output=True, text=True, timeout=300)
        if killed.returncode != -signal.SIGKILL:
            return {"check": "fp16 resume", "ok": False, "note": f"not killed: {killed.stderr[-200:]}"}
        run(load(QUICKSTART, sets), output=folder / "killed", resume=True, quiet=True)
    except Exception as e:
        return {"check": "fp16 resume", "ok": False, "note": f"{type(e).__name__}: {e}"[:200]}
    finally:
        torch.backends.cudnn.deterministic = saved[0]
        torch.use_deterministic_algorithms(saved[1])
    ends = {n: load_checkpoint(folder / n / "checkpoints" / "last.pt") for n in ("straight", "again", "killed")}

    def gap(a: str, b: str) -> float:
        return max((ends[a]["model"][k].float() - ends[b]["model"][k].float()).abs().max().item()
                   for k in ends[a]["model"])

    same, scaler = gap("straight", "killed") == 0, ends["straight"]["scaler"] == ends["killed"]["scaler"]
    note = "" if same and scaler else (f"max |diff| {gap('straight', 'killed'):.2e} (straight twice: "
                                       f"{gap('straight', 'again'):.2e}); scaler equal: {scaler}")
    return {"check": "fp16 resume", "ok": same and scaler, "note": note}


def main(output: Path = typer.Option(ROOT / "bench-results" / "gpu_check.json", help="Where the JSON goes.")) -> None:
    """Train the quickstart and LP-FT recipes on CUDA in fp32, bf16, fp16, channels_last and compiled; resume
    a killed fp16 run; read JPEGs by workers into pinned memory. Prints a table and writes JSON; exits 1 if a
    check fails, and 0 having run nothing where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing was run")
        raise typer.Exit(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for check, sets in [("fp32", ["train.precision=fp32"]), ("bf16", ["train.precision=bf16"]),
                            ("fp16", ["train.precision=fp16"]),
                            ("bf16 channels_last", ["train.precision=bf16", "train.channels_last=true"]),
                            ("bf16 compile", ["train.precision=bf16", "train.compile=true"])]:
            rows.append(trained(check, QUICKSTART, sets, folder))
        # LP-FT: epochs 0-2 train the head, 3-5 everything; no feature cache, so compile sees the phase
        for check, sets in [("lp_ft bf16", ["train.precision=bf16"]),
                            ("lp_ft bf16 compile", ["train.precision=bf16", "train.compile=true",
                                                    "train.cache_features=false"])]:
            rows.append(trained(check, LP_FT, sets, folder, min_accuracy=0.45))  # CPU fp32: 0.58
        images = image_folder(folder / "jpegs")
        rows.append(trained("image_folder workers pinned", QUICKSTART,
                            ["data.kind=image_folder", f"data.path={folder / 'jpegs'}", "data.workers=4",
                             "train.precision=bf16"], folder, images=images))
        rows.append(resume_exactness(folder))
    by_check = {row["check"]: row for row in rows}
    for eager in ("bf16", "lp_ft bf16"):  # compiled, the same accuracy as eager (other kernels: not the same bits)
        a, b = by_check[eager].get("val_accuracy"), by_check[f"{eager} compile"].get("val_accuracy")
        if a is not None and b is not None and abs(a - b) > 0.05:
            by_check[f"{eager} compile"].update(ok=False, note=f"val accuracy {b} against {a} eager")
    columns = ["check", "ok", "first_epoch_s", "epoch_s", "images_per_s", "val_accuracy", "wall_s", "note"]
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "rows": rows}, indent=2) + "\n")
    print(f"wrote {output}")
    raise typer.Exit(0 if all(row["ok"] for row in rows) else 1)


if __name__ == "__main__":
    typer.run(main)
