"""Barlow Twins' search space: lambda, the weight of the redundancy-reduction term (log scale), and
the batch size.

The original's 0.0051 was tuned for its 8192-d projections (about 42/D there); the range spans four
decades, from one below 1/D for the CPU preset's 1024-d projections (about 1e-3) to three above it:
from almost no decorrelation to a term that swamps the invariance one. The batch size is searched because it
matters here: the loss estimates a 1,024 x 1,024 cross-correlation from the batch, and on the
corpus Barlow Twins at batch 64 was level with a random backbone whatever its lambda, at batch 128
clearly above it (README, "Results on the embedded corpus"); the CPU preset trains it at 128.
"""

from __future__ import annotations

from study_spaces import suggest_optimizer

METHOD = "barlow_twins"
FIXED: dict = {}

LAMBDA_RANGE = (1e-4, 1.0)
BATCH_SIZES = (32, 64, 128)


def space(trial) -> None:
    """lambd (log scale, 1e-4-1), batch size (32, 64, 128), learning rate, weight decay."""
    trial.suggest_float("lambd", *LAMBDA_RANGE, log=True)
    trial.suggest_categorical("batch_size", BATCH_SIZES)
    suggest_optimizer(trial)
    return None
