"""BYOL's search space: the target network's EMA base rate and the predictor's width.

The EMA rate lives near 1 (0.99-0.9999 are all common), so it is sampled as
``one_minus_ema_rate`` on a log scale and converted: ``base_ema_rate = 1 - one_minus_ema_rate``.
The Optuna study records ``one_minus_ema_rate`` (the sampled helper); the trainer gets
``base_ema_rate``. A fast-moving target (rate 0.9) and a narrow predictor push towards collapse.
"""

from __future__ import annotations

from study_spaces import suggest_optimizer

METHOD = "byol"
FIXED: dict = {"use_predictor": True}
HELPER_PARAMS = ("one_minus_ema_rate",)

ONE_MINUS_EMA_RATE_RANGE = (1e-4, 0.1)  # base rate 0.9 .. 0.9999
PREDICTOR_WIDTH_RANGE = (16, 1024)


def space(trial) -> dict:
    """1 - EMA base rate (log scale, 1e-4-0.1), predictor hidden width (log scale, 16-1024), optimiser."""
    one_minus_ema_rate = trial.suggest_float("one_minus_ema_rate", *ONE_MINUS_EMA_RATE_RANGE, log=True)
    trial.suggest_int("predictor_hidden_dim", *PREDICTOR_WIDTH_RANGE, log=True)
    suggest_optimizer(trial)
    return {"base_ema_rate": 1.0 - one_minus_ema_rate}
