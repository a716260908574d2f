"""Building models by name: ``timm:NAME``, ``torchvision:NAME``, ``hf:PATH_OR_ID`` or
``package.module:factory``.

Nothing is downloaded: ``pretrained=True`` reads the weights from the local cache of timm (the
Hugging Face hub cache) or torchvision (``torch.hub``), and fails at once, saying so, if they are
not there; with ``pretrained=False`` no weights are read at all (torchvision's detection and
segmentation backbones included). ``hf:`` takes a local directory holding a Hugging Face
``config.json`` (and weights, for ``pretrained=True``) or a model id already in the local Hugging
Face cache, and needs ``transformers`` (``pip install 'freezekit[transformers]'``). A factory
outside torch, torchvision, timm and freezekit is imported only when its package is allowed
(``allow_import``): a name in a recipe must not run code.

Example:
    >>> import freezekit.models as models
    >>> type(models.build("timm:test_vit", device="meta")).__name__
    'VisionTransformer'
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from .errors import FreezekitError, closest

__all__ = ["IMPORTABLE", "WEIGHT_ARGUMENTS", "UnknownModelError", "build", "build_for_inspection", "parse"]

IMPORTABLE = frozenset({"torch", "torchvision", "timm", "freezekit"})
SOURCES = ("timm", "torchvision", "hf")
# Factory arguments that would fetch or read weights behind the cache-only, weights-only loading here.
WEIGHT_ARGUMENTS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "weights",
                  "weights_backbone")


class UnknownModelError(FreezekitError, ValueError):
    """A model name that no registry knows, or a factory that may not or cannot be imported."""


def parse(spec: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; ``"pkg.mod:fn"`` -> ``("pkg.mod", "fn")``."""
    if not isinstance(spec, str) or ":" not in spec or not all(spec.partition(":")[::2]):
        raise UnknownModelError(f"model {spec!r}: expected timm:NAME, torchvision:NAME, hf:PATH_OR_ID or "
                                "package.module:factory")
    source, _, name = spec.partition(":")
    if source not in SOURCES and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", source):
        raise UnknownModelError(f"model {spec!r}: {source!r} is not a module path; expected timm:NAME, "
                                "torchvision:NAME or package.module:factory")
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
    if source == "hf":
        return _huggingface(spec, name, num_classes, pretrained, device, kwargs)
    if source in SOURCES:
        loads = [k for k in WEIGHT_ARGUMENTS if kwargs.get(k, False) not in (None, False)]
        if loads:
            raise UnknownModelError(f"model {spec!r}: argument {loads[0]!r} would load weights; use "
                                    "pretrained=True (cache only) or a checkpoint file instead")
        for key in ("pretrained", "weights"):  # null: what is passed below anyway
            kwargs.pop(key, None)
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

            if not pretrained:  # no weights at all: detection models load a backbone's by default
                accepted = inspect.signature(torchvision.models.get_model_builder(name)).parameters
                kwargs.update({k: None for k in WEIGHT_ARGUMENTS if k in accepted and k not in ("weights",)})
            weights = "DEFAULT" if pretrained else None
            return _offline(lambda: torchvision.models.get_model(name, weights=weights, **kwargs), spec, pretrained)
        model = _factory(spec, source, name, allow_import)(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _huggingface(spec: str, name: str, num_classes: int | None, pretrained: bool,
                 device: str | torch.device | None, kwargs: dict[str, Any]) -> nn.Module:
    """A Hugging Face model from a local directory or the local cache: the class its config names
    (``architectures``), else ``AutoModel``; weights only with ``pretrained``."""
    try:
        import transformers
    except ImportError:
        raise UnknownModelError(f"model {spec!r}: hf: models need transformers; pip install "
                                "'freezekit[transformers]'") from None
    if num_classes is not None:
        kwargs["num_labels"] = num_classes
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UnknownModelError(f"model {spec!r}: no Hugging Face config found for {name!r}: not a directory with a "
                                "config.json, nor a model id in the local Hugging Face cache (freezekit does not "
                                f"download). ({str(e).splitlines()[0]})") from None
    cls = next((c for a in config.architectures or () if (c := getattr(transformers, a, None)) is not None),
               transformers.AutoModel)
    make = cls.from_config if cls is transformers.AutoModel else cls
    with torch.device(device) if device is not None else nullcontext():
        if not pretrained:
            return make(config)
    try:
        model = cls.from_pretrained(name, config=config, local_files_only=True)
    except OSError as e:
        raise UnknownModelError(f"model {spec!r}: no weights found for {name!r} locally ({str(e).splitlines()[0]}); "
                                "use pretrained: false to build it without weights") from None
    return model.to(device) if device is not None else model


def build_for_inspection(spec: str, *, on_cpu: Callable[[str], object] | None = None, **kwargs: Any) -> nn.Module:
    """Build ``spec`` to look at, not to run: on the meta device (instant, no memory, no weights), or
    on the CPU for a model that computes its layout from tensor values, after telling ``on_cpu`` so.
    ``kwargs`` go to :func:`build`, and its errors come through."""
    try:
        return build(spec, device="meta", **kwargs)
    except (NotImplementedError, RuntimeError):  # a model that computes its layout from tensor values
        if on_cpu is not None:
            on_cpu(f"{spec} does not build on the meta device; building it on the CPU")
        return build(spec, device="cpu", **kwargs)


class _NotCached(Exception):
    pass


@contextmanager
def _cache_only() -> Iterator[None]:
    """Let timm and torchvision read weights from the local caches only: a download raises at once
    (rather than waiting on a network that may not be there)."""
    import torch.hub

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise _NotCached(url)

    patches = [(torch.hub, "download_url_to_file", refuse)]
    try:
        import timm.models._hub as timm_hub

        original = timm_hub.hf_hub_download
        patches.append((timm_hub, "hf_hub_download", partial(original, local_files_only=True)))
    except (ImportError, AttributeError):
        pass
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _offline(make: Any, spec: str, pretrained: bool) -> nn.Module:
    if not pretrained:
        return make()
    try:
        with _cache_only():
            return make()
    except Exception as e:  # _NotCached, or huggingface_hub's LocalEntryNotFoundError and kin
        if isinstance(e, _NotCached) or "local" in type(e).__name__.lower() or "offline" in str(e).lower() \
                or "cache" in str(e).lower():
            raise UnknownModelError(f"model {spec!r}: pretrained weights are not in the local cache, and freezekit "
                                    f"does not download them; put them in the cache (timm: the Hugging Face hub "
                                    f"cache; torchvision: torch.hub.get_dir()) or use pretrained: false") from None
        raise
