"""Hyperparameter search with Ray Tune and Optuna around the shared trainer, with collapse-aware stopping.

Entry point: ``python -m hpsearch.run METHOD --trials N`` (see :mod:`hpsearch.run`). Modules:

- :mod:`hpsearch.settings`: :class:`SearchSettings` (one search) and :class:`TrialSettings`;
- :mod:`hpsearch.trainable`: :func:`run_trial`, the Ray Tune trainable around ``musicssl.train.train``;
- :mod:`hpsearch.stopping`: the collapse stopping rule (:class:`CollapseStopRule`, :class:`CollapseMonitor`);
- :mod:`hpsearch.searcher`: :class:`CollapseAwareOptunaSearch`, OptunaSearch that records collapsed and
  diverged trials as PRUNED and infeasible;
- :mod:`hpsearch.results`: ``trials.csv``, the best checkpoint and the summary;
- :mod:`hpsearch.progress`: one console line per finished trial.

Importing this package does not import Ray.
"""

from hpsearch.settings import OBJECTIVES, SCHEDULERS, SearchSettings, SettingsError, TrialSettings

__all__ = ["OBJECTIVES", "SCHEDULERS", "SearchSettings", "SettingsError", "TrialSettings"]
