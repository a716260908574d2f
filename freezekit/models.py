"""Building models by name: ``timm:NAME``, ``torchvision:NAME`` or ``package.module:factory``.

Nothing is downloaded unless ``pretrained=True`` is asked for, and even then only from the local
cache (offline, it fails saying so). A factory outside torch, torchvision, timm and freezekit is
imported only when its package is allowed (``allow_import``): a name in a recipe must not run code.

Example:
    >>> import freezekit.models as models
    >>> type(models.build("timm:test_vit", device="meta")).__name__
    'VisionTransformer'
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from .errors import FreezekitError, closest

__all__ = ["IMPORTABLE", "UnknownModelError", "build", "parse"]

IMPORTABLE = frozenset({"torch", "torchvision", "timm", "freezekit"})
SOURCES = ("timm", "torchvision")


class UnknownModelError(FreezekitError, ValueError):
    """A model name that no registry knows, or a factory that may not or cannot be imported."""


def parse(spec: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; ``"pkg.mod:fn"`` -> ``("pkg.mod", "fn")``."""
    if not isinstance(spec, str) or ":" not in spec or not all(spec.partition(":")[::2]):
        raise UnknownModelError(f"model {spec!r}: expected timm:NAME, torchvision:NAME or package.module:factory")
    source, _, name = spec.partition(":")
    return source, name


def _registry(source: str) -> list[str]:
    if source == "timm":
        import timm

        return timm.list_models()
    import torchvision

    return torchvision.models.list_models()


def _factory(spec: str, source: str, name: str, allow_import: Iterable[str]) -> Any:
    allowed = IMPORTABLE | set(allow_import)
    package = source.partition(".")[0]
    if package not in allowed:
        raise UnknownModelError(f"model {spec!r}: importing {package!r} is not allowed; pass "
                                f"--allow-import {package} (allow_import=[{package!r}]) if you trust it")
    try:
        module = importlib.import_module(source)
    except ImportError as e:
        raise UnknownModelError(f"model {spec!r}: cannot import {source!r} ({e})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        near = closest(name, [n for n in dir(module) if not n.startswith("_")])
        raise UnknownModelError(f"model {spec!r}: {source} has no callable {name!r}"
                                + (f"; did you mean {near[0]!r}?" if near else ""))
    return factory


def build(spec: str, *, num_classes: int | None = None, pretrained: bool = False,
          device: str | torch.device | None = None, allow_import: Iterable[str] = (), **kwargs: Any) -> nn.Module:
    """Build the model ``spec`` names (on ``device``; ``"meta"`` builds without memory or weights).

    Raises:
        UnknownModelError: the name is not in the timm / torchvision registry (with the closest
            names), or the factory may not or cannot be imported.
    """
    source, name = parse(spec)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if source in SOURCES:
        names = _registry(source)
        if name not in names:
            near = closest(name, names)
            raise UnknownModelError(f"model {spec!r}: {source} has no model {name!r}"
                                    + (f"; did you mean {', '.join(f'{source}:{n}' for n in near)}?" if near else ""))
    with torch.device(device) if device is not None else nullcontext():
        if source == "timm":
            import timm

            return _offline(lambda: timm.create_model(name, pretrained=pretrained, **kwargs), spec, pretrained)
        if source == "torchvision":
            import torchvision

            weights = "DEFAULT" if pretrained else None
            return _offline(lambda: torchvision.models.get_model(name, weights=weights, **kwargs), spec, pretrained)
        model = _factory(spec, source, name, allow_import)(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _offline(make: Any, spec: str, pretrained: bool) -> nn.Module:
    try:
        return make()
    except Exception as e:  # a download that cannot happen: say so, without the network traceback
        if pretrained and any(word in f"{type(e).__name__} {e}".lower() for word in
                              ("connect", "resolve", "offline", "urlopen", "network", "http", "hub", "download")):
            raise UnknownModelError(f"model {spec!r}: pretrained weights are not in the local cache and cannot be "
                                    f"downloaded here ({type(e).__name__}); put them in the cache or use "
                                    f"pretrained: false") from None
        raise
