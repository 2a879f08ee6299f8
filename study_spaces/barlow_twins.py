"""Barlow Twins' search space: lambda, the weight of the redundancy-reduction term (log scale).

The original's 0.0051 suits 8192-d projections (about 1/D); the range spans four decades around
the 1/D of the CPU preset's 1024-d projections, from almost no decorrelation to a term that
swamps the invariance one.
"""

from __future__ import annotations

from study_spaces import suggest_optimizer

METHOD = "barlow_twins"
FIXED: dict = {}

LAMBDA_RANGE = (1e-4, 1.0)


def space(trial) -> None:
    """lambd (log scale, 1e-4-1), learning rate, weight decay."""
    trial.suggest_float("lambd", *LAMBDA_RANGE, log=True)
    suggest_optimizer(trial)
    return None
