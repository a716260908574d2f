"""Reading weights and checkpoint files without running code.

Torch files are read with ``torch.load(weights_only=True)``: a file that holds pickled code is
refused. Writing checkpoints is the runner's (:mod:`freezekit.train.checkpoint`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import FreezekitError

__all__ = ["CheckpointError", "load", "load_weights"]


class CheckpointError(FreezekitError, ValueError):
    """A checkpoint or weights file that cannot be used (missing, truncated, foreign, or holding code)
    or written (a full disk)."""


def load(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """Read a file written by :func:`freezekit.train.checkpoint.save`, refusing pickled code and saying
    what is wrong."""
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
