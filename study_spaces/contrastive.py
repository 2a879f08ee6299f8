"""Contrastive (SimCLR / NT-Xent) search space: the temperature and the batch size.

The batch size matters here (it is the number of negatives), so it is searched (as for Barlow
Twins, whose cross-correlation is estimated from the batch); the other methods keep the search's
batch size. Very low temperatures make the loss spiky and training unstable;
high ones wash out the negatives and the embedding spreads less.
"""

from __future__ import annotations

from study_spaces import suggest_optimizer

METHOD = "contrastive"
FIXED: dict = {}

TEMPERATURE_RANGE = (0.01, 1.0)
BATCH_SIZES = (32, 64, 128)


def space(trial) -> None:
    """Temperature (log scale, 0.01-1), batch size (32, 64, 128), learning rate, weight decay."""
    trial.suggest_float("temperature", *TEMPERATURE_RANGE, log=True)
    trial.suggest_categorical("batch_size", BATCH_SIZES)
    suggest_optimizer(trial)
    return None
