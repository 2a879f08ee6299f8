"""Collapse-aware early stopping: stop a trial whose collapse verdict persists after a grace period.

The rule, evaluated on the collapse metrics the trainer logs at every epoch end:

- a verdict of ``"diverged"`` (NaN/inf in the loss or the metrics) stops the trial at once: it
  does not recover, and every later number would be NaN;
- verdicts of the first ``grace_epochs`` epochs are not acted on. A freshly initialised backbone in
  eval mode (BatchNorm running statistics still near their initial values) maps every input to
  nearly the same vector, so the verdict can read "complete" or "dimensional" during the first
  steps of a run that is perfectly healthy;
- after the grace period, a trial whose verdict has been one of the collapse types the rule stops on
  (``stop_on``: by default "complete" and "cluster") for ``patience_epochs`` consecutive epochs is
  stopped as collapsed.

"dimensional" is diagnosed and recorded (the trial's ``verdict`` in ``trials.csv``) but does not stop
a trial by default: in the default 64-trial VICReg search without stopping, the trials whose
embedding used under a tenth of its dimensions had the same median probe score as the others, and
the rule would have stopped the best of the 64 (benchmarks/README.md, "Search"). ``stop_on`` with
"dimensional" (``--stop-on complete,cluster,dimensional``) restores it.

The collapse "began" at the first epoch of the uninterrupted run of collapsed verdicts that led to
the stop (which may lie inside the grace period); ``collapse_step`` is the optimiser step at the
end of that epoch, where it was first seen. The verdict is recomputed here from the logged
metrics with the rule's own :class:`~musicssl.collapse.CollapseThresholds`, so a search can move
the lines without touching the trainer.

The rule runs inside the trial (an epoch-end hook sets ``trainer.should_stop``), not as a Tune
Stopper in the driver: the trial then ends normally, skips its probe, and reports its own
outcome, which is deterministic and costs no Ray round trip. With stopping disabled the same
monitor still records when it *would* have stopped, for comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from hpsearch.settings import COLLAPSE_TYPES, DEFAULT_STOP_ON
from musicssl.collapse import CollapseThresholds, collapse_diagnosis

__all__ = ["CollapseStopRule", "CollapseMonitor", "COLLAPSE_TYPES", "DEFAULT_STOP_ON", "verdict_from_record"]

_COLLAPSE_PREFIX = "collapse_"


@dataclass(frozen=True)
class CollapseStopRule:
    """When to stop: ``patience_epochs`` verdicts in a row of a type in ``stop_on`` after
    ``grace_epochs`` epochs (a "diverged" verdict always stops at once)."""

    grace_epochs: int = 1
    patience_epochs: int = 2
    thresholds: CollapseThresholds = field(default_factory=CollapseThresholds)
    stop_on: tuple[str, ...] = DEFAULT_STOP_ON

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_on", tuple(self.stop_on))
        unknown = [kind for kind in self.stop_on if kind not in COLLAPSE_TYPES]
        if unknown or not self.stop_on:
            raise ValueError(
                f"stop_on must name one or more of {', '.join(COLLAPSE_TYPES)}, got {', '.join(self.stop_on) or 'none'}"
            )
        if self.grace_epochs < 0:
            raise ValueError(f"grace_epochs must be >= 0, got {self.grace_epochs}")
        if self.patience_epochs < 1:
            raise ValueError(f"patience_epochs must be >= 1, got {self.patience_epochs}")


def verdict_from_record(record: Mapping[str, object], thresholds: CollapseThresholds) -> tuple[str, list[str]]:
    """The collapse verdict and its reasons for one epoch record of the trainer.

    The record holds the collapse metrics as ``collapse_<name>`` and the epoch's mean loss as
    ``train_loss``; the verdict is :func:`musicssl.collapse.collapse_diagnosis` of those.
    """
    metrics = {
        key[len(_COLLAPSE_PREFIX):]: value
        for key, value in record.items()
        if key.startswith(_COLLAPSE_PREFIX) and isinstance(value, (int, float))
    }
    loss = record.get("train_loss")
    if isinstance(loss, (int, float)):
        metrics["loss"] = float(loss)
    if not set(metrics) - {"loss", "nonfinite"}:
        # No collapse metrics (no probe set): only a non-finite loss says anything.
        return ("diverged", [f"train_loss is {loss}"]) if isinstance(loss, float) and not math.isfinite(loss) else ("none", [])
    return collapse_diagnosis(metrics, thresholds)


@dataclass
class CollapseMonitor:
    """Applies a :class:`CollapseStopRule` to a trial's epoch records, one :meth:`update` per epoch."""

    rule: CollapseStopRule = field(default_factory=CollapseStopRule)
    verdicts: list[str] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    # Set when the rule fires (and kept: later epochs of an unstopped trial do not move it).
    stop_epoch: int | None = None
    collapse_type: str | None = None
    collapse_epoch: int | None = None
    collapse_step: int | None = None
    stop_reasons: list[str] = field(default_factory=list)

    @property
    def fired(self) -> bool:
        """Whether the rule has decided (the trial should stop, or would have)."""
        return self.stop_epoch is not None

    def update(self, epoch: int, step: int, record: Mapping[str, object]) -> str:
        """Judge epoch ``epoch`` (1-based; ``step`` optimiser steps done) and return its verdict."""
        verdict, reasons = verdict_from_record(record, self.rule.thresholds)
        self.verdicts.append(verdict)
        self.reasons.append(reasons)
        self.steps.append(int(step))
        if self.fired:
            return verdict
        if verdict == "diverged":
            self._fire(epoch, verdict, reasons, first_index=len(self.verdicts) - 1)
            return verdict
        stop_on = self.rule.stop_on
        if verdict not in stop_on:
            return verdict
        # The uninterrupted run of stopping verdicts that ends at this epoch.
        first_index = len(self.verdicts) - 1
        while first_index > 0 and self.verdicts[first_index - 1] in stop_on:
            first_index -= 1
        first_epoch = epoch - (len(self.verdicts) - 1 - first_index)
        counted = epoch - max(first_epoch, self.rule.grace_epochs + 1) + 1
        if counted >= self.rule.patience_epochs:
            self._fire(epoch, verdict, reasons, first_index)
        return verdict

    def _fire(self, epoch: int, verdict: str, reasons: list[str], first_index: int) -> None:
        self.stop_epoch = int(epoch)
        self.collapse_type = verdict
        self.collapse_epoch = int(epoch) - (len(self.verdicts) - 1 - first_index)
        # Where the collapsed run was first seen: the optimiser step at the end of its first epoch.
        self.collapse_step = self.steps[first_index]
        self.stop_reasons = list(reasons)
