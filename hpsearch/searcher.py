"""OptunaSearch that tells Optuna what really happened to each trial.

Ray Tune's :class:`~ray.tune.search.optuna.OptunaSearch` tells every trial that ends without an
error as COMPLETE with its last reported value (a collapsed run with a flattering score included),
and a NaN value makes the tell fail, leaving the Optuna trial RUNNING forever. This subclass reads
the trial's own verdict (the ``outcome`` of its final report, see :mod:`hpsearch.trainable`):

============  =========  ==========  ==================================================
outcome       state      constraint  value
============  =========  ==========  ==================================================
complete      COMPLETE   0           the final objective
collapsed     PRUNED     1           none (Optuna keeps the last intermediate value)
diverged      PRUNED     1           none
stopped       PRUNED     0           none (ended by a scheduler, e.g. ASHA, or a Stopper)
failed        FAIL       -           none (an exception; Optuna's samplers ignore FAIL)
============  =========  ==========  ==================================================

A positive constraint (``Trial.set_constraint("collapse", 1.0)``, Optuna >= 5) makes the trial
infeasible: TPE ranks infeasible trials below every feasible one, so it learns to leave collapsing
and diverging regions (a random sampler, ``sampler_kind="random"``, learns nothing and ignores it).
Every trial gets user attributes: the outcome, the collapse type, the epoch and step where the
collapse began, the last metrics, epochs run, seconds, the error of a failed trial, and the trial's
full parameter set (``config``, with derived values such as ``base_ema_rate``).

Intermediate values: each epoch's objective is reported to Optuna at step = epoch, when finite
(the probe objectives are NaN between probes).

Resume: the searcher state (this object, pickled) is saved with Tune's experiment state. A trial
asked from Optuna after the last save is unknown to the restored searcher but RUNNING in the
study; :meth:`restore` collects those and :meth:`suggest` hands them out again first, so no
Optuna trial is orphaned and the study's trial count stays equal to Tune's.

A full disk: what the study cannot be told (its journal cannot be written) is kept, in order, and
written at the searcher's next call, when Tune saves the searcher's state, or by the resumed search
(:meth:`_write_unwritten`): a trial that ends while the disk is full is recorded as it ended, not as
failed. The search is stopped meanwhile, as its watch of the disks stops it
(:func:`hpsearch.progress.record_not_written`).

This touches OptunaSearch's private attributes (``_ot_trials``, ``_ot_study``,
``_completed_trials``, ``_metric``); it is written against ray 2.60.0 and optuna 5.0.0, tested in
tests/test_hpsearch.py with those and with optuna 5.1.0 (pinned in constraints.txt).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from hpsearch.results import NO_FINAL_REPORT
from hpsearch.settings import SAMPLERS
from hpsearch.trainable import FINAL_KEYS, NO_ROOM_FOR_CHECKPOINT

__all__ = [
    "CollapseAwareOptunaSearch",
    "CONSTRAINT_NAME",
    "TESTED_VERSIONS",
    "journal_of_this_search",
    "json_safe",
    "make_sampler",
    "search_journal",
    "user_attrs_from_record",
]

logger = logging.getLogger(__name__)

CONSTRAINT_NAME = "collapse"
# Each package's versions the test suite has passed with; the last is the one constraints.txt pins.
TESTED_VERSIONS = {"ray": ("2.60.0",), "optuna": ("5.0.0", "5.1.0")}
_INFEASIBLE_OUTCOMES = ("collapsed", "diverged")
# Final-record keys stored as user attributes.
_ATTR_KEYS = FINAL_KEYS
_LAST_METRIC_PREFIXES = ("train_", "collapse_")
_NOT_METRICS = ("collapse_stop", "collapse_verdict")

# A stop that ends the process at once (hpsearch.run, when a signal has stopped Ray too) waits until
# no method of the searcher is writing to the study: a trial is written in several journal entries
# (its attributes, then its state), each under Optuna's journal lock, and an exit between them would
# leave the trial half recorded and the lock behind.
_writing = 0
_after_writing: Callable[[], None] | None = None


def after_study_writes(callback: Callable[[], None]) -> bool:
    """Call ``callback`` now, or as soon as the searcher's method that is writing to the study (the
    one a signal handler interrupted) returns; returns whether it was deferred."""
    global _after_writing
    if _writing:
        _after_writing = callback
        return True
    callback()
    return False


def study_writes_done(timeout: float) -> bool:
    """Wait (from another thread than the searcher's) until no searcher method is writing to the study, at
    most ``timeout`` seconds; whether none is."""
    deadline = time.monotonic() + timeout
    while _writing:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _writes_the_study(method):
    @functools.wraps(method)
    def writing(*args, **kwargs):
        global _writing, _after_writing
        _writing += 1
        try:
            return method(*args, **kwargs)
        finally:
            _writing -= 1
            if not _writing and _after_writing is not None:
                callback, _after_writing = _after_writing, None
                callback()

    return writing


def _check_versions() -> None:
    found = {"ray": ray.__version__, "optuna": optuna.__version__}
    if any(version not in TESTED_VERSIONS[package] for package, version in found.items()):
        tested = ", ".join(f"{package} {' or '.join(versions)}" for package, versions in TESTED_VERSIONS.items())
        warnings.warn(
            f"hpsearch's searcher relies on private attributes of OptunaSearch and was tested with {tested}; "
            f"found ray {found['ray']}, optuna {found['optuna']}. Install with: pip install -c constraints.txt -e .",
            RuntimeWarning,
            stacklevel=4,  # the caller of CollapseAwareOptunaSearch(...), past __init__'s study-write wrapper
        )


_SEARCH_JOURNAL: str | None = None


@contextlib.contextmanager
def journal_of_this_search(journal: str | Path):
    """Within the block, a restored searcher (and the progress printer) use ``journal``, the journal of the
    search folder being resumed, whatever path they were pickled with (hpsearch.run wraps ``Tuner.fit``)."""
    global _SEARCH_JOURNAL
    previous, _SEARCH_JOURNAL = _SEARCH_JOURNAL, str(journal)
    try:
        yield
    finally:
        _SEARCH_JOURNAL = previous


def search_journal(pickled: str | None) -> str | None:
    """The journal of the search running in this process (see :func:`journal_of_this_search`), else ``pickled``."""
    return _SEARCH_JOURNAL or pickled


def make_sampler(kind: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The search's Optuna sampler: ``tpe`` (Optuna's defaults) or ``random`` (hpsearch.settings.SAMPLERS)."""
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r}; known: {', '.join(SAMPLERS)}")


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf as None and numpy scalars as Python ones (the journal is JSON, and
    optuna-dashboard's JSON parser rejects NaN)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def user_attrs_from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The user attributes of a trial from its final record (outcome, collapse, last metrics...)."""
    attrs = {key: json_safe(record.get(key)) for key in _ATTR_KEYS}
    attrs = {key: value for key, value in attrs.items() if value is not None}
    attrs["last_metrics"] = json_safe({
        k: v for k, v in record.items()
        if k.startswith(_LAST_METRIC_PREFIXES) and k not in _ATTR_KEYS and k not in _NOT_METRICS
        and isinstance(v, (int, float)) and not isinstance(v, bool)
    })
    return attrs


class CollapseAwareOptunaSearch(OptunaSearch):
    """:class:`OptunaSearch` that records collapsed and diverged trials as PRUNED and infeasible,
    failures as FAIL, and never leaves an Optuna trial RUNNING (see the module docstring).

    ``config_key`` names the entry added to every suggested config with the Optuna trial number
    (the trainable drops it; results and ``trials.csv`` use it to join Tune and Optuna).
    """

    @_writes_the_study
    def __init__(
        self,
        space,
        metric: str = "objective",
        mode: str = "max",
        *,
        sampler: optuna.samplers.BaseSampler | None = None,
        study_name: str = "search",
        storage: optuna.storages.BaseStorage | None = None,
        seed: int | None = None,
        sampler_kind: str = "tpe",
        points_to_evaluate: list[dict] | None = None,
        config_key: str = "optuna_trial",
        max_trials: int | None = None,
    ) -> None:
        _check_versions()
        if not callable(space):
            raise TypeError("space must be a define-by-run function space(trial) -> dict | None")
        # The kind and seed of our own sampler, to reseed it on a resume (seed None: a sampler was given).
        self.sampler_kind = sampler_kind
        self.sampler_seed = seed if sampler is None else None
        if sampler is None:
            sampler = make_sampler(sampler_kind, seed)
        super().__init__(
            space=space, metric=metric, mode=mode, points_to_evaluate=points_to_evaluate,
            sampler=sampler, study_name=study_name, storage=storage,
        )
        self.config_key = config_key
        self.max_trials = max_trials
        # Per Tune trial: the last epoch metrics seen, and the final record once it arrives.
        self._trial_records: dict[str, dict[str, Any]] = {}
        # Optuna trial numbers RUNNING in the study that no (restored) Tune trial owns.
        self._orphans: list[int] = []
        # What the study could not be told yet (its journal's disk was full), in order: ("report", trial_id,
        # epoch, value) and ("end", trial_id, state, value, attributes). Saved with the searcher's state.
        self._unwritten: list[tuple] = []
        self.adopt_running_trials()
        if any(t.state != TrialState.WAITING for t in self._ot_study.get_trials(deepcopy=False)):
            self._reseed_sampler()  # continuing a study this searcher did not save (see restore)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    # ------------------------------------------------------------------ suggestions
    @_writes_the_study
    def suggest(self, trial_id: str) -> dict | str | None:
        if not self._write_unwritten():
            return self._no_trial_now()
        if trial_id not in self._ot_trials:
            if self._orphans:
                number = self._orphans.pop(0)
                storage = self._ot_study._storage
                internal_id = storage.get_trial_id_from_study_id_trial_number(self._ot_study._study_id, number)
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, internal_id)
            elif self.max_trials is not None and self._asked_trials() >= self.max_trials:
                # The study holds every trial asked for, some perhaps from a run that stopped
                # before Tune saved its state: Tune's own count would overshoot.
                return Searcher.FINISHED
        try:
            config = super().suggest(trial_id)
            if config is None:
                return None
            ot_trial = self._ot_trials[trial_id]
            config[self.config_key] = ot_trial.number
            if "config" not in ot_trial._cached_frozen_trial.user_attrs:
                # Every value the trial trains with, derived ones (e.g. base_ema_rate) included.
                ot_trial.set_user_attr("config", json_safe({k: v for k, v in config.items() if k != self.config_key}))
        except OSError as error:
            # Asked, or given its parameters, in part: handed out again first (Optuna keeps the parameters drawn).
            ot_trial = self._ot_trials.pop(trial_id, None)
            if ot_trial is not None:
                self._orphans.insert(0, ot_trial.number)
            self._not_written(error, None)
            return self._no_trial_now()
        self._write_failed = False  # (nothing is kept: the loop above wrote it all)
        return config

    def _no_trial_now(self) -> str:
        """What to answer Tune's ask for a trial when the study cannot be written: finished, while the search is
        being stopped for it (none now would not do: with no trial running, Tune would wait for one, asking every
        second for up to 10 minutes, before the step of its run where the stop is made). A search continued asks
        again (hpsearch.run resets the finished flag Tune saves). Outside a search (no watch to stop it), the
        write's error, as Optuna raised it."""
        from hpsearch.progress import stopping_for_a_record_not_written

        if stopping_for_a_record_not_written():
            return Searcher.FINISHED
        raise self._write_error

    def _asked_trials(self) -> int:
        # Enqueued (WAITING) trials become the next asks, so they are not extra trials.
        return sum(t.state != TrialState.WAITING for t in self._ot_study.get_trials(deepcopy=False))

    # ------------------------------------------------------------------ results
    @_writes_the_study
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._write_unwritten()
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        record = self._trial_records.setdefault(trial_id, {})
        if result.get("final"):
            record["final"] = dict(result)
            if str(result.get("error", "")).startswith(NO_ROOM_FOR_CHECKPOINT) and not result.get("replayed"):
                # A trained trial whose checkpoint found no room that the search's watch of the disks cannot
                # see (a quota spent, a cluster node's disk), reported before it raises: stopped now (Tune
                # stops in this step, before it hears of the error), it is left unfinished and trains again
                # when the search is continued; the next trials would meet the same want of room. (A replayed
                # record is of a trial the study holds as ended already.)
                from hpsearch.progress import record_not_written

                record_not_written(f"trial #{self._number(trial_id)}: {result['error']}")
            return
        record["last"] = dict(result)
        self._report_intermediate(trial_id, result)

    def _report_intermediate(self, trial_id: str, result: Mapping[str, Any]) -> None:
        value, epoch = result.get(self._metric), result.get("epoch")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or epoch is None:
            return
        self._write(("report", trial_id, int(epoch), float(value)))

    @_writes_the_study
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            logger.warning("trial %s completed twice; the second completion is ignored", trial_id)
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        self._completed_trials.add(trial_id)
        record = self._trial_records.pop(trial_id, {})
        if result and not result.get("final"):
            # A result that made a scheduler stop the trial is not passed to on_trial_result.
            record["last"] = dict(result)
            if not error:
                self._report_intermediate(trial_id, result)
        final = record.get("final") or (dict(result) if result and result.get("final") else None)
        storage = self._ot_study._storage
        if storage.get_trial(ot_trial._trial_id).state.is_finished():
            return  # told before an interruption; this run only replayed its record
        state, value, attrs = self._decide(final, record.get("last"), error, trial_id)
        from hpsearch.progress import keep_trial_folder

        keep_trial_folder(trial_id)  # its epoch reports in the search's folder before the study holds it ended
        entry = ("end", trial_id, state, value, attrs)
        # Kept with the searcher's saved state: a journal that loses its last records (a crash of the machine
        # before they reached the disk, an older copy put back) is told them again on resume.
        self.__dict__.setdefault("_ends", {})[trial_id] = entry
        self._write(entry)
        if str(attrs.get("error", "")).startswith(NO_ROOM_FOR_CHECKPOINT):
            # Its checkpoint found no room and the search was not stopped on its report (see on_trial_result):
            # the next trials would fail the same way.
            from hpsearch.progress import record_not_written

            record_not_written(f"trial #{ot_trial.number} failed: {attrs['error']}")

    # ------------------------------------------------------------------ writes to the study
    def _write(self, entry: tuple) -> None:
        """Tell the study ``entry`` (after what it could not be told before), or keep it for later."""
        self.__dict__.setdefault("_unwritten", []).append(entry)  # (a searcher saved before it had them)
        self._write_unwritten()

    def _write_unwritten(self) -> bool:
        """Tell the study what it could not be told before, in order; whether all of it is told now.

        A write that fails for want of room (or any OSError: the journal's disk or folder) is kept, with all
        that follows it, and tried again at the searcher's next call and when its state is saved. The search
        is stopped at the next step of its run (:func:`hpsearch.progress.record_not_written`, the same stop
        as its watch of the disks: a quota spent is seen only here), and the state saved then holds what is
        kept, for the resumed search to write; where that state cannot be saved either, the resumed search
        runs from the one saved before, and the trials that ended since train again. Before, a trial that
        ended while the disk was full was recorded as failed. Other errors are logged; a trial's end that
        cannot be recorded is recorded as failed.
        """
        unwritten = self.__dict__.setdefault("_unwritten", [])
        while unwritten:
            entry = unwritten[0]
            try:
                self._tell(entry)
            except OSError as error:
                self._not_written(error, f"what trial #{self._number(entry[1])} reported")
                return False
            except Exception:  # noqa: BLE001 - one trial's record never ends the search
                logger.exception("could not record trial #%s", self._number(entry[1]))
                if entry[0] == "end":
                    failed = ("end", entry[1], TrialState.FAIL, None, {
                        "outcome": "failed", "error": "its result could not be recorded (see the search's log)"})
                    try:
                        self._tell(failed)
                    except OSError as error:  # kept in its place
                        unwritten[0] = failed
                        self._not_written(error, f"what trial #{self._number(entry[1])} reported")
                        return False
                    except Exception:  # noqa: BLE001
                        logger.exception("could not record trial #%s as failed", self._number(entry[1]))
            unwritten.pop(0)
            if self.__dict__.get("_write_failed"):
                logger.warning("the study is written again: what was kept for it is recorded")
                self._write_failed = False
        return True

    def _not_written(self, error: OSError, kept: str | None) -> None:
        """Say once (until a write succeeds again) that the study could not be written (``kept``: what is kept
        for it; None: a new trial was to be asked), and have the running search stopped
        (:func:`hpsearch.progress.record_not_written`)."""
        from hpsearch.progress import ROOM_ADVICE, record_not_written
        from musicssl.paths import full_disk_error

        self._write_error = error  # (for an ask outside a search: _no_trial_now)
        if not self.__dict__.get("_write_failed"):
            logger.warning("the study in %s could not be written (%s); %s", self._journal_text(), error,
                           f"{kept} is kept and written when it can be" if kept else
                           "no new trial starts until it can be")
        self._write_failed = True
        record_not_written(f"the study in {self._journal_text()} could not be written ({error.strerror or error})",
                           ROOM_ADVICE if full_disk_error(error) else "make it writable again")

    def _journal_text(self) -> str:
        backend = getattr(self._ot_study._storage, "_backend", None)
        return str(getattr(backend, "_file_path", "its storage"))

    def _number(self, trial_id: str) -> int | str:
        ot_trial = self._ot_trials.get(trial_id)
        return ot_trial.number if ot_trial is not None else f"? (Ray Tune's {trial_id})"

    def _tell(self, entry: tuple) -> None:
        kind, trial_id = entry[0], entry[1]
        ot_trial = self._ot_trials[trial_id]
        stored = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if stored.state.is_finished():
            return  # told before an interruption, or written meanwhile
        if kind == "report":
            epoch, value = entry[2], entry[3]
            if epoch not in stored.intermediate_values:
                # (else a resumed trial repeats the epochs it had reported before the interruption)
                ot_trial.report(value, step=epoch)
            return
        state, value, attrs = entry[2], entry[3], entry[4]
        for key, attr in attrs.items():
            ot_trial.set_user_attr(key, attr)
        # (Set already where a journal that lost the trial's end kept its constraint: Optuna would warn.)
        if state != TrialState.FAIL and f"constraints:{CONSTRAINT_NAME}" not in stored.system_attrs:
            ot_trial.set_constraint(CONSTRAINT_NAME, 1.0 if attrs.get("outcome") in _INFEASIBLE_OUTCOMES else 0.0)
        self._ot_study.tell(ot_trial, value, state=state)

    def _decide(
        self, final: Mapping[str, Any] | None, last: Mapping[str, Any] | None, error: bool, trial_id: str
    ) -> tuple[TrialState, float | None, dict[str, Any]]:
        """The Optuna state, value and user attributes of a finished trial."""
        source = {**(last or {}), **(final or {})}
        if (final or {}).get("outcome") == "diverged":
            # With stopping off, a rule that fired puts would_stop_epoch in every later epoch report; a trial that
            # then diverged stopped, and its final record leaves it out, which the last report must not undo.
            source.pop("would_stop_epoch", None)
        attrs = user_attrs_from_record(source)
        attrs["tune_trial_id"] = trial_id
        if not final:
            # Ended without a final report (a scheduler stopped it, or it raised): epochs so far.
            attrs["epochs_completed"] = int(source.get("epoch", 0) or 0)
            attrs["epochs_run"] = float(attrs["epochs_completed"])
            attrs["steps"] = int(source.get("step", 0) or 0)
            rankme = json_safe(source.get("collapse_rankme_embedding"))  # as a final report gives it
            if rankme is not None:
                attrs["rankme"] = rankme
            if source.get("collapse_verdict") is not None:  # the last epoch's verdict, as a final report's "verdict"
                attrs["verdict"] = str(source["collapse_verdict"])
        outcome = (final or {}).get("outcome")
        value = (final or {}).get(self._metric)
        if error or outcome == "failed":
            attrs["outcome"] = "failed"
            # No report of its own error: its worker died, or it failed outside the trial. Ray's error.txt says
            # why, in a folder this searcher does not know (trials.csv takes it from there: write_trials_csv).
            attrs.setdefault("error", NO_FINAL_REPORT)
            return TrialState.FAIL, None, attrs
        if final is None:
            # A scheduler stopped it; if the collapse rule had fired on the same report, the trial
            # ended for its collapse (a trial that ASHA would drop is often a collapsing one).
            if source.get("collapse_stop"):
                attrs["outcome"] = "diverged" if source.get("collapse_type") == "diverged" else "collapsed"
            else:
                attrs["outcome"] = "stopped"
            return TrialState.PRUNED, None, attrs
        if outcome == "complete" and isinstance(value, (int, float)) and math.isfinite(value):
            return TrialState.COMPLETE, float(value), attrs
        if outcome in _INFEASIBLE_OUTCOMES:
            return TrialState.PRUNED, None, attrs
        attrs["outcome"] = "failed"
        attrs["error"] = f"final report has outcome {outcome!r} and objective {value!r}"
        return TrialState.FAIL, None, attrs

    # ------------------------------------------------------------------ resume
    def adopt_running_trials(self) -> list[int]:
        """Collect the study's RUNNING trials that no Tune trial owns, to be handed out again."""
        owned = {trial.number for trial in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self._orphans = sorted(trial.number for trial in running if trial.number not in owned)
        return list(self._orphans)

    def _open_journal(self, journal: str | None) -> None:
        """Read and write the study in ``journal`` (the resumed search's own), if it is not the journal the
        pickled study names: that is the absolute path the search had when it was saved, and a search folder
        moved or copied since would write its trials into the old folder's journal (and loop on resume)."""
        from hpsearch.results import SearchJournal, journal_storage

        backend = getattr(self._ot_study._storage, "_backend", None)
        if journal is None or (getattr(backend, "_file_path", None) == journal and isinstance(backend, SearchJournal)):
            return  # (a search saved before SearchJournal: its journal is opened through it from now)
        self._storage = journal_storage(journal)
        self._ot_study = optuna.load_study(study_name=self._ot_study.study_name, storage=self._storage,
                                           sampler=self._sampler)
        # Trial ids are the journal's own numbering, the same in a copy of it.
        self._ot_trials = {trial_id: optuna.Trial(self._ot_study, ot_trial._trial_id)
                           for trial_id, ot_trial in self._ot_trials.items()}

    def _reseed_sampler(self) -> None:
        """A new sampler of the search's kind, seeded from the search's seed and the study's size.

        The pickled sampler's random state is the one at the last save: trials asked after it
        would be drawn again with the same values (the random start-up trials exactly so). A seed
        derived from the number of trials in the study keeps a resumed search reproducible for a
        given interruption point without repeating a draw.
        """
        if self.__dict__.get("sampler_seed") is None:
            return
        size = len(self._ot_study.get_trials(deepcopy=False))
        seed = (int(self.sampler_seed) * 1_000_003 + size) % (2**32)
        self._sampler = make_sampler(self.sampler_kind, seed)
        self._ot_study.sampler = self._sampler

    @_writes_the_study
    def save(self, checkpoint_path: str) -> None:
        self._write_unwritten()  # Tune saves the searcher's state every 10 s or more, and at the end of its run
        super().save(checkpoint_path)

    @_writes_the_study
    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # What the trials still running at the save had reported: each of them reports again from its
        # first epoch (the trainable keeps no checkpoint to go on from) or replays what the study was
        # told. A final report kept from before the interruption would otherwise be recorded for a rerun
        # that ends without one (a scheduler stops it, or it fails).
        self._trial_records = {}
        self.__dict__.setdefault("sampler_kind", "tpe")  # saved before samplers had a kind
        self._open_journal(search_journal(None))
        storage = self._ot_study._storage
        for ot_trial in self._ot_trials.values():
            # The pickled trials cache the study as it was at the save; later reports are in the journal.
            ot_trial._cached_frozen_trial = storage.get_trial(ot_trial._trial_id)
        self.adopt_running_trials()
        self._reseed_sampler()
        # What the study could not be told before the save (its disk was full): written now.
        self._write_failed = False
        self._write_unwritten()
        kept = {entry[1] for entry in self._unwritten if entry[0] == "end"}
        # A Tune trial completed before the save whose tell did not reach the study, or is no longer in it.
        ends = self.__dict__.setdefault("_ends", {})  # (a searcher saved before it kept them has none)
        for trial_id in sorted(self._completed_trials & self._ot_trials.keys(), key=self._number):  # in trial order
            ot_trial = self._ot_trials[trial_id]
            if trial_id in kept or storage.get_trial(ot_trial._trial_id).state.is_finished():
                continue
            if trial_id in ends:
                logger.warning("trial #%s ended before the search stopped, but %s has lost the record of its end "
                               "(the machine stopped before it reached the disk, or an older copy was put back); "
                               "it is recorded again from the search's saved state", ot_trial.number,
                               self._journal_text())
                self._write(ends[trial_id])
            else:
                ot_trial.set_user_attr("outcome", "failed")
                ot_trial.set_user_attr("error", "the search stopped before this trial's result was recorded")
                self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
