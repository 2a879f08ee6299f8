"""Search spaces: one module per pretext method, discovered by name.

A module ``study_spaces/<method>.py`` holds

- ``METHOD``: the pretext method's registry name (``musicssl.pretext.registry``);
- ``space(trial) -> dict | None``: an Optuna define-by-run space. It must be a named module-level
  function (Ray Tune pickles the searcher, and with it the space, at every experiment checkpoint;
  a lambda or closure fails there). Each ``trial.suggest_*`` name is a field of the method's
  Config dataclass or one of the training settings in :data:`TRAINING_PARAMS`, so a trial's
  parameters map 1:1 onto the trainer's settings. A parameter sampled on another scale (e.g.
  ``one_minus_ema_rate`` on a log scale) is named in ``HELPER_PARAMS`` and converted in the
  returned dict (``{"base_ema_rate": 1 - one_minus_ema_rate}``); helpers never reach the trainer.
- ``FIXED: dict``: settings the search holds fixed for this method (method Config fields or
  training settings); a sampled name may not also be fixed.
- optionally ``HELPER_PARAMS: tuple[str, ...]`` (default empty).

Adding a method's space is writing its module; :func:`available_spaces` finds it (like
``musicssl.pretext.registry`` finds methods).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = [
    "StudySpace",
    "UnknownSpaceError",
    "SpaceError",
    "TRAINING_PARAMS",
    "available_spaces",
    "get_space",
    "suggest_optimizer",
]

# Training settings (fields of musicssl.train.TrainConfig) that a space may sample or fix.
TRAINING_PARAMS = frozenset({"learning_rate", "weight_decay", "batch_size", "warmup_epochs", "gradient_clip"})

# Shared ranges for the optimiser, wide enough to reach both under-training and divergence.
LEARNING_RATE_RANGE = (1e-4, 1e-2)
WEIGHT_DECAY_RANGE = (1e-6, 1e-1)


class UnknownSpaceError(KeyError):
    """No ``study_spaces/<name>.py`` module exists; the message lists the ones that do."""

    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0])


class SpaceError(ValueError):
    """A space module is malformed, or a trial's parameters do not map onto the trainer's settings."""


def suggest_optimizer(trial: Any) -> None:
    """Sample the AdamW settings every space shares: ``learning_rate`` and ``weight_decay`` (log scale)."""
    trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True)
    trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True)


@dataclass(frozen=True)
class StudySpace:
    """A method's search space and fixed settings, as loaded from its module."""

    method: str
    space: Callable[[Any], dict[str, Any] | None]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    helper_params: frozenset[str] = frozenset()
    module: str = ""

    def method_fields(self) -> set[str]:
        """The names of the method's Config fields."""
        from musicssl.pretext.registry import get_method

        return {f.name for f in dataclasses.fields(get_method(self.method).Config)}

    def split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(training settings, method settings)`` of a trial: ``FIXED`` and ``params`` together.

        ``params`` is what the searcher hands the trial (every sampled value plus the space's
        returned dict). Helper parameters are dropped; a name in both ``params`` and ``FIXED``, and
        any other name that is neither a training setting nor a method Config field, raise
        :class:`SpaceError`.
        """
        both = sorted(set(params) & set(self.fixed))
        if both:
            raise SpaceError(
                f"{self.module}: {both} are sampled (or returned by space) and also in FIXED, whose value the "
                "sample would silently replace; a setting is either searched or held fixed: remove it from one"
            )
        method_fields = self.method_fields()
        training: dict[str, Any] = {}
        method: dict[str, Any] = {}
        unknown = []
        for name, value in {**self.fixed, **params}.items():
            if name in self.helper_params:
                continue
            if name in TRAINING_PARAMS:
                training[name] = value
            elif name in method_fields:
                method[name] = value
            else:
                unknown.append(name)
        if unknown:
            raise SpaceError(
                f"{self.module}: parameter(s) {sorted(unknown)} are neither {self.method} settings "
                f"({', '.join(sorted(method_fields))}) nor training settings ({', '.join(sorted(TRAINING_PARAMS))}); "
                "rename them, or list sampling helpers in HELPER_PARAMS"
            )
        return training, method

    def sample(self, trial: Any) -> dict[str, Any]:
        """Run the space on ``trial`` and return every parameter it produced (sampled and returned)."""
        returned = self.space(trial)
        if returned is not None and not isinstance(returned, dict):
            raise SpaceError(f"{self.module}.space must return a dict or None, got {type(returned).__name__}")
        return {**trial.params, **(returned or {})}


def _space_modules() -> dict[str, str]:
    import study_spaces as package

    return {
        module.name: f"study_spaces.{module.name}"
        for module in pkgutil.iter_modules(package.__path__)
        if not module.name.startswith("_")
    }


def available_spaces() -> list[str]:
    """Names of the methods that have a search space module."""
    return sorted(_space_modules())


def _load(module: ModuleType, name: str) -> StudySpace:
    method = getattr(module, "METHOD", None)
    space = getattr(module, "space", None)
    fixed = getattr(module, "FIXED", {})
    helpers = getattr(module, "HELPER_PARAMS", ())
    problems = []
    if method != name:
        problems.append(f"METHOD must be {name!r} (the module's name), got {method!r}")
    if not callable(space) or getattr(space, "__name__", "") == "<lambda>":
        problems.append("space must be a named module-level function space(trial) -> dict | None")
    if not isinstance(fixed, Mapping):
        problems.append(f"FIXED must be a dict, got {type(fixed).__name__}")
    if problems:
        raise SpaceError(f"{module.__name__}: " + "; ".join(problems))
    return StudySpace(
        method=name, space=space, fixed=dict(fixed), helper_params=frozenset(helpers), module=module.__name__
    )


def get_space(method: str) -> StudySpace:
    """The search space of ``method`` (raises :class:`UnknownSpaceError` listing the available ones)."""
    modules = _space_modules()
    if method not in modules:
        raise UnknownSpaceError(
            f"no search space for method {method!r}; available: {', '.join(sorted(modules))} "
            f"(add study_spaces/{method}.py to search a new method)"
        )
    return _load(importlib.import_module(modules[method]), method)
