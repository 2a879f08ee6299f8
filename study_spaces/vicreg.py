"""VICReg's search space: the three loss weights, each on a log scale over three decades.

The ranges hold both healthy settings (the original 25/25/1) and collapsing ones: with the
variance weight far below the invariance weight the embedding loses dimensions (dimensional
collapse), and with both regularisers tiny it collapses to a point.
"""

from __future__ import annotations

from study_spaces import suggest_optimizer

METHOD = "vicreg"
FIXED: dict = {}

WEIGHT_RANGE = (0.1, 100.0)


def space(trial) -> None:
    """Invariance, variance and covariance weights (log scale, 0.1-100), learning rate, weight decay."""
    trial.suggest_float("inv_weight", *WEIGHT_RANGE, log=True)
    trial.suggest_float("var_weight", *WEIGHT_RANGE, log=True)
    trial.suggest_float("cov_weight", *WEIGHT_RANGE, log=True)
    suggest_optimizer(trial)
    return None
