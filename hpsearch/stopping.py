"""Collapse-aware early stopping: stop a trial whose collapse verdict persists after a grace period.

The rule, evaluated on the collapse metrics the trainer logs at every epoch end:

- a verdict of ``"diverged"`` (NaN/inf in the loss or the metrics) stops the trial at once: it
  does not recover, and every later number would be NaN;
- verdicts of the first ``grace_epochs`` epochs are not acted on. A freshly initialised backbone in
  eval mode (BatchNorm running statistics still near their initial values) maps every input to
  nearly the same vector, so the verdict can read "complete" or "dimensional" during the first
  steps of a run that is perfectly healthy;
- after the grace period, a trial that has shown one of the collapse types the rule stops on
  (``stop_on``: by default "complete" and "cluster") for ``patience_epochs`` consecutive epochs is
  stopped as collapsed. "Shown" means that the type's rules fire
  (:func:`musicssl.collapse.collapse_findings`), whether or not it is the epoch's verdict, which
  names only the first kind in order of precedence: ``stop_on=("dimensional",)`` stops a trial whose
  embedding is dimensionally collapsed also while its prototypes read "partial".

"dimensional" and "partial" are diagnosed and recorded (the trial's ``verdict`` in ``trials.csv``)
but do not stop a trial by default. In the default 64-trial VICReg search without stopping, the
trials whose embedding used under a tenth of its dimensions had the same median probe score as the
others, and the rule would have stopped the best of the 64 (benchmarks/README.md, "Search"). On
36-epoch clustering trials, the trials whose probe batch used under a tenth of the attainable
prototypes ("partial") scored like the others, and the rule of before 2026-12-02, which counted them
as "cluster", stopped the best of the 64
(benchmarks/README.md, "Six times longer: 36 epochs"). ``stop_on`` with them
(``--stop-on complete,cluster,partial,dimensional``) restores them.

The collapse "began" at the first epoch of the uninterrupted run of epochs showing a type in
``stop_on`` (not necessarily the same type every epoch; the stop is named by the last) that led to
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

from hpsearch.settings import COLLAPSE_TYPES, COLLAPSE_TYPES_VERSION, DEFAULT_STOP_ON, collapse_types
from musicssl.collapse import VERDICT_VERSIONS, CollapseThresholds, collapse_findings, first_finding

__all__ = ["CollapseStopRule", "CollapseMonitor", "COLLAPSE_TYPES", "DEFAULT_STOP_ON", "findings_from_record",
           "verdict_from_record"]

_COLLAPSE_PREFIX = "collapse_"


@dataclass(frozen=True)
class CollapseStopRule:
    """When to stop: ``patience_epochs`` epochs in a row showing a type in ``stop_on`` after
    ``grace_epochs`` epochs (a "diverged" verdict always stops at once)."""

    grace_epochs: int = 1
    patience_epochs: int = 2
    thresholds: CollapseThresholds = field(default_factory=CollapseThresholds)
    stop_on: tuple[str, ...] = DEFAULT_STOP_ON
    # The verdict's version (musicssl.collapse.VERDICT_VERSIONS), kept when a search resumes. Version
    # 1 is acted on only when the verdict names a type in stop_on.
    collapse_types_version: int = COLLAPSE_TYPES_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_on", tuple(self.stop_on))
        if self.collapse_types_version not in VERDICT_VERSIONS:
            raise ValueError(
                f"collapse_types_version must be one of {VERDICT_VERSIONS}, got {self.collapse_types_version!r}"
            )
        types = collapse_types(self.collapse_types_version)
        unknown = [kind for kind in self.stop_on if kind not in types]
        if unknown or not self.stop_on:
            raise ValueError(
                f"stop_on must name one or more of {', '.join(types)}, got {', '.join(self.stop_on) or 'none'}"
            )
        if self.grace_epochs < 0:
            raise ValueError(f"grace_epochs must be >= 0, got {self.grace_epochs}")
        if self.patience_epochs < 1:
            raise ValueError(f"patience_epochs must be >= 1, got {self.patience_epochs}")


def findings_from_record(
    record: Mapping[str, object], thresholds: CollapseThresholds, version: int = COLLAPSE_TYPES_VERSION
) -> dict[str, list[str]]:
    """Every kind of collapse whose rules fire on one epoch record of the trainer, with the reasons,
    in order of precedence (the first is the verdict); empty for none.

    The record holds the collapse metrics as ``collapse_<name>`` and the epoch's mean loss as
    ``train_loss``; the findings are :func:`musicssl.collapse.collapse_findings` of those (of the
    verdict's ``version``).
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
        return {"diverged": [f"train_loss is {loss}"]} if isinstance(loss, float) and not math.isfinite(loss) else {}
    return collapse_findings(metrics, thresholds, version)


def verdict_from_record(
    record: Mapping[str, object], thresholds: CollapseThresholds, version: int = COLLAPSE_TYPES_VERSION
) -> tuple[str, list[str]]:
    """The collapse verdict (the first of :func:`findings_from_record`, or "none") and its reasons."""
    return first_finding(findings_from_record(record, thresholds, version))


@dataclass
class CollapseMonitor:
    """Applies a :class:`CollapseStopRule` to a trial's epoch records, one :meth:`update` per epoch."""

    rule: CollapseStopRule = field(default_factory=CollapseStopRule)
    verdicts: list[str] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)
    # Per epoch, whether it showed a type the rule stops on (collapse_findings, not only the verdict).
    stopping: list[bool] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    # Set when the rule fires (and kept: later epochs of an unstopped trial do not move it, except a
    # divergence, which replaces an earlier collapse).
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
        version = self.rule.collapse_types_version
        findings = findings_from_record(record, self.rule.thresholds, version)
        verdict, reasons = first_finding(findings)
        # The first kind the rule stops on, in order of precedence (version 1: the verdict only).
        kinds = list(findings)[:1] if version == 1 else findings
        kind = next((kind for kind in kinds if kind in self.rule.stop_on), None)
        self.verdicts.append(verdict)
        self.reasons.append(reasons)
        self.stopping.append(kind is not None)
        self.steps.append(int(step))
        if self.fired:
            if verdict == "diverged" and self.collapse_type != "diverged":
                # A trial the rule let run on (stopping off) that diverges later: a divergence ends a
                # trial whatever the rule's setting, and is dated and explained by its own epoch.
                self._fire(epoch, verdict, reasons, first_index=len(self.verdicts) - 1)
            return verdict
        if verdict == "diverged":
            self._fire(epoch, verdict, reasons, first_index=len(self.verdicts) - 1)
            return verdict
        if kind is None:
            return verdict
        # The uninterrupted run of epochs showing a type the rule stops on, ending at this epoch.
        first_index = len(self.verdicts) - 1
        while first_index > 0 and self.stopping[first_index - 1]:
            first_index -= 1
        first_epoch = epoch - (len(self.verdicts) - 1 - first_index)
        counted = epoch - max(first_epoch, self.rule.grace_epochs + 1) + 1
        if counted >= self.rule.patience_epochs:
            self._fire(epoch, kind, findings[kind], first_index)
        return verdict

    def _fire(self, epoch: int, verdict: str, reasons: list[str], first_index: int) -> None:
        self.stop_epoch = int(epoch)
        self.collapse_type = verdict
        self.collapse_epoch = int(epoch) - (len(self.verdicts) - 1 - first_index)
        # Where the collapsed run was first seen: the optimiser step at the end of its first epoch.
        self.collapse_step = self.steps[first_index]
        self.stop_reasons = list(reasons)
