"""Normalization layers: which modules are norms, and the frozen BatchNorm swap.

``freeze(norm="frozen_bn")`` replaces each BatchNorm it covers by a :class:`FrozenBatchNorm`
that *reuses the original parameter and buffer objects*, so ``state_dict`` keys, parameter counts
and optimizer references do not change, and that always normalizes with the stored statistics.
The swap goes through the module's parent; :func:`restore` puts the original back.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lock import asked

# Set on a norm layer whose statistics a policy chose to let adapt (freeze(norm="train")), so that
# fk.audit does not report them as drifting.
STATS_ADAPT = "_freezekit_stats_adapt"

__all__ = ["FrozenBatchNorm", "FrozenBatchNormAct", "can_swap", "has_running_stats", "is_norm", "keeps_running_stats",
           "may_swap"]

_TORCH_NORMS: tuple[type, ...] = tuple(
    cls for cls in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, lazy variants
        nn.GroupNorm,
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
    ) if cls is not None
)
# timm's norm layers that subclass none of torch's (RmsNorm, EvoNorm, FrozenBatchNormAct2d, ...),
# recognised by where they are defined so that nothing is imported to check.
_TIMM_NORM_MODULES = frozenset({
    "timm.layers.norm", "timm.layers.norm_act", "timm.layers.evo_norm",
    "timm.layers.filter_response_norm", "timm.layers.grn",
})
_OTHER_NORMS = frozenset({("torchvision.ops.misc", "FrozenBatchNorm2d")})
# Other libraries' norm layers mostly subclass nn.Module directly (transformers alone has hundreds:
# LlamaRMSNorm, T5LayerNorm, ...); they are known by the name every one of them ends with.
_NORM_NAME = re.compile(r"(?:Norm|RMSNorm|NormAct)(?:\d+d?)?$")
# Classes whose forward is exactly BatchNorm (then, for timm's, dropout and activation): only
# these are swapped; other BatchNorm subclasses may do more, so they get an eval lock instead.
_SWAPPABLE = frozenset({
    ("torch.nn.modules.batchnorm", "BatchNorm1d"), ("torch.nn.modules.batchnorm", "BatchNorm2d"),
    ("torch.nn.modules.batchnorm", "BatchNorm3d"), ("torch.nn.modules.batchnorm", "SyncBatchNorm"),
})
_SWAPPABLE_WITH_ACT = frozenset({("timm.layers.norm_act", "BatchNormAct2d"),
                                 ("timm.layers.norm_act", "SyncBatchNormAct")})


def is_norm(cls: type) -> bool:
    """True if modules of class ``cls`` are normalization layers: torch's, timm's, torchvision's
    ``FrozenBatchNorm2d``, freezekit's :class:`FrozenBatchNorm`, a subclass of any, or a class of
    another library named like one (``...Norm``, ``...RMSNorm``, ``...Norm2d``: transformers'
    ``LlamaRMSNorm``, ``T5LayerNorm``, ...). Containers are never norm layers."""
    if issubclass(cls, (*_TORCH_NORMS, FrozenBatchNorm)):
        return True
    if issubclass(cls, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return any(c.__module__ in _TIMM_NORM_MODULES or (c.__module__, c.__qualname__) in _OTHER_NORMS
               or (c is not nn.Module and _NORM_NAME.search(c.__name__)) for c in cls.__mro__[:-1])


def may_swap(cls: type) -> bool:
    """True if modules of class ``cls`` may be swappable BatchNorms or already frozen ones."""
    return issubclass(cls, FrozenBatchNorm) or _key(cls) in _SWAPPABLE or _key(cls) in _SWAPPABLE_WITH_ACT


def is_frozen_bn(cls: type) -> bool:
    """True if modules of class ``cls`` are freezekit's frozen BatchNorms."""
    return issubclass(cls, FrozenBatchNorm)


def has_running_stats(module: nn.Module) -> bool:
    """True if ``module`` keeps running statistics that training mode would update."""
    buffers = module._buffers
    return buffers.get("running_mean") is not None or buffers.get("running_var") is not None


def keeps_running_stats(module: nn.Module) -> bool:
    """:func:`has_running_stats`, read from ``track_running_stats`` where torch's norm layers keep
    that flag: the module's own dict, which is at hand when a walk reaches it."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return bool(module.__dict__.get("track_running_stats"))
    return has_running_stats(module)


def _key(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def can_swap(module: nn.Module) -> bool:
    """True if ``module`` is a BatchNorm that :func:`frozen` can replace exactly."""
    key = _key(type(module))
    return (key in _SWAPPABLE or key in _SWAPPABLE_WITH_ACT) and has_running_stats(module)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics: always normalizes with ``running_mean`` / ``running_var``.

    Built by :func:`frozen` from a BatchNorm1d/2d/3d or SyncBatchNorm, it holds the *same*
    ``weight`` / ``bias`` parameters (their ``requires_grad`` is the policy's business) and the same
    buffers, so its outputs equal the original's in eval mode, bit for bit, in any mode.
    """

    def __init__(self, original: nn.Module):
        if not isinstance(original, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"{type(self).__name__}(): original: expected a BatchNorm module, got "
                            f"{type(original).__name__}")
        super().__init__()
        self.num_features = original.num_features
        self.eps = original.eps
        for name in ("weight", "bias"):
            self.register_parameter(name, original._parameters.get(name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if name in original._buffers:
                self.register_buffer(name, original._buffers[name],
                                     persistent=name not in original._non_persistent_buffers_set)
        self.training = asked(original)  # the model's mode, also where the original is eval-locked
        # Kept outside _modules so that it adds no state_dict keys; restore() puts it back.
        self.__dict__["original"] = original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, from={type(self.original).__name__}"


class FrozenBatchNormAct(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for timm's ``BatchNormAct2d``: the same ``drop`` and ``act``
    modules follow the normalization."""

    def __init__(self, original: nn.Module):
        if not hasattr(original, "act") or not hasattr(original, "drop"):
            raise TypeError(f"FrozenBatchNormAct(): original: expected a timm BatchNormAct2d, got "
                            f"{type(original).__name__}")
        super().__init__(original)
        self.drop = original.drop
        self.act = original.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def frozen_class(module: nn.Module) -> type[FrozenBatchNorm]:
    """The class of :func:`frozen`'s replacement for ``module``."""
    return FrozenBatchNormAct if _key(type(module)) in _SWAPPABLE_WITH_ACT else FrozenBatchNorm


def frozen(module: nn.Module) -> FrozenBatchNorm:
    """The frozen replacement of a swappable BatchNorm (see :func:`can_swap`)."""
    return frozen_class(module)(module)


def original_of(module: FrozenBatchNorm) -> nn.Module:
    """The BatchNorm that ``module`` replaced, holding ``module``'s current tensors and mode.

    ``model.to(...)`` after the swap replaces the frozen module's buffers, not the original's, so
    they are handed back; the parameter objects are the same anyway.
    """
    original = module.original
    for name, param in module._parameters.items():
        original._parameters[name] = param
    for name, buf in module._buffers.items():
        original._buffers[name] = buf
    original.train(asked(module))  # what the model last asked, even of a locked frozen module
    return original
