"""Gradients of a loss with respect to selected trainable parameters, leaving every ``.grad`` alone.

For custom optimization steps, gradient penalties and per-part clipping: ``torch.autograd.grad``
over the parameters a selector picks, keyed by qualified name.

Example:
    >>> import torch, freezekit as fk
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> g = fk.grads(net(torch.ones(1, 2)).sum(), net, select="1.*")
    >>> sorted(g), net[1].weight.grad is None
    (['1.bias', '1.weight'], True)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .index import ModelIndex
from .select import Resolver, Selector, as_selector

__all__ = ["grads"]


def grads(loss: torch.Tensor, model: nn.Module, select: Selector | str | None = None,
          retain_graph: bool = False, create_graph: bool = False) -> dict[str, torch.Tensor]:
    """``{name: gradient}`` of ``loss`` for the trainable parameters of ``model`` that ``select``
    picks (all of them if None), via ``torch.autograd.grad``. Every ``.grad`` stays untouched.

    A selected parameter that does not influence ``loss`` gets a zero gradient. Raises
    ``ValueError`` if nothing trainable is selected.
    """
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"grads(): loss: expected a one-element tensor, got "
                        f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    for name, flag in (("retain_graph", retain_graph), ("create_graph", create_graph)):
        if not isinstance(flag, bool):
            raise TypeError(f"grads(): {name}: expected True or False, got {flag!r}")
    index = ModelIndex(model)
    if select is None:
        chosen, modules = range(index.n_params), np.zeros(index.n_modules, dtype=bool)
    else:
        modules, params = Resolver(index).resolve(as_selector(select, "grads(): select"))
        chosen = params.nonzero()[0].tolist()
    # a tied tensor is keyed by the name the selection reached it by (lm_head.weight, not transformer.wte.weight)
    names = [index.param_name_in(i, modules) for i in chosen if index.params[i].requires_grad]
    params = [index.params[i] for i in chosen if index.params[i].requires_grad]
    if not params:
        raise ValueError(f"grads(): select: {select!r} picks no trainable parameter of {index.model_name}")
    out = torch.autograd.grad(loss, params, retain_graph=retain_graph, create_graph=create_graph,
                              allow_unused=True, materialize_grads=True)
    return dict(zip(names, out))
