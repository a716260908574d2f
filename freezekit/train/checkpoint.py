"""Checkpoints: written atomically, read without running code, and random states kept exactly.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a crash at any moment leaves the previous checkpoint whole. Everything is read
with ``torch.load(weights_only=True)``: a file that holds pickled code is refused.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FreezekitError
from .faults import kill_at

__all__ = ["CheckpointError", "clean", "copy", "load", "load_weights", "random_states", "restore_random_states", "save"]

# Fault injection for tests: seconds to pause between writing the temporary file and renaming it.
_PAUSE_ENV = "FREEZEKIT_FAULT_CHECKPOINT_PAUSE"


class CheckpointError(FreezekitError, ValueError):
    """A checkpoint or weights file that cannot be used (missing, truncated, foreign, or holding code)
    or written (a full disk)."""


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


def load(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """Read a file written by :func:`save`, refusing pickled code and saying what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's hints about foreign files: the error below says it
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or code: torch says which in its message
        raise CheckpointError(_unreadable(path, what, e)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a {type(data).__name__}, not a freezekit checkpoint")
    return data


def _unreadable(path: Path, what: str, error: Exception) -> str:
    text = str(error)
    if "GLOBAL" in text or "Unsupported global" in text:  # torch's weights-only unpickler met an object
        return (f"{what} {path} holds pickled Python objects, which could run code; refused "
                f"(weights are loaded with weights_only=True)")
    detail = "not a torch file" if "Weights only load failed" in text else text.splitlines()[0] if text else "?"
    return f"{what} {path} cannot be read ({detail}); it may be truncated or not a torch file"


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch file (a state dict, or one under ``state_dict`` /
    ``model``), read without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"weights file {path} is not a readable safetensors file ({e})") from None
    data = load(path, "weights file")
    for key in ("state_dict", "model"):
        if isinstance(data.get(key), dict):
            data = data[key]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"weights file {path} holds no tensors")
    return tensors


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
