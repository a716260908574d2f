"""Rules: one line of a policy -- an action (freeze, unfreeze, detach, eval_mode), what it
selects, and the action's options -- and their recipe form.

Example:
    >>> import freezekit as fk
    >>> fk.freeze("*", norm="frozen_bn").to_config()
    {'freeze': '*', 'norm': 'frozen_bn'}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, closest
from .select import Glob, Selector, as_selector
from .select_config import from_config as selector_from_config

__all__ = ["ACTIONS", "NORM_MODES", "SIDES", "Rule", "detach", "did_you_mean", "eval_mode", "freeze", "unfreeze"]

ACTIONS = ("freeze", "unfreeze", "detach", "eval_mode")
NORM_MODES = ("eval", "frozen_bn", "train", "trainable")
SIDES = ("output", "input")
_OPTIONS = {"freeze": ("norm", "strict"), "unfreeze": ("strict",), "detach": ("at", "no_grad", "strict"),
            "eval_mode": ("strict",)}


@dataclass(frozen=True)
class Rule:
    """One line of a policy: an action, what it selects, and the action's options."""

    action: str
    selectors: tuple[Selector, ...]
    norm: str = "eval"  # freeze: what happens to the norm layers it covers (NORM_MODES)
    at: str = "output"  # detach: which side of the module is cut
    no_grad: bool = True  # detach at="output": run the module under torch.no_grad()
    strict: bool = True  # every selector must select something

    def __repr__(self) -> str:
        args = [repr(s.patterns[0]) if isinstance(s, Glob) and len(s.patterns) == 1 else repr(s)
                for s in self.selectors]
        if self.action == "freeze":
            args.append(f"norm={self.norm!r}")
        if self.action == "detach":
            args += [f"at={self.at!r}", f"no_grad={self.no_grad}"]
        if not self.strict:
            args.append("strict=False")
        return f"{self.action}({', '.join(args)})"

    def to_config(self) -> dict[str, Any]:
        """The recipe form: ``{action: selector(s), option: value, ...}``."""
        sels = [s.to_config() for s in self.selectors]
        out: dict[str, Any] = {self.action: sels[0] if len(sels) == 1 else sels}
        if self.action == "freeze":
            out["norm"] = self.norm
        if self.action == "detach":
            out["at"] = self.at
            out["no_grad"] = self.no_grad
        if not self.strict:
            out["strict"] = False
        return out

    @classmethod
    def from_config(cls, config: Any, where: str = "rule") -> Rule:
        """A rule from its recipe form. Raises :class:`ConfigError` naming ``where`` and the field."""
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: expected a mapping like {{freeze: PATTERN}}, got {config!r}")
        actions = [k for k in config if k in ACTIONS]
        if len(actions) != 1:
            unknown = [k for k in config if k not in ACTIONS and k not in ("norm", "at", "no_grad", "strict")]
            hint = did_you_mean(str(unknown[0]), ACTIONS) if unknown else ""
            found = f"found {', '.join(map(repr, actions))}" if actions else "found none"
            raise ConfigError(f"{where}: expected exactly one action key of {', '.join(ACTIONS)}; {found}{hint}")
        action = actions[0]
        for key in config:
            if key != action and key not in _OPTIONS[action]:
                raise ConfigError(f"{where}.{key}: not an option of {action} (options: "
                                  f"{', '.join(_OPTIONS[action])}){did_you_mean(str(key), _OPTIONS[action])}")
        value = config[action]
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ConfigError(f"{where}.{action}: expected a pattern, a list of patterns or a selector mapping, "
                              "got an empty list")
        here = f"{where}.{action}"
        selectors = [selector_from_config(v, f"{here}[{i}]" if isinstance(value, list) else here)
                     for i, v in enumerate(items)]
        options = {k: v for k, v in config.items() if k != action}
        try:
            return _make(action, selectors, **options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None


def did_you_mean(value: str, choices: tuple[str, ...] | list[str]) -> str:
    """``; did you mean 'X'?`` with the choice closest to ``value``, or nothing."""
    hint = closest(value, choices, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _make(action: str, selectors: tuple | list, **options: Any) -> Rule:
    if not selectors:
        raise TypeError(f"{action}() needs at least one selector (a pattern string or a freezekit selector)")
    sels = tuple(as_selector(s, f"{action}() argument {i + 1}") for i, s in enumerate(selectors))
    for key in ("strict", "no_grad"):
        if key in options and not isinstance(options[key], bool):
            raise TypeError(f"{action}(): {key}: expected True or False, got {options[key]!r}")
    if "norm" in options and options["norm"] not in NORM_MODES:
        raise ValueError(f"{action}(): norm: {options['norm']!r} is not one of {', '.join(NORM_MODES)}"
                         f"{did_you_mean(str(options['norm']), NORM_MODES)}")
    if "at" in options and options["at"] not in SIDES:
        raise ValueError(f"{action}(): at: {options['at']!r} is not one of {', '.join(SIDES)}"
                         f"{did_you_mean(str(options['at']), SIDES)}")
    return Rule(action, sels, **options)


def freeze(*selectors: Selector | str, norm: str = "eval", strict: bool = True) -> Rule:
    """Freeze what is selected: ``requires_grad_(False)`` and ``.grad = None``.

    Args:
        *selectors: patterns (``"layer4*"``, ``"re:..."``) or selectors.
        norm: what happens to the norm layers among the selected modules:
            ``"eval"`` keeps those with running statistics in eval mode (statistics never change);
            ``"frozen_bn"`` replaces BatchNorms by :class:`~freezekit.norm.FrozenBatchNorm`;
            ``"train"`` leaves them to the model's mode (statistics keep updating);
            ``"trainable"`` keeps their affine parameters trainable and lets them follow the model.
        strict: raise :class:`~freezekit.NoMatchError` if a selector matches nothing.
    """
    return _make("freeze", selectors, norm=norm, strict=strict)


def unfreeze(*selectors: Selector | str, strict: bool = True) -> Rule:
    """Make what is selected trainable again, release eval locks and undo frozen-BatchNorm swaps."""
    return _make("unfreeze", selectors, strict=strict)


def detach(*selectors: Selector | str, at: str = "output", no_grad: bool = True, strict: bool = True) -> Rule:
    """Put a gradient boundary at the output (or inputs) of the outermost selected modules.

    With ``at="output"`` nothing downstream sends gradient into the module; with ``no_grad`` it also
    runs under ``torch.no_grad()`` and stores no activations. ``at="input"`` cuts what flows back
    out of the module, and leaves its own parameters trainable. ``requires_grad`` is not changed.
    """
    return _make("detach", selectors, at=at, no_grad=no_grad, strict=strict)


def eval_mode(*selectors: Selector | str, strict: bool = True) -> Rule:
    """Keep the selected modules in eval mode whatever ``model.train()`` says (dropout off,
    norm statistics fixed)."""
    return _make("eval_mode", selectors, strict=strict)
