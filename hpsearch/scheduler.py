"""ASHA that a resumed search continues instead of starting over.

Ray Tune saves no scheduler state with its experiment: a restored search gets the scheduler as it was
pickled when the search started, its rungs empty. Its first trials after a resume were then judged
against each other alone, and a trial that the whole search's rung would have kept could be stopped (or
one it would have stopped kept). :class:`ResumableASHA` fills its rungs, before it judges the first trial
of a run, from the trials the search's Optuna journal holds as finished: their objective at each rung's
epoch is what ASHA recorded for them when they ran (the searcher reports each epoch's finite objective to
Optuna at step = epoch; ASHA reads the same report, by its ``scheduler_epoch``).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

__all__ = ["ResumableASHA"]


class ResumableASHA(AsyncHyperBandScheduler):
    """:class:`ray.tune.schedulers.ASHAScheduler` (the same arguments) whose rungs start, in a resumed
    search, with the finished trials' values (see the module's docstring). The journal is the one
    :func:`hpsearch.searcher.journal_of_this_search` names while the search runs; without one (a new
    search, or the scheduler used outside hpsearch.run) the rungs start empty, as ASHA's do."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._fill_rungs_from_the_journal()
        super().on_trial_add(tune_controller, trial)

    def _fill_rungs_from_the_journal(self) -> None:
        if self.__dict__.get("_rungs_filled"):
            return
        self._rungs_filled = True
        from hpsearch.results import STUDY_NAME, load_study
        from hpsearch.searcher import search_journal

        journal = search_journal(None)
        if journal is None:
            return
        try:
            study = load_study(journal, STUDY_NAME)
        except (OSError, ValueError, KeyError):  # no study yet: a new search
            return
        for trial in study.get_trials(deepcopy=False):
            if not trial.state.is_finished():
                continue  # a trial interrupted mid-way runs again, and reports its epochs again
            # The report of the epoch the collapse rule stopped the trial on carries no scheduler_epoch: ASHA
            # never read it (nor the last epoch's, beyond every rung ASHA judges: milestones < max_t).
            stopped_at = trial.user_attrs.get("stop_epoch") if trial.user_attrs.get("outcome") in (
                "collapsed", "diverged") else None
            for bracket in self._brackets:
                for milestone, recorded in bracket._rungs:
                    epoch = math.ceil(milestone)  # ASHA records the first report at or past the milestone
                    value = trial.intermediate_values.get(epoch)
                    if value is None or epoch >= self._max_t or epoch == stopped_at:
                        continue
                    recorded.setdefault(f"finished-trial-{trial.number}", self._metric_op * value)
