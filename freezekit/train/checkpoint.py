"""Checkpoints: written atomically, read without running code, and random states kept exactly.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a crash at any moment leaves the previous checkpoint whole. Everything is read
with ``torch.load(weights_only=True)``: a file that holds pickled code is refused (the readers,
``load`` and ``load_weights``, are :mod:`freezekit.weights`'s, which the recipe check uses too).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..weights import CheckpointError, load, load_weights
from .faults import kill_at

__all__ = ["CheckpointError", "clean", "copy", "load", "load_run", "load_weights", "random_states",
           "restore_random_states", "save"]

# Fault injection for tests: seconds to pause between writing the temporary file and renaming it.
_PAUSE_ENV = "FREEZEKIT_FAULT_CHECKPOINT_PAUSE"


def load_run(path: Path) -> dict[str, Any]:
    """A run's checkpoint, read and checked to be one this freezekit can resume from."""
    saved = load(path)
    if saved.get("format") != "freezekit-run":
        raise CheckpointError(f"checkpoint {path} is not a freezekit run checkpoint")
    if saved.get("version") != 1:
        raise CheckpointError(f"checkpoint {path} has format version {saved.get('version')}, and this "
                              f"freezekit reads version 1")
    missing = sorted({"epoch", "step", "best", "model", "optimizer", "scheduler", "freezekit", "schedule",
                      "random", "recipe"} - saved.keys())
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {', '.join(missing)}")
    return saved


def save(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` atomically (temp file, fsync, rename, fsync of the folder)."""
    _atomic(path, lambda f: torch.save(payload, f), epoch=payload.get("epoch"))


def copy(source: Path, path: Path) -> None:
    """Copy the file ``source`` to ``path`` atomically."""
    with open(source, "rb") as src:
        _atomic(path, lambda f: shutil.copyfileobj(src, f))


def clean(folder: Path) -> None:
    """Remove the temporary files of writers killed before their rename."""
    for stale in folder.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def _atomic(path: Path, write: Any, epoch: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(_PAUSE_ENV):
            time.sleep(float(os.environ[_PAUSE_ENV]))
        if epoch is not None:
            kill_at("checkpoint", epoch)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, most likely; torch.save wraps it in a RuntimeError
        tmp.unlink(missing_ok=True)
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise CheckpointError(_unwritable(path, cause)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _unwritable(path: Path, error: OSError) -> str:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "the disk is full" if full else error.strerror or str(error)
    kept = f"{path} still holds the last good one" if path.is_file() else "there is no earlier one at that path"
    return f"checkpoint {path} could not be written ({reason}); {kept}"


def random_states() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's random generators (CUDA too), as plain data."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    out: dict[str, Any] = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
                           "python_gauss": random.getstate()[2], "numpy": torch.from_numpy(keys.copy()),
                           "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)],
                           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_random_states(states: dict[str, Any]) -> None:
    random.setstate((states["python_version"], tuple(states["python"]), states["python_gauss"]))
    np.random.set_state(("MT19937", states["numpy"].numpy(), states["numpy_pos"], *states["numpy_gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
