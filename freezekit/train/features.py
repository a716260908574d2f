"""Feature caching for linear probes: when nothing below the classifier head can change, compute
its input once and train the head alone on it afterwards.

Exact when (a) every parameter outside the head is frozen, (b) every module outside the head
computes the same thing in train and eval mode -- it is eval-locked, or a frozen BatchNorm, or its
class never looks at ``self.training``, or only does so for dropout that drops nothing (``p``,
``drop_prob``, ``drop_rate``, ``dropout`` all 0) -- and (c) the inputs are drawn without augmentation.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.nn as nn

from ..index import ModelIndex, unwrap
from ..lock import is_locked
from ..norm import FrozenBatchNorm

__all__ = ["FeatureCache", "classifier_of", "why_not_cacheable"]


def classifier_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The classifier head: timm's ``get_classifier()``, else ``fc`` / ``classifier`` / ``head`` / ``heads``."""
    model = unwrap(model)
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        for name, module in model.named_modules():
            if module is head and name:
                return name, head
    for name in ("fc", "classifier", "head", "heads"):
        module = model._modules.get(name)
        if module is not None:
            return name, module
    return None


@cache
def _reads_training(cls: type) -> bool:
    """Whether the source of ``cls`` or of a class it derives from (short of ``nn.Module``) mentions
    ``training``. All of it, not ``forward`` alone: timm's ``forward`` calls ``forward_head``, which
    drops with ``training=self.training``."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        try:
            if "training" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            return True  # cannot tell: assume it does
    return False


# What a module's dropout rate is called: nn.Dropout, timm's DropPath, timm models' head dropout,
# nn.MultiheadAttention.
_DROP_RATES = ("p", "drop_prob", "drop_rate", "dropout")


def _no_drop(module: nn.Module) -> bool:
    rates = (getattr(module, name, None) for name in _DROP_RATES)
    return not any(isinstance(rate, (int, float)) and rate for rate in rates)


def _mode_free(module: nn.Module) -> bool:
    """Computes the same in train and eval mode. A class that reads ``self.training`` is taken to
    do so for dropout (timm's fused attention reads it for ``attn_drop.p``): free when neither the
    module nor its direct children drop anything and it keeps no running statistics."""
    if is_locked(module) or isinstance(module, FrozenBatchNorm) or not _reads_training(type(module)):
        return True
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        return False
    return _no_drop(module) and all(_no_drop(child) for child in module.children())


def why_not_cacheable(model: nn.Module, augment: bool) -> str | None:
    """None if the head's input can be cached exactly, else the reason it cannot."""
    found = classifier_of(model)
    if found is None:
        return "no classifier head found (get_classifier(), fc, classifier, head or heads)"
    _, head = found
    if augment:
        return "augmentation draws new inputs every epoch"
    index = ModelIndex(model)
    inside = {id(p) for p in head.parameters()}
    moving = [n for n, p, rg in zip(index.param_names, index.params, index.requires_grad.tolist())
              if rg and id(p) not in inside]
    if moving:
        return f"parameters outside the head train ({moving[0]}{', ...' if len(moving) > 1 else ''})"
    head_modules = {id(m) for m in head.modules()}
    for name, module in zip(index.module_names, index.modules):
        if id(module) not in head_modules and not _mode_free(module):
            return f"{name or 'the model'} ({type(module).__name__}) behaves differently in training"
    return None


class FeatureCache:
    """The inputs of the head, per sample: filled by full forward passes under :meth:`capture`,
    then :meth:`features` gives a batch's head inputs without running the backbone."""

    def __init__(self, model: nn.Module, size: int):
        self.head = classifier_of(model)[1]
        self.size = size
        self.store: torch.Tensor | None = None
        self.filled = torch.zeros(size, dtype=torch.bool)
        self._batch: torch.Tensor | None = None
        self._hook = self.head.register_forward_pre_hook(self._keep)

    @property
    def ready(self) -> bool:
        return bool(self.filled.all())

    def _keep(self, module: nn.Module, args: tuple) -> None:
        if self._batch is None or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        if self.store is None:
            self.store = torch.empty((self.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.store[self._batch.to(x.device)] = x
        self.filled[self._batch] = True

    def capture(self, indices: torch.Tensor) -> _Capturing:
        """Context: the head's input during the forward pass inside is stored for ``indices``."""
        return _Capturing(self, indices)

    def features(self, indices: torch.Tensor) -> torch.Tensor:
        return self.store[indices.to(self.store.device)]

    def close(self) -> None:
        self._hook.remove()


class _Capturing:
    def __init__(self, cache_: FeatureCache, indices: torch.Tensor):
        self.cache, self.indices = cache_, indices

    def __enter__(self) -> None:
        self.cache._batch = self.indices

    def __exit__(self, *exc: object) -> None:
        self.cache._batch = None
