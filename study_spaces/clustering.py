"""The clustering (DINO-like) method's search space.

- ``num_prototypes`` K: log scale, 16-8192. Small K under-clusters; large K with a short run
  leaves most prototypes unused (partial prototype collapse).
- ``student_temperature``: log scale, 0.03-0.5.
- ``teacher_temperature``: log scale, 0.01-0.2; DINO's authors found values above ~0.07 unstable,
  and a teacher much softer than its student drives collapse (0.2 against a student at 0.03, the rest at
  the defaults but no warm-up: dimensional collapse from epoch 2 of a default trial, embedding RankMe under
  a tenth of 256, while the teacher still uses 839-911 effective prototypes (seed 0); at 1.0, past the range, uniform
  assignments, tests/test_collapse_runs.py). The warm-up starts at
  ``min(0.02, teacher_temperature)`` (the constant ``TEACHER_TEMPERATURE_START``, which ``space()``
  returns as ``teacher_temperature_start``; never above the target).
- ``teacher_warmup_epochs``: 0-3 trainer epochs (the search's default run is 6 epochs).
- ``center_momentum``: sampled as ``one_minus_center_momentum`` on a log scale (1e-3-0.5, i.e.
  momentum 0.5-0.999); a centre that barely moves cannot stop one prototype from winning.
- ``base_ema_rate`` of the teacher: sampled as ``one_minus_ema_rate`` on a log scale (1e-4-0.1).

Helpers (``one_minus_*``) are recorded by Optuna and converted here; the trainer gets the Config
field names.
"""

from __future__ import annotations

from study_spaces import suggest_optimizer

METHOD = "clustering"
FIXED: dict = {"use_centering": True}
HELPER_PARAMS = ("one_minus_center_momentum", "one_minus_ema_rate")

TEACHER_TEMPERATURE_START = 0.02
PROTOTYPES_RANGE = (16, 8192)
STUDENT_TEMPERATURE_RANGE = (0.03, 0.5)
TEACHER_TEMPERATURE_RANGE = (0.01, 0.2)
WARMUP_EPOCHS_RANGE = (0.0, 3.0)
ONE_MINUS_CENTER_MOMENTUM_RANGE = (1e-3, 0.5)
ONE_MINUS_EMA_RATE_RANGE = (1e-4, 0.1)


def space(trial) -> dict:
    """K, student and teacher temperatures, teacher warm-up, centre momentum, teacher EMA rate, optimiser."""
    trial.suggest_int("num_prototypes", *PROTOTYPES_RANGE, log=True)
    trial.suggest_float("student_temperature", *STUDENT_TEMPERATURE_RANGE, log=True)
    teacher_temperature = trial.suggest_float("teacher_temperature", *TEACHER_TEMPERATURE_RANGE, log=True)
    trial.suggest_float("teacher_warmup_epochs", *WARMUP_EPOCHS_RANGE)
    one_minus_center_momentum = trial.suggest_float(
        "one_minus_center_momentum", *ONE_MINUS_CENTER_MOMENTUM_RANGE, log=True
    )
    one_minus_ema_rate = trial.suggest_float("one_minus_ema_rate", *ONE_MINUS_EMA_RATE_RANGE, log=True)
    suggest_optimizer(trial)
    return {
        "teacher_temperature_start": min(TEACHER_TEMPERATURE_START, teacher_temperature),
        "center_momentum": 1.0 - one_minus_center_momentum,
        "base_ema_rate": 1.0 - one_minus_ema_rate,
    }
