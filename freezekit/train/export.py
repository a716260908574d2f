"""The fine-tuned model, exported as ``model.safetensors`` + ``config.json`` that timm or torchvision
load without freezekit.

A ``timm:NAME`` model is written by timm's own ``save_for_hf``, so that timm loads it by itself::

    model = timm.create_model("local-dir:runs/quickstart/model", pretrained=True)
    # or, into the architecture by name (num_classes in the overlay keeps the classifier):
    model = timm.create_model(NAME, pretrained=True, num_classes=N,
                              pretrained_cfg_overlay=dict(file=".../model.safetensors", num_classes=N))

A ``torchvision:NAME`` model (or any other source) gets the same two files; ``config.json`` holds
``architecture`` (the freezekit model name), ``num_classes``, ``label_names`` and the data config
as ``pretrained_cfg``::

    model = torchvision.models.get_model(NAME, weights=None, num_classes=N)
    model.load_state_dict(safetensors.torch.load_file(".../model.safetensors"))

The state dict is the plain architecture's: wrappers (DDP, ``torch.compile``) are looked through,
and freezekit's frozen BatchNorms, eval locks and boundaries add no keys of their own.

Example:
    >>> import tempfile, timm
    >>> folder = Path(tempfile.mkdtemp()) / "model"
    >>> net = timm.create_model("test_resnet", num_classes=2)
    >>> sorted(p.name for p in export(net, "timm:test_resnet", folder, {"input_size": (3, 32, 32)}, ["cat", "dog"])
    ...        .iterdir())
    ['config.json', 'model.safetensors']
    >>> load(folder)[0].pretrained_cfg["label_names"]
    ['cat', 'dog']
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError
from timm.data import resolve_data_config

from ..index import unwrap
from ..models import build, parse

__all__ = ["CONFIG", "DATA_KEYS", "WEIGHTS", "export", "load", "read_config"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def export(model: nn.Module, source: str, folder: Path, data_config: dict[str, Any], classes: list[str], *,
           model_args: dict[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` for ``model`` (built from the
    freezekit model name ``source``), replacing what ``folder`` held only once both are written.

    Args:
        data_config: the preprocessing the model was trained with, as timm's ``resolve_data_config``
            gives it (keys from ``DATA_KEYS``; timm fills the missing ones from the model's own
            config, other sources from timm's defaults).
        classes: the class names, in the order of the model's outputs.
        model_args: the factory arguments the model was built with, for sources other than timm
            (which records its own).

    Call it on one process, with the whole model (not FSDP shards).
    """
    plain = unwrap(model)
    kind = parse(source)[0]
    unknown = sorted(set(data_config) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"export(): data_config: unknown keys {unknown}; expected some of {', '.join(DATA_KEYS)}")
    size = data_config.get("input_size")
    if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 3):
        raise ValueError(f"export(): data_config: input_size: expected (channels, height, width), got {size!r}")
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if kind == "timm":
            _save_timm(plain, source, tmp, data_config, list(classes))
        else:
            safetensors.torch.save_model(plain, str(tmp / WEIGHTS), force_contiguous=True)
            config = {"architecture": source, "num_classes": len(classes), "label_names": list(classes),
                      "model_args": dict(model_args or {}),
                      "pretrained_cfg": resolve_data_config(args=dict(data_config))}
            (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        for file in tmp.iterdir():  # on disk before the rename makes them the export
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _replace(tmp, folder)
    except SafetensorError as e:  # a full disk, a file size limit: said as the OSError it is
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"cannot write {folder / WEIGHTS}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _save_timm(plain: nn.Module, source: str, folder: Path, data_config: dict[str, Any], classes: list[str]) -> None:
    from timm.models import save_for_hf

    if not isinstance(getattr(plain, "pretrained_cfg", None), dict):
        raise ValueError(f"export(): model {source!r}: a {type(plain).__name__} is not a timm model")
    if plain.num_classes != len(classes):
        raise ValueError(f"export(): model {source!r} has {plain.num_classes} outputs, but {len(classes)} classes "
                         f"were given")
    # timm's own writer, through its torch format: its safetensors path refuses channels-last tensors
    save_for_hf(plain, str(folder), model_config={"label_names": classes}, data_config=data_config,
                safe_serialization=False)
    torch_file = folder / "pytorch_model.bin"
    tensors = torch.load(torch_file, weights_only=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS))
    torch_file.unlink()


def _replace(tmp: Path, folder: Path) -> None:
    """Put the folder ``tmp`` where ``folder`` is: a folder cannot be renamed over a full one, so the
    old one steps aside first, and goes once the new one is in place."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of an exported model, checked for what :func:`load` needs.

    Raises:
        FileNotFoundError: ``folder``, its ``config.json`` or its ``model.safetensors`` is missing.
        ValueError: ``config.json`` is not JSON, or lacks a field.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    for file in (CONFIG, WEIGHTS):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder}: no {file} in it; expected a model exported by freezekit run")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / CONFIG}: not JSON ({e})") from None
    missing = [k for k in ("architecture", "num_classes", "pretrained_cfg") if not isinstance(config, dict)
               or k not in config]
    if missing:
        raise ValueError(f"{folder / CONFIG}: missing {', '.join(missing)}")
    return config


def load(folder: Path, *, allow_import: Iterable[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """The model exported to ``folder``, in eval mode, and its ``config.json``.

    A timm export loads through ``timm.create_model("local-dir:...")``; others are rebuilt from their
    ``architecture`` by :func:`freezekit.models.build` (a factory package needs ``allow_import``).
    """
    folder = Path(folder)
    config = read_config(folder)
    architecture = config["architecture"]
    try:
        if ":" not in architecture:  # timm's own config names the bare architecture
            import timm

            model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)
        else:
            model = build(architecture, num_classes=config["num_classes"], pretrained=False,
                          allow_import=allow_import, **config.get("model_args", {}))
            safetensors.torch.load_model(model, str(folder / WEIGHTS))
    except (RuntimeError, SafetensorError) as e:
        raise ValueError(f"{folder / WEIGHTS}: cannot load into {architecture} ({e})") from None
    return model.eval(), config
