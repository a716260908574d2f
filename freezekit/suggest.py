"""What to say when a selector matched nothing: the closest real names, the model's actual
classifier when the word is a common alias of one, else the model's top-level children.

Example:
    >>> import torchvision, freezekit as fk
    >>> try:
    ...     fk.Policy(fk.unfreeze("head")).plan(torchvision.models.resnet18())
    ... except fk.NoMatchError as e:
    ...     print(e)
    policy[0].unfreeze: 'head' matched nothing in ResNet; its classifier is 'fc'
"""

from __future__ import annotations

import torch.nn as nn

from .errors import closest, some
from .index import ModelIndex

__all__ = ["unmatched"]

# What people call a model's last layer, whatever the model calls it.
CLASSIFIER_WORDS = ("head", "heads", "classifier", "fc", "lm_head", "last_linear", "output", "cls")


def unmatched(pattern: str, kind: str, index: ModelIndex) -> str:
    """What to say after the pattern: ``"matched nothing in MODEL; closest: ..."`` (``kind``:
    ``"name"``, ``"type"`` or ``"module"``, what the pattern was meant to match)."""
    if kind == "type":
        classes = {c.__name__ for m in index.modules for c in type(m).__mro__ if issubclass(c, nn.Module)}
        near = closest(pattern.rpartition(".")[2], sorted(classes))
        return f"matched no module of {index.model_name}" + _listed("closest", near)
    if kind == "module":
        near = closest(pattern, index.module_names)
        return f"is not a container (or numbered family) in {index.model_name}" + _listed("closest", near)
    what = f"matched nothing in {index.model_name}"
    word = pattern.removeprefix("re:").strip("*.?")
    head = classifier(index) if word in CLASSIFIER_WORDS else None
    if head is not None and head != word:
        return f"{what}; its classifier is {head!r}"
    near = closest(pattern.removeprefix("re:"), index.module_names + index.param_names)
    if near:
        return what + _listed("closest", near)
    top = [n for n in index.module_names if n and "." not in n] + [n for n in index.param_names if "." not in n]
    return f"{what}; its top-level parts are {some(top, 12)}" if top else what


def classifier(index: ModelIndex) -> str | None:
    """The name of the model's classifier or output layer: what timm's ``get_classifier()`` or
    Hugging Face's ``get_output_embeddings()`` return, else a top-level child with a usual name."""
    root = index.root
    for method in ("get_classifier", "get_output_embeddings"):
        try:
            module = getattr(root, method)()
        except Exception:  # not there, or not implemented by this model: look further
            continue
        if isinstance(module, nn.Module):
            name = next((n for n, m in zip(index.module_names, index.modules) if m is module and n), None)
            if name:
                return name
    return next((n for n in CLASSIFIER_WORDS if n in index.module_names), None)


def _listed(label: str, names: list[str]) -> str:
    return f"; {label}: {', '.join(map(repr, names))}" if names else ""
