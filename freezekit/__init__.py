"""freezekit: control what a PyTorch model learns during fine-tuning.

Select parts of any ``nn.Module`` by name, pattern, type or position; freeze, unfreeze, detach or
eval-lock them with a :class:`Policy` that plans, applies and undoes exactly.

Example:
    >>> import timm, freezekit as fk
    >>> model = timm.create_model("test_vit", pretrained=False)
    >>> applied = fk.Policy(fk.freeze("*"), fk.unfreeze("head")).apply(model)
    >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)
    ['head.bias', 'head.weight']
    >>> applied.undo()
"""

from .errors import (
    ConfigError,
    DeadRuleWarning,
    FreezekitError,
    FreezekitWarning,
    NoMatchError,
    PatternError,
)
from .index import unwrap
from .norm import FrozenBatchNorm, FrozenBatchNormAct
from .plan import Change, ModulePlan, ParamPlan, Plan
from .policy import Applied, Policy
from .rules import Rule, detach, eval_mode, freeze, unfreeze
from .select import Selection, Selector, first, glob, last, names, norms, regex, types, where

__version__ = "0.1.0"

__all__ = [
    "Applied",
    "Change",
    "ConfigError",
    "DeadRuleWarning",
    "FreezekitError",
    "FreezekitWarning",
    "FrozenBatchNorm",
    "FrozenBatchNormAct",
    "ModulePlan",
    "NoMatchError",
    "ParamPlan",
    "PatternError",
    "Plan",
    "Policy",
    "Rule",
    "Selection",
    "Selector",
    "__version__",
    "detach",
    "eval_mode",
    "first",
    "freeze",
    "glob",
    "last",
    "names",
    "norms",
    "regex",
    "types",
    "unfreeze",
    "unwrap",
    "where",
]
