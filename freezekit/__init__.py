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

from .ddp import out_of_sync, rebuild_ddp
from .errors import (
    ConfigError,
    DeadRuleWarning,
    FreezekitError,
    FreezekitWarning,
    FrozenParameterChanged,
    ModuleMismatchError,
    NoMatchError,
    PatternError,
    StateError,
    TiedWeightsWarning,
)
from .findings import Finding, Findings, audit
from .freeze_state import State, load_state, state, state_dict
from .gradients import grads
from .index import unwrap
from .norm import FrozenBatchNorm, FrozenBatchNormAct
from .optim import SyncReport, param_groups, sync_optimizer
from .plan import Change, ModulePlan, ParamPlan, Plan
from .policy import Applied, Policy
from .rules import Rule, detach, eval_mode, freeze, unfreeze
from .schedule import Event, Phase, Schedule, gradual_unfreeze
from .select import Selection, Selector, glob, names, regex
from .select_structure import first, last, norms, types, where
from .summary_table import Summary, summary
from .targets import frozen_copy, hard_update, polyak_update
from .tracking import track_optimizer
from .values import detached, stop_gradient, to_cpu, to_numpy, to_python
from .verify import assert_frozen

__version__ = "0.1.0"

__all__ = [
    "Applied",
    "Change",
    "ConfigError",
    "DeadRuleWarning",
    "Event",
    "Finding",
    "Findings",
    "FreezekitError",
    "FreezekitWarning",
    "FrozenBatchNorm",
    "FrozenBatchNormAct",
    "FrozenParameterChanged",
    "ModuleMismatchError",
    "ModulePlan",
    "NoMatchError",
    "ParamPlan",
    "PatternError",
    "Phase",
    "Plan",
    "Policy",
    "Rule",
    "Schedule",
    "Selection",
    "Selector",
    "State",
    "StateError",
    "Summary",
    "SyncReport",
    "TiedWeightsWarning",
    "__version__",
    "assert_frozen",
    "audit",
    "detach",
    "detached",
    "eval_mode",
    "first",
    "freeze",
    "frozen_copy",
    "glob",
    "grads",
    "gradual_unfreeze",
    "hard_update",
    "last",
    "load_state",
    "names",
    "norms",
    "out_of_sync",
    "param_groups",
    "polyak_update",
    "rebuild_ddp",
    "regex",
    "state",
    "state_dict",
    "stop_gradient",
    "summary",
    "sync_optimizer",
    "to_cpu",
    "to_numpy",
    "to_python",
    "track_optimizer",
    "types",
    "unfreeze",
    "unwrap",
    "where",
]
