"""Module classes named in configs: ``"BatchNorm2d"``, ``"torch.nn.LayerNorm"``,
``"timm.layers.BatchNormAct2d"``, and the names shown for classes. A dotted name imports only from
the packages a recipe may import from (:data:`~freezekit.models.IMPORTABLE`); a name from another
package is compared along each class's MRO, importing nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from .errors import PatternError
from .models import IMPORTABLE

__all__ = ["resolve_type", "type_name", "type_test"]


def resolve_type(spec: str) -> type | None:
    """The class a dotted type name under an importable package names, or None."""
    module_name, _, attr = spec.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        # "torch.nn.LayerNorm": a class in a module; "pkg.Outer.Inner": nested -- walk attributes.
        head, _, rest = spec.partition(".")
        obj = importlib.import_module(head)
        attr = rest
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) else None


def type_test(spec: type | str) -> Callable[[type], bool]:
    """A test on module classes for one ``types()`` argument."""
    if isinstance(spec, type):
        return lambda cls: issubclass(cls, spec)
    if "." not in spec:  # a bare class name: the class or any base class of that name
        return lambda cls: any(c.__name__ == spec for c in cls.__mro__)
    if spec.partition(".")[0] in IMPORTABLE:
        try:
            resolved = resolve_type(spec)
        except ImportError:
            resolved = None
        if resolved is None or not issubclass(resolved, nn.Module):
            raise PatternError(f"types(): {spec!r} is not a torch.nn.Module class")
        return lambda cls: issubclass(cls, resolved)
    # Another package: compare full names along the MRO, importing nothing.
    return lambda cls: any(f"{c.__module__}.{c.__qualname__}" == spec for c in cls.__mro__)


def type_name(spec: type | str) -> str:
    if isinstance(spec, str):
        return spec
    if spec.__module__.startswith("torch.nn.modules.") and getattr(nn, spec.__name__, None) is spec:
        return spec.__name__
    for public in ("timm.layers", "freezekit"):
        if spec.__module__.startswith(public + "."):
            module = importlib.import_module(public)
            if getattr(module, spec.__name__, None) is spec:
                return f"{public}.{spec.__name__}"
    return f"{spec.__module__}.{spec.__qualname__}"
