"""Sensitivity report of hyperparameter searches: ``python -m analysis.sensitivity [RUN_DIR ...]``.

A search (``python -m hpsearch.run``) leaves ``<storage-dir>/<name>/`` with its settings
(``search.json``), the Optuna journal (the record of every trial: parameters, state, outcome and
collapse attributes) and Ray Tune's trial folders (one ``result.json`` line per epoch report). This
module reads those, and only those, and writes

- one self-contained HTML report (plotly.js inlined once, opens offline), see
  :mod:`analysis.sensitivity_figures` for its sections;
- ``<stem>.json``: the numbers behind it (counts, best trial, compute, importances, correlations,
  the comparison across methods);
- ``<stem>-trials.csv``: one row per trial of every experiment.

Unlike Optuna's own plots and importances, which see COMPLETE trials only, everything here keeps
the collapsed, diverged and failed trials: they are where a search spends its compute and where a
researcher learns which settings to avoid. Importance for collapse is computed on an in-memory copy
of the study in which every finished trial is COMPLETE with the value 1 (collapsed or diverged) or
0 (healthy).

What counts as collapsed: a trial the collapse rule stopped (outcome ``collapsed``), one that diverged,
and, in a search run with ``--no-collapse-stop``, a trial the rule would have stopped: it ran on to
the end (outcome ``complete``, with a score) and recorded the rule's ``collapse_type``,
``collapse_epoch`` and ``would_stop_epoch``. A search with stopping on has no such trials, so its
numbers are those of its stopped trials. The report says which of the two it counts.

With no RUN_DIR the latest search of each method under ``--storage-dir`` (default ``runs``) is read,
and the report goes to ``<storage-dir>/report/sensitivity.html`` (with RUN_DIRs, to ``report/`` in the
folder holding the first of them). A search still running is read as far as it has gone.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C meanwhile is one line
    from musicssl.cli import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting("python -m analysis.sensitivity")

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hpsearch.results import JOURNAL_FILE, TRIALS_FILE
from hpsearch.settings import SEARCH_FILE
from musicssl.cli import ArgumentParser, parse_mixed, silence_closed_output
from musicssl.interrupts import exit_code, held_signals, sigterm_interrupts
from musicssl.paths import whole, write_whole

__all__ = [
    "COLLAPSE_OUTCOMES",
    "Experiment",
    "ExperimentAnalysis",
    "ReportError",
    "analyse",
    "bootstrap_best_interval",
    "check_report_path",
    "collapse_importances",
    "default_experiments",
    "experiment_from_study",
    "experiment_labels",
    "load_experiment",
    "main",
    "objective_importances",
    "spearman_with_interval",
    "wilson_interval",
    "write_report",
]

PROG = "python -m analysis.sensitivity"
# The first line of a report's trials CSV (trials_table's first columns), by which an earlier report's is known.
REPORT_CSV_START = "experiment,method,trial,outcome,"
# How a report's page begins its title (analysis.sensitivity_figures.build_page): an HTML file without it is kept.
REPORT_HTML_TITLE = "<title>Sensitivity report: "
STUDY_NAME = "search"
CONFIG_KEY = "optuna_trial"
DEFAULT_REPORT = Path("report") / "sensitivity.html"

# The trials a TPE search draws at random first: Optuna's TPESampler's n_startup_trials, which
# hpsearch.searcher.make_sampler leaves at its default.
TPE_STARTUP_TRIALS = 10

# Outcomes that count as "collapse" for the collapse target, the collapse rate and the maps: the
# searcher treats both as infeasible (hpsearch.searcher), and both end training early. With collapse
# stopping off, trials the rule would have stopped count too (see ``would_stop`` in _normalise_frame).
COLLAPSE_OUTCOMES = ("collapsed", "diverged")
# Outcomes that say something about the parameters (a failed trial raised an exception; a running
# one has not ended).
FINISHED_OUTCOMES = ("complete", "collapsed", "diverged", "stopped")
EVALUATORS = ("PED-ANOVA", "fANOVA")
# Fewer trials than this in a target and importances are noise: the report says so instead.
MIN_TRIALS_FOR_IMPORTANCE = 5
# PED-ANOVA's authors advise at least this many trials above its quantile.
PED_ANOVA_MIN_TOP_TRIALS = 5
# A 0/1 target (collapse) needs this many trials on each side: one collapsed trial "explains" collapse by
# whichever of its parameters is most unusual.
MIN_TRIALS_PER_CLASS = 3
# Up to this many points, Spearman's p-value is exact (all n! orderings); above, scipy's approximation.
EXACT_P_MAX_N = 8
# What bootstrap_best_interval's two numbers are, for the report and its JSON.
BEST_RANGE_TEXT = ("range of the best score of a search this size, 95 % bootstrap (the finished trials resampled "
                   "with replacement, computed exactly; its upper end is the observed best)")
# Where at least this share of the best range's resamples hold no scored trial, its lower end (2.5th
# percentile) is "no score": a search of this size ends without one that often.
BEST_NONE_LIMIT = 0.025
# A trial is "near the best" within this fraction of the best score.
NEAR_BEST_FRACTION = 0.05
RANK_METRIC = "collapse_rankme_embedding"
# The occupancy the collapse rule reads: prototypes used of min(probe segments, K). Of K alone (what
# searches before it was logged have, OCCUPANCY_FALLBACK) it cannot exceed N / K: 0.03 for a healthy
# trial at K = 8192, level with real collapses.
OCCUPANCY_METRIC = "collapse_cluster_occupancy_attainable"
OCCUPANCY_FALLBACK = "collapse_cluster_occupancy"

OBJECTIVE_LABELS = {
    "probe_map": "probe mAP (macro, valid split; 0-1)",
    "probe_auc": "probe ROC-AUC (macro, valid split; 0-1)",
    "rankme": "final effective rank (RankMe, dimensions)",
}
# What each searched method's report should show as its first two-parameter map, whatever the
# importances say: the pairs the study found decisive for collapse.
# Both names are parameters the method's space samples (study_spaces/<method>.py), not derived ones:
# BYOL samples one_minus_ema_rate and derives base_ema_rate from it.
PREFERRED_PAIRS = {
    "vicreg": ("var_weight", "cov_weight"),
    "clustering": ("num_prototypes", "teacher_temperature"),
    "barlow_twins": ("lambd", "learning_rate"),
    "byol": ("one_minus_ema_rate", "learning_rate"),
    "contrastive": ("temperature", "learning_rate"),
}
# How the report words what it counts as collapsed, with collapse stopping on and off.
COLLAPSED_STOPPED = "collapsed or diverged"
COLLAPSED_STOPPED_OR_WOULD_BE = "collapsed or diverged (stopped, or would have been stopped by the collapse rule)"


class ReportError(RuntimeError):
    """The report cannot be made from what was given; the message says what is wrong and what to do."""


class NoTrialYet(ReportError):
    """A search that has started but recorded no trial: nothing to report of it yet."""


# ----------------------------------------------------------------------------------------------
# Reading an experiment


@dataclass
class Experiment:
    """One search folder, read from disk."""

    folder: Path
    settings: dict[str, Any]
    study: Any  # optuna.Study
    trials: pd.DataFrame  # hpsearch.results.trials_frame plus a "group" column
    distributions: dict[str, Any]  # sampled parameter name -> its distribution in the search space
    trajectories: dict[int, pd.DataFrame]  # Optuna trial number -> its epoch reports
    # Parameters with values outside the search space (enqueued points), with the range they span.
    outside: dict[str, Any] = field(default_factory=dict)
    # The search's summary.json (rewritten after each trial), e.g. the untrained backbone's score.
    search_summary: dict[str, Any] = field(default_factory=dict)
    # Trial folders whose result.json could not be read: "path (why)" per Optuna trial number.
    unreadable_results: dict[int, str] = field(default_factory=dict)

    @property
    def untrained_value(self) -> float | None:
        """The objective of an untrained backbone: the bar training has to clear (probe objectives)."""
        return _json_float(self.search_summary.get("untrained_value"))

    @property
    def untrained_value_initial_bn(self) -> float | None:
        """The same with the backbone's initial BatchNorm statistics (None in searches that did not store it)."""
        return _json_float(self.search_summary.get("untrained_value_initial_bn"))

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def method(self) -> str:
        return str(self.settings["method"])

    @property
    def objective(self) -> str:
        return str(self.settings.get("objective", "probe_map"))

    @property
    def objective_label(self) -> str:
        return OBJECTIVE_LABELS.get(self.objective, self.objective)

    @property
    def sampler(self) -> str:
        """The search's --sampler (a search.json written before the flag: TPE's)."""
        return str(self.settings.get("sampler", "tpe"))

    @property
    def random_start_trials(self) -> int | None:
        """How many of a TPE search's trials its sampler drew at random (:func:`random_start_trials`); None for
        a random search."""
        return random_start_trials(self.study) if self.sampler == "tpe" and self.study is not None else None

    @property
    def max_epochs(self) -> int:
        return int(self.settings.get("max_epochs", 1))

    @property
    def trials_requested(self) -> int:
        return int(self.settings.get("trials", len(self.trials)))

    @property
    def collapse_stop(self) -> bool:
        """Whether the search stopped collapsed trials (``--no-collapse-stop`` turns it off)."""
        return bool(self.settings.get("collapse_stop", True))

    @property
    def rule_could_fire(self) -> bool:
        """Whether the collapse rule could stop (or, with stopping off, would have stopped) a trial: its grace
        and patience fit within the trials' epochs, as ``hpsearch.run`` warns at the start where they do not.
        True for a search.json without them."""
        grace, patience = self.settings.get("grace_epochs"), self.settings.get("patience_epochs")
        return grace is None or patience is None or int(grace) + int(patience) <= self.max_epochs

    @property
    def collapsed_wording(self) -> str:
        """What the report counts as collapsed, in words: the stopped trials, or, with stopping off (or
        any trial the rule would have stopped), those and the trials the rule would have stopped."""
        if self.collapse_stop and not bool(self.trials["would_stop"].any()):
            return COLLAPSED_STOPPED
        return COLLAPSED_STOPPED_OR_WOULD_BE

    @property
    def running(self) -> bool:
        """Still going (or interrupted): trials running, or fewer trials than requested."""
        return bool((self.trials["outcome"] == "running").any()) or len(self.trials) < self.trials_requested


def experiment_labels(experiments: Sequence[Experiment]) -> list[str]:
    """The name each experiment is shown by, in the page, its JSON, its CSV and on the console: the
    folder's name, with its parent's where two experiments share one (``a/vicreg``, ``b/vicreg``), and
    the position where that is not enough (``a/x/vicreg``, ``b/x/vicreg``: ``x/vicreg (1)``, ``x/vicreg (2)``)."""
    names = [experiment.name for experiment in experiments]
    labels = [name if names.count(name) == 1 else f"{experiment.folder.parent.name}/{name}"
              for experiment, name in zip(experiments, names)]
    return [label if labels.count(label) == 1 else f"{label} ({number})"
            for number, label in enumerate(labels, start=1)]


def sampled_trials(study) -> list:
    """The study's trials its sampler drew: started, and not enqueued with their parameters given
    (``points_to_evaluate``)."""
    return [trial for trial in study.get_trials(deepcopy=False)
            if trial.datetime_start is not None and "fixed_params" not in trial.system_attrs]


def random_start_trials(study) -> int:
    """How many of the study's trials a TPE sampler drew at random: TPE models only the trials that have ended
    complete or pruned, and draws at random while fewer than :data:`TPE_STARTUP_TRIALS` have, so every trial
    (of :func:`sampled_trials`) started before the tenth such trial ended was a random draw (with several trials
    at a time, more than ten)."""
    from bisect import bisect_left

    from optuna.trial import TrialState

    ended = sorted(trial.datetime_complete for trial in study.get_trials(deepcopy=False)
                   if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and trial.datetime_complete is not None)
    return sum(bisect_left(ended, trial.datetime_start) < TPE_STARTUP_TRIALS for trial in sampled_trials(study))


def _search_folders(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob(f"*/{SEARCH_FILE}"))


def load_experiment(folder: str | Path) -> Experiment:
    """Read a search folder; :class:`ReportError` with a plain message if it is not one (yet)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ReportError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ReportError(f"{folder}: not a folder; give an experiment folder such as runs/vicreg-<time>/")
    settings_file = folder / SEARCH_FILE
    if not settings_file.is_file():
        inside = _search_folders(folder)
        if inside:
            names = ", ".join(p.name for p in inside[:5]) + (", ..." if len(inside) > 5 else "")
            raise ReportError(
                f"{folder} holds {len(inside)} experiment folder(s) ({names}), not one experiment; "
                f"give those folders, or run {PROG} --storage-dir {folder} for the latest of each method"
            )
        raise ReportError(
            f"{folder}: not a search folder (no {SEARCH_FILE}); expected a folder written by "
            "python -m hpsearch.run, such as runs/vicreg-<time>/"
        )
    try:
        settings = json.loads(settings_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{settings_file}: unreadable search settings ({error})") from None
    if not isinstance(settings, dict) or "method" not in settings:
        raise ReportError(f"{settings_file}: not the settings of a hpsearch search (no 'method')")
    for key in ("trials", "max_epochs", "steps_per_epoch"):  # counts the report computes with
        value = settings.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
            raise ReportError(f"{settings_file}: {key!r} is {value!r}, not a count; python -m hpsearch.run writes this "
                              "file: restore it (e.g. from a copy of the search)")
    journal = folder / JOURNAL_FILE
    if (not journal.is_file() or journal.stat().st_size == 0) and (folder / TRIALS_FILE).is_file():
        state = "is missing" if not journal.is_file() else "is empty"
        raise ReportError(
            f"{folder}: {JOURNAL_FILE} {state}, though the search has written its {TRIALS_FILE}: the report reads "
            f"the trials from the Optuna journal; restore {JOURNAL_FILE} (e.g. from a copy of the search)"
        )
    if not journal.is_file() or journal.stat().st_size == 0:
        from hpsearch.settings import flag_text

        raise NoTrialYet(
            f"{folder}: the search has not recorded any trial yet (no {JOURNAL_FILE} or an empty one); "
            "wait for its first trial, or resume it with python -m hpsearch.run "
            f"{settings['method']} {flag_text('--name', folder.resolve().name)} "
            f"{flag_text('--storage-dir', str(folder.resolve().parent))} --resume"
        )
    study = _load_study(journal)
    if not study.get_trials(deepcopy=False):
        raise NoTrialYet(f"{folder}: the search has started but holds no trial yet; try again once one has run")
    unreadable: dict[int, str] = {}
    experiment = experiment_from_study(study, settings, folder, read_trajectories(folder, unreadable))
    experiment.unreadable_results = unreadable
    try:
        experiment.search_summary = json.loads((folder / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass  # none before the search's first trial has finished
    if not isinstance(experiment.search_summary, dict):
        experiment.search_summary = {}
    return experiment


def experiment_from_study(study, settings: dict[str, Any], folder: str | Path = ".",
                          trajectories: dict[int, pd.DataFrame] | None = None) -> Experiment:
    """An :class:`Experiment` from an Optuna study whose trials carry hpsearch's user attributes
    (``outcome``, ``collapse_type``...; a trial without them is taken by its state)."""
    from hpsearch.results import trials_frame

    frame = _normalise_frame(trials_frame(study))
    # A running (or interrupted) trial has recorded no epochs_run yet: its epochs are those it reported.
    for index in frame.index[(frame["outcome"] == "running") & frame["epochs_run"].isna()]:
        reports = (trajectories or {}).get(int(frame.at[index, "trial"]))
        if reports is not None and len(reports):
            frame.at[index, "epochs_run"] = float(len(reports))
    trials = study.get_trials(deepcopy=False)
    recorded: dict[str, Any] = {}
    for trial in trials:
        for name, distribution in trial.distributions.items():
            recorded.setdefault(name, distribution)
    widened = sampled_distributions(trials)
    return Experiment(
        folder=_folder_read(folder),
        settings=dict(settings),
        study=study,
        trials=frame,
        distributions=recorded,
        trajectories=dict(trajectories or {}),
        outside={name: widened[name] for name in recorded if widened[name] != recorded[name]},
    )


def _folder_read(folder: str | Path) -> Path:
    """``folder`` absolute, as the search is named and placed by: with ``..`` in it (given from inside a trial
    folder, say), the folder the system read (through any link), else as given (a link keeps its name)."""
    folder = Path(folder).expanduser()
    return Path(os.path.realpath(folder) if ".." in folder.parts else os.path.abspath(folder))


def sampled_distributions(trials) -> dict[str, Any]:
    """Each sampled parameter's distribution, widened to hold every recorded value: a point
    enqueued with ``points_to_evaluate`` may lie outside the space (Optuna records it with a warning),
    and the importance evaluators refuse values outside their distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    found: dict[str, Any] = {}
    values: dict[str, list[Any]] = {}
    for trial in trials:
        for name, distribution in trial.distributions.items():
            found.setdefault(name, distribution)
            if name in trial.params:
                values.setdefault(name, []).append(trial.params[name])
    widened = {}
    for name, distribution in found.items():
        seen = values.get(name, [])
        if isinstance(distribution, CategoricalDistribution):
            extra = [v for v in dict.fromkeys(seen) if v not in distribution.choices]
            widened[name] = CategoricalDistribution(list(distribution.choices) + extra) if extra else distribution
            continue
        numbers = [float(v) for v in seen if isinstance(v, (int, float))]
        low = min([distribution.low, *numbers])
        high = max([distribution.high, *numbers])
        log = distribution.log and low > 0
        if (low, high) == (distribution.low, distribution.high):
            widened[name] = distribution
        elif isinstance(distribution, IntDistribution):
            step = 1 if distribution.log else distribution.step
            low = int(distribution.low - step * math.ceil((distribution.low - low) / step))
            log = distribution.log and low >= 1
            widened[name] = IntDistribution(low, int(math.ceil(high)), log=log, step=1 if log else step)
        else:
            widened[name] = FloatDistribution(low, high, log=log, step=None)
    return widened


def _load_study(journal: Path):
    import optuna

    from hpsearch.results import load_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return load_study(journal, STUDY_NAME)
    except Exception as error:  # a corrupt journal raises whatever its parser meets, a KeyError among them
        names = _study_names(journal) if isinstance(error, KeyError) else None
        if names is not None and STUDY_NAME not in names:
            raise ReportError(f"{journal}: holds no study named {STUDY_NAME!r} (not written by hpsearch?; it holds "
                              f"{', '.join(map(repr, names)) if names else 'none'})") from None
        raise ReportError(f"{journal}: cannot read the Optuna journal ({type(error).__name__}: {error})") from None


def _study_names(journal: Path) -> list[str] | None:
    """The names of the studies in ``journal``, or None where it cannot be read."""
    import optuna

    from hpsearch.results import journal_storage

    try:
        return optuna.get_all_study_names(journal_storage(journal))
    except Exception:  # noqa: BLE001 - unreadable: the caller says so
        return None


def _normalise_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns the analysis relies on, with types, and the trial's display ``group``."""
    frame = frame.copy()
    for column in ("objective", "probe_map", "probe_auc", "rankme", "collapse_epoch", "collapse_step", "stop_epoch",
                   "would_stop_epoch", "epochs_run", "seconds"):
        if column not in frame:
            frame[column] = np.nan
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("outcome", "collapse_type", "error"):
        if column not in frame:
            frame[column] = None
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    # A finished trial without an outcome (not written by hpsearch's searcher) is taken by its state.
    by_state = {"COMPLETE": "complete", "PRUNED": "stopped", "FAIL": "failed", "RUNNING": "running",
                "WAITING": "running"}
    missing = frame["outcome"].isna()
    frame.loc[missing, "outcome"] = frame.loc[missing, "state"].map(by_state).fillna("failed")
    # An enqueued trial (a start point Ray's OptunaSearch puts in the study) not yet started: not finished, so
    # counted with the running ones (before: in no count, and a search with such trials read as finished).
    frame.loc[frame["outcome"] == "waiting", "outcome"] = "running"
    frame["group"] = [trial_group(o, c) for o, c in zip(frame["outcome"], frame["collapse_type"])]
    # Stopped by the collapse rule (or diverged), or, with stopping off, a trial the rule would have
    # stopped: it ran on and recorded would_stop_epoch with the rule's collapse_type and collapse_epoch
    # (hpsearch.trainable). A trial only flagged (e.g. a last "dimensional" verdict) records neither.
    frame["stopped_for_collapse"] = frame["outcome"].isin(COLLAPSE_OUTCOMES)
    would = frame["would_stop_epoch"].notna() | (frame["collapse_type"].notna() & (frame["outcome"] == "complete"))
    frame["would_stop"] = would & ~frame["stopped_for_collapse"] & frame["outcome"].isin(FINISHED_OUTCOMES)
    frame["collapsed"] = frame["stopped_for_collapse"] | frame["would_stop"]
    return frame


def trial_group(outcome: str, collapse_type: str | None) -> str:
    """How a trial is coloured and counted: its outcome, with the collapse type for collapsed ones."""
    if outcome == "collapsed":
        return f"collapsed: {collapse_type or 'unknown'}"
    return str(outcome)


def read_trajectories(folder: Path, unreadable: dict[int, str] | None = None) -> dict[int, pd.DataFrame]:
    """Per Optuna trial number, its epoch reports (Ray Tune's ``result.json`` lines without the
    final one), in epoch order. Trial folders are joined to Optuna trials through the
    ``optuna_trial`` config key. A trial runs more than once when a search is continued after a
    kill: in the same folder (Tune knew the trial) or in a new one (it did not; the folders' names,
    ``trial-<number>-<random Tune id>``, do not say which came first). The trial's reports are
    those of its last run, the one whose outcome the study holds: in one file the run written last,
    across folders the one that started last (by Ray's ``timestamp`` of its reports, else the
    file's last change), then the one that ended last.

    A ``result.json`` that cannot be read, or whose lines hold no report at all, is left out; with
    ``unreadable`` given, it gets ``"path (why)"`` under the folder's trial number (unless another
    folder holds that trial's reports)."""
    runs: dict[int, list[tuple[float, float, list[dict]]]] = {}
    problems: dict[int, str] = {}
    for params_file in sorted(Path(folder).glob("*/params.json")):
        try:
            number = json.loads(params_file.read_text()).get(CONFIG_KEY)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        result_file = params_file.parent / "result.json"
        if not isinstance(number, int) or not result_file.is_file():
            continue
        try:
            text = result_file.read_text(errors="replace")
        except OSError as error:
            problems.setdefault(number, f"{result_file} ({error.strerror or error})")
            continue
        lines = text.splitlines()
        records, reports = [], 0
        for line in lines:
            record = _report(line)
            reports += record is not None
            if record is not None and not record.get("final") and _json_float(record.get("epoch")) is not None:
                records.append({k: v for k, v in record.items() if not isinstance(v, (dict, list))})
        # (A last line without its newline may be a running trial's report being written: not counted against it.)
        if not reports and any(line.strip() for line in (lines if text.endswith("\n") else lines[:-1])):
            problems.setdefault(number, f"{result_file} (no line of it is a JSON report)")
        if not records:
            continue
        last = _runs_of(records)[-1]  # a file's earlier runs were run again after them
        stamps = [stamp for stamp in (_json_float(record.get("timestamp")) for record in last) if stamp is not None]
        if not stamps:  # Ray writes one on every line; else the file's last change
            stamps = [result_file.stat().st_mtime]
        runs.setdefault(number, []).append((stamps[0], stamps[-1], last))
    trajectories = {}
    for number, found in runs.items():
        # One run: its epochs are numbers and rise (_runs_of), so it is in epoch order already.
        frame = pd.DataFrame.from_records(max(found, key=lambda item: item[:2])[2])
        frame["epoch"] = pd.to_numeric(frame["epoch"])
        trajectories[number] = frame
    if unreadable is not None:
        unreadable.update((number, why) for number, why in problems.items() if number not in trajectories)
    return trajectories


def _report(line: str) -> dict | None:
    """One ``result.json`` line as a dict, or None. A report cut short by a kill has the next run's
    first report appended to it on the same line: that report is read from where it starts."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # cut short (or being written by a running trial)
        record, decoder = None, json.JSONDecoder()
        start = line.find("{", 1)
        while record is None and start != -1:
            try:
                value, end = decoder.raw_decode(line, start)
            except json.JSONDecodeError:
                value, end = None, -1
            if isinstance(value, dict) and not line[end:].strip():
                record = value
            start = line.find("{", start + 1)
    return record if isinstance(record, dict) else None


def _runs_of(records: list[dict]) -> list[list[dict]]:
    """One file's epoch reports cut into runs: a trial run again in its folder starts over at epoch
    1 (a trial never continues from a checkpoint), so a report whose epoch is not above the one
    before starts a run."""
    runs: list[list[dict]] = []
    for record in records:
        if not runs or _json_float(record["epoch"]) <= _json_float(runs[-1][-1]["epoch"]):
            runs.append([])
        runs[-1].append(record)
    return runs


def default_experiments(storage_dir: str | Path, left_out: list[str] | None = None) -> list[Path]:
    """The latest search (by the time of its ``search.json``) of each method under ``storage_dir``.

    A folder whose ``search.json`` cannot be read (or names no method) is left out, and said so in
    ``left_out``: it may be a method's latest search, which the report then does not show."""
    storage = Path(storage_dir).expanduser()
    if storage.exists() and not storage.is_dir():
        raise ReportError(f"{storage}: is a file, not a folder; give --storage-dir the folder that holds the searches "
                          "(default: runs)")
    if not storage.is_dir():
        raise ReportError(
            f"{storage}: no such folder; run a search first (python -m hpsearch.run vicreg --trials 64) or give "
            "--storage-dir / experiment folders"
        )
    if (storage / SEARCH_FILE).is_file():
        raise ReportError(
            f"{storage}: is a search folder, not a folder of searches; give it as RUN_DIR "
            f"({PROG} {storage}), or --storage-dir {storage.parent} for the latest search of each method there"
        )
    latest: dict[str, Path] = {}
    unreadable: list[str] = []
    for folder in _search_folders(storage):
        try:
            stored = json.loads((folder / SEARCH_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"unreadable ({error})"
        else:
            method = stored.get("method") if isinstance(stored, dict) else None
            problem = (None if isinstance(method, str) else
                       "names no method" if isinstance(stored, dict) else "not a settings object")
        if problem:
            unreadable.append(f"{folder / SEARCH_FILE}: {problem}")
            continue
        mtime = (folder / SEARCH_FILE).stat().st_mtime
        if method not in latest or mtime > (latest[method] / SEARCH_FILE).stat().st_mtime:
            latest[method] = folder
    if not latest and unreadable:
        raise ReportError(f"{storage}: no search here has readable settings: {'; '.join(unreadable)}")
    if not latest:
        raise ReportError(
            f"{storage}: no search folders here (none holds {SEARCH_FILE}); run one with "
            "python -m hpsearch.run METHOD, or give experiment folders"
        )
    if left_out is not None:
        left_out.extend(f"{problem}: not in the report (were it its method's latest search, an earlier one of that "
                        "method may be shown instead)" for problem in unreadable)
    return [latest[method] for method in sorted(latest)]


# ----------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (well-behaved at 0 and 1 and for small counts)."""
    if total <= 0:
        return (math.nan, math.nan)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # At 0 and at every trial the bound is exactly 0 (1); in floating point it came out 0.9999999999999999.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return (low, high)


@dataclass
class Correlation:
    """Spearman's rank correlation with a 95 % interval."""

    n: int
    rho: float
    low: float
    high: float
    p_value: float
    method: str = "Fisher z-transform, Bonett-Wright standard error sqrt((1 + rho^2/2)/(n - 3))"

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "spearman": _json_float(self.rho), "low": _json_float(self.low),
                "high": _json_float(self.high), "p_value": _json_float(self.p_value), "interval": self.method}


def spearman_with_interval(x: Sequence[float], y: Sequence[float], z: float = 1.959964) -> Correlation:
    """Spearman's rho (scipy) and its 95 % interval by the Fisher z-transform with Bonett & Wright's
    (2000) standard error, which is accurate for rank correlations where Pearson's 1/sqrt(n-3) is too
    narrow. Needs n >= 4 for an interval; a constant variable gives NaN."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(len(x))
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(n, math.nan, math.nan, math.nan, math.nan)
    result = spearmanr(x, y)
    rho, p_value = float(result.statistic), float(result.pvalue)
    if n <= EXACT_P_MAX_N:  # scipy's t approximation is far off for a few points (p 0 for rho 1 at n = 3)
        p_value = _exact_spearman_p(x, y, rho)
    if n < 4:
        return Correlation(n, rho, math.nan, math.nan, p_value)
    clipped = min(max(rho, -0.999999), 0.999999)
    standard_error = math.sqrt((1 + clipped * clipped / 2) / (n - 3))
    centre = math.atanh(clipped)
    return Correlation(n, rho, math.tanh(centre - z * standard_error), math.tanh(centre + z * standard_error), p_value)


def _exact_spearman_p(x: np.ndarray, y: np.ndarray, rho: float) -> float:
    """Two-sided permutation p-value of Spearman's rho: the share of the n! orderings of ``y``'s ranks
    against ``x``'s whose |rho| reaches the observed one."""
    import itertools

    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    rx = (rx - rx.mean()) / np.sqrt(((rx - rx.mean()) ** 2).sum())
    ry = (ry - ry.mean()) / np.sqrt(((ry - ry.mean()) ** 2).sum())
    orders = np.array(list(itertools.permutations(range(len(ry)))))
    permuted = np.abs(ry[orders] @ rx)
    return float((permuted >= abs(rho) - 1e-12).mean())


def bootstrap_best_interval(objective: Sequence[float]) -> tuple[float, float]:
    """The range of the best score of a search this size (95 % percentile bootstrap): the best of the
    search's trials resampled with replacement (a trial without a score, e.g. one stopped for collapse, is
    drawn too and scores nothing; one the rule would have stopped, in a search without stopping, kept its
    score), 2.5th and 97.5th percentiles over the resamples that hold a score. It says how much the best
    depends on which trials the search happened to draw; it is not a confidence interval of the best: a
    resample holds the best trial in about 63 % of draws, so the upper end is the observed best. NaN where
    no trial has a score.

    Computed exactly, not by drawing resamples: of n trials, m unscored, the best of a resample is at
    most the j-th lowest score with probability ((m + j) / n)^n, of which (m / n)^n is the share with no
    score at all; each end is the lowest score whose probability, given a score, reaches its percentile.
    (Drawn resamples, 2,000 of them, put the lower end a score away from it on some seeds.)"""
    values = np.asarray(objective, dtype=float)
    scored = np.sort(values[np.isfinite(values)])
    if len(scored) == 0:
        return (math.nan, math.nan)
    n, unscored = len(values), len(values) - len(scored)
    distinct = np.unique(scored)
    at_most = np.searchsorted(scored, distinct, side="right")  # scores <= each distinct one
    none = (unscored / n) ** n
    cdf = (((unscored + at_most) / n) ** n - none) / (1.0 - none)
    low, high = (float(distinct[int(np.argmax(cdf >= q - 1e-12))]) for q in (0.025, 0.975))
    return (low, high)


# ----------------------------------------------------------------------------------------------
# Importances


@dataclass
class Importance:
    """One evaluator's importances for one target, or why there are none."""

    target: str  # "objective" or "collapse"
    evaluator: str  # "PED-ANOVA" or "fANOVA"
    values: dict[str, float] | None  # normalised to sum to 1, most important first
    trials: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "evaluator": self.evaluator, "trials": self.trials, "note": self.note,
                "importances": None if self.values is None else {k: float(v) for k, v in self.values.items()}}


def _copy_study(trials: list[tuple[dict, dict, float]]):
    """An in-memory study holding ``(params, distributions, value)`` as COMPLETE trials."""
    import optuna

    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    study.add_trials([
        optuna.trial.create_trial(params=params, distributions=distributions, value=float(value))
        for params, distributions, value in trials
    ])
    return study


def _log_scaled(rows: list[tuple[dict, dict, float]]) -> list[tuple[dict, dict, float]]:
    """``rows`` with each log-scale parameter as its log10, on a linear distribution: Optuna's fANOVA reads
    every parameter on a linear scale (its forest's marginals average over the range as if drawn uniformly),
    PED-ANOVA on the scale it was sampled."""
    from optuna.distributions import FloatDistribution, IntDistribution

    scaled = []
    for params, distributions, value in rows:
        params, distributions = dict(params), dict(distributions)
        for name, distribution in distributions.items():
            if isinstance(distribution, (FloatDistribution, IntDistribution)) and distribution.log and name in params:
                params[name] = math.log10(params[name])
                distributions[name] = FloatDistribution(math.log10(distribution.low), math.log10(distribution.high))
        scaled.append((params, distributions, value))
    return scaled


def _evaluator(name: str, values: Sequence[float], binary: bool, collapsed: str = COLLAPSED_STOPPED):
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if name == "fANOVA":
        return FanovaImportanceEvaluator(seed=0), ""
    n = len(values)
    if binary:
        # For a 0/1 target the "top" trials must be exactly the positive ones: a quantile just under
        # their share keeps the ties at 1 and nothing else.
        positives = int(np.sum(values))
        quantile = (positives - 0.5) / n
        return PedAnovaImportanceEvaluator(target_quantile=quantile), (
            f"top set: the {positives} trial(s) {collapsed}, against all {n}")
    quantile = min(0.5, max(0.1, PED_ANOVA_MIN_TOP_TRIALS / n))
    top = int(math.ceil(quantile * n))
    return PedAnovaImportanceEvaluator(target_quantile=quantile), (
        f"top {100 * quantile:.0f} % ({top} trials) against all {n}")


def _importances(target: str, rows: list[tuple[dict, dict, float]], names: list[str], binary: bool,
                 collapsed: str = COLLAPSED_STOPPED) -> list[Importance]:
    """Both evaluators' importances for one target; ``collapsed`` words what a 1 of a binary target is."""
    import optuna

    values = [value for _, _, value in rows]
    results = []
    for evaluator_name in EVALUATORS:
        if len(rows) < MIN_TRIALS_FOR_IMPORTANCE:
            results.append(Importance(target, evaluator_name, None, len(rows),
                                      f"not enough trials: {len(rows)}, at least {MIN_TRIALS_FOR_IMPORTANCE} needed"))
            continue
        if np.ptp(values) == 0:
            what = (f"every trial {collapsed}" if values[0] else f"no trial {collapsed}") if binary \
                else "every trial scored the same"
            results.append(Importance(target, evaluator_name, None, len(rows), f"no variation to explain: {what}"))
            continue
        positives = int(np.sum(values))
        if binary and min(positives, len(values) - positives) < MIN_TRIALS_PER_CLASS:
            side = (f"only {positives} trial(s) {collapsed}" if positives < MIN_TRIALS_PER_CLASS
                    else f"only {len(values) - positives} trial(s) did not")
            results.append(Importance(target, evaluator_name, None, len(rows),
                                      f"too few to attribute: {side}, at least {MIN_TRIALS_PER_CLASS} needed on "
                                      "each side"))
            continue
        varied = [name for name in names if len({_hashable(p.get(name)) for p, _, _ in rows}) > 1]
        if not varied:
            results.append(Importance(target, evaluator_name, None, len(rows), "no parameter varied across these trials"))
            continue
        evaluator, note = _evaluator(evaluator_name, values, binary, collapsed)
        asked = varied
        conditional = [name for name in varied if not all(name in params for params, _, _ in rows)]
        if evaluator_name == "fANOVA" and conditional:
            # Optuna's fANOVA keeps only the trials that have every parameter asked for, so with a conditional
            # parameter (one a define-by-run space suggests for some trials) it would judge a subset while the
            # report counted them all; asked for the others only, its forest gave the conditional parameter's
            # effect to them (a parameter of no effect at 0.80 where the conditional one decided collapse).
            results.append(Importance(target, evaluator_name, None, len(rows), (
                f"not computed: {', '.join(conditional)} {'is' if len(conditional) == 1 else 'are'} set in only some "
                "trials (conditional), and fANOVA, which needs every parameter in every trial, would give "
                f"{'its' if len(conditional) == 1 else 'their'} effect to the others: see PED-ANOVA")))
            continue
        try:
            study = _copy_study(_log_scaled(rows) if evaluator_name == "fANOVA" else rows)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PED-ANOVA warns about small regimes; the note says the count
                raw = optuna.importance.get_param_importances(study, evaluator=evaluator, params=asked, normalize=False)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            # E.g. conditional parameters that not every trial has: say so rather than lose the report.
            results.append(Importance(target, evaluator_name, None, len(rows),
                                      f"the evaluator could not run on these trials ({type(error).__name__}: {error})"))
            continue
        total = float(sum(raw.values()))
        if not math.isfinite(total) or total <= 0:
            results.append(Importance(target, evaluator_name, None, len(rows),
                                      "the evaluator found no difference between the parameters' effects"))
            continue
        normalised = {name: float(value) / total for name, value in raw.items()}
        for name in names:  # a parameter that never varied explains nothing (one left out is not given a value)
            if name not in varied:
                normalised.setdefault(name, 0.0)
        ordered = dict(sorted(normalised.items(), key=lambda item: -item[1]))
        results.append(Importance(target, evaluator_name, ordered, len(rows), note))
    return results


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def _trial_rows(experiment: Experiment, outcomes: Sequence[str]) -> list[tuple[Any, dict, dict]]:
    """(row, params, distributions) of the trials with one of ``outcomes``, sampled parameters only.

    The distributions are the search space's, widened where one of these trials lies outside it
    (and only then), so that every trial of the target shares one space the evaluators accept."""
    by_number = {trial.number: trial for trial in experiment.study.get_trials(deepcopy=False)}
    chosen = []
    for row in experiment.trials.itertuples():
        trial = by_number.get(int(row.trial))
        if trial is not None and row.outcome in outcomes and trial.distributions:
            chosen.append((row, trial))
    space = sampled_distributions([trial for _, trial in chosen])
    return [(row, dict(trial.params), {name: space[name] for name in trial.params}) for row, trial in chosen]


def objective_importances(experiment: Experiment) -> list[Importance]:
    """PED-ANOVA and fANOVA importances of the sampled parameters for the objective, over the
    complete trials (the only ones with a score)."""
    rows = [(params, distributions, float(row.objective))
            for row, params, distributions in _trial_rows(experiment, ("complete",)) if math.isfinite(row.objective)]
    return _importances("objective", rows, list(experiment.distributions), binary=False)


def collapse_importances(experiment: Experiment) -> list[Importance]:
    """PED-ANOVA and fANOVA importances for collapsing: every finished trial (complete, collapsed,
    diverged, stopped) counts, valued 1 if it collapsed or diverged (with stopping off: or the
    collapse rule would have stopped it) and 0 otherwise."""
    rows = [(params, distributions, float(row.collapsed))
            for row, params, distributions in _trial_rows(experiment, FINISHED_OUTCOMES)]
    return _importances("collapse", rows, list(experiment.distributions), binary=True,
                        collapsed=experiment.collapsed_wording)


# ----------------------------------------------------------------------------------------------
# The analysis of one experiment


@dataclass
class ExperimentAnalysis:
    """Everything the report shows about one experiment, in numbers."""

    experiment: Experiment
    counts: dict[str, int]
    best: dict[str, Any] | None
    compute: dict[str, Any]
    importances: list[Importance]
    label_free: Correlation | None
    label_free_metric: str | None
    collapse_rate: dict[str, Any]
    sensitivity: dict[str, Any]
    time_to_collapse: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    # Set for the page (analysis.sensitivity_figures.build_page): the prefix of the experiment's DOM ids
    # and figure keys, unique within the report whatever the folders' names, and the name it is shown
    # by (the folder's, with its parent's where two experiments share a name).
    key: str = ""
    label: str = ""

    def importance(self, target: str, evaluator: str) -> Importance | None:
        return next((i for i in self.importances if i.target == target and i.evaluator == evaluator), None)

    def ranked_parameters(self) -> list[str]:
        """Sampled parameters, most important first (their importances summed over the targets and
        evaluators that produced any, each of which sums to 1); by name where there are none."""
        names = list(self.experiment.distributions)
        score = {name: 0.0 for name in names}
        for importance in self.importances:
            for name, value in (importance.values or {}).items():
                if name in score:
                    score[name] += value
        return sorted(names, key=lambda name: (-score[name], name))

    def to_dict(self) -> dict[str, Any]:
        experiment = self.experiment
        return {
            # As the page shows it (set by analysis.sensitivity_figures.keyed): told apart by the parent
            # folder where two experiments share a folder name.
            "name": self.label or experiment.name,
            "folder": str(experiment.folder),
            "method": experiment.method,
            "objective": experiment.objective,
            "objective_label": experiment.objective_label,
            "collapse_stop": experiment.collapse_stop,
            "sampler": experiment.sampler,
            "random_start_trials": experiment.random_start_trials,
            "running": experiment.running,
            "trials": int(len(experiment.trials)),
            "trials_requested": experiment.trials_requested,
            "counts": self.counts,
            "best": self.best,
            "untrained_value": experiment.untrained_value,
            "untrained_value_initial_bn": experiment.untrained_value_initial_bn,
            "compute": self.compute,
            "sampled_parameters": {name: _describe_distribution(d) for name, d in experiment.distributions.items()},
            "importances": [importance.to_dict() for importance in self.importances],
            "label_free_vs_labelled": None if self.label_free is None else {
                "label_free": "final effective rank (RankMe of the embedding)", "labelled": self.label_free_metric,
                **self.label_free.to_dict()},
            "collapse_rate": self.collapse_rate,
            "sensitivity": self.sensitivity,
            "time_to_collapse": self.time_to_collapse,
            "notes": self.notes,
        }


def _describe_distribution(distribution) -> dict[str, Any]:
    info: dict[str, Any] = {"type": type(distribution).__name__}
    for key in ("low", "high", "log", "step", "choices"):
        if hasattr(distribution, key):
            value = getattr(distribution, key)
            info[key] = list(value) if isinstance(value, tuple) else value
    return info


def _describe_range(distribution) -> str:
    if hasattr(distribution, "choices"):
        return "{" + ", ".join(map(str, distribution.choices)) + "}"
    return f"{distribution.low:g}-{distribution.high:g}"


def _json_float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def outcome_counts(frame: pd.DataFrame, collapse_stop: bool = True) -> dict[str, int]:
    """Trials per outcome, collapsed ones split by type: ``complete``, ``collapsed: <type>``... (or
    ``collapsed`` with 0 when none collapsed in a search that stopped collapsed trials), ``diverged``,
    ``failed``, then ``stopped`` and ``running`` when there are any."""
    collapsed = sorted(g for g in set(frame["group"]) if g.startswith("collapsed: ")) or ["collapsed"]
    order = ["complete", *collapsed, "diverged", "failed", "stopped", "running"]
    counts = {group: int((frame["group"] == group).sum()) for group in order}
    always = ("complete", "collapsed", "diverged", "failed") if collapse_stop else ("complete", "diverged", "failed")
    return {group: count for group, count in counts.items() if count or group in always}


def final_metric(experiment: Experiment, metric: str) -> pd.Series:
    """Per trial (indexed like ``experiment.trials``), the last finite value of an epoch metric:
    from the journal's last metrics, else from the trial's trajectory."""
    frame = experiment.trials
    column = f"last_{metric}"
    values = pd.to_numeric(frame[column], errors="coerce") if column in frame else pd.Series(np.nan, index=frame.index)
    for index, number in frame["trial"].items():
        if pd.notna(values.loc[index]) and math.isfinite(values.loc[index]):
            continue
        trajectory = experiment.trajectories.get(int(number))
        if trajectory is not None and metric in trajectory:
            finite = pd.to_numeric(trajectory[metric], errors="coerce").dropna()
            if len(finite):
                values.loc[index] = float(finite.iloc[-1])
    return values


def occupancy_metric(experiment: Experiment) -> str | None:
    """The occupancy this search logged (:data:`OCCUPANCY_METRIC`, else the fallback), None without one."""
    for metric in (OCCUPANCY_METRIC, OCCUPANCY_FALLBACK):
        if any(metric in t and pd.to_numeric(t[metric], errors="coerce").notna().any()
               for t in experiment.trajectories.values()) or (
                f"last_{metric}" in experiment.trials and experiment.trials[f"last_{metric}"].notna().any()):
            return metric
    return None


def final_rank(experiment: Experiment) -> pd.Series:
    """Per trial, the final effective rank: the trial's own record of it (the last epoch's RankMe),
    else the last one it reported."""
    frame = experiment.trials
    return frame["rankme"].where(frame["rankme"].notna(), final_metric(experiment, RANK_METRIC))


# What epoch_seconds measured, for the report and its JSON.
PACE_FROM_REPORTS = "the complete trials' epoch reports, their first epoch (which holds the trial's start) left out"
PACE_FROM_TRIALS = ("the complete trials' whole seconds over their epochs (no epoch reports past the first: their start "
                    "and final scoring included, so an overestimate)")


def epoch_seconds(experiment: Experiment) -> tuple[float, str | None]:
    """The median seconds of an epoch of a complete trial, and what it was measured from: Ray's
    ``time_this_iter_s`` of the complete trials' epoch reports after their first (the first also holds
    the trial's start: Ray's actor, the data, the model), else, without such reports, a complete trial's
    seconds over its epochs (its start and final scoring included). What an epoch a trial did not run
    would have cost: the basis of the report's estimate of the time early stopping saved. NaN (None)
    with no complete trial."""
    frame = experiment.trials
    complete = frame[frame["outcome"] == "complete"]
    times: list[float] = []
    for number in complete["trial"]:
        trajectory = experiment.trajectories.get(int(number))
        if trajectory is not None and "time_this_iter_s" in trajectory:
            later = pd.to_numeric(trajectory.loc[trajectory["epoch"] >= 2, "time_this_iter_s"], errors="coerce")
            times.extend(float(t) for t in later if math.isfinite(t) and t >= 0)
    if times:
        return float(np.median(times)), PACE_FROM_REPORTS
    full = complete[(complete["epochs_run"] > 0) & complete["seconds"].notna()]
    if len(full):
        return float((full["seconds"] / full["epochs_run"]).median()), PACE_FROM_TRIALS
    return math.nan, None


def analyse(experiment: Experiment) -> ExperimentAnalysis:
    """The numbers of the report for one experiment."""
    frame = experiment.trials
    # Without stopping no trial is stopped as collapsed: the report's line says how many the rule would have stopped.
    counts = outcome_counts(frame, experiment.collapse_stop)
    notes = []
    if experiment.running:
        notes.append(f"the search is still running or was interrupted: {len(frame)} of {experiment.trials_requested} "
                     f"trials in the study, {int((frame['outcome'] == 'running').sum())} running or waiting to start")

    complete = frame[(frame["outcome"] == "complete") & frame["objective"].notna()]
    best = None
    if len(complete):
        row = complete.loc[complete["objective"].idxmax()]
        trial = experiment.study.trials[int(row["trial"])] if int(row["trial"]) < len(experiment.study.trials) else None
        sampled = dict(trial.params) if trial is not None else {}
        derived = {name[len("param_"):]: _plain(value) for name, value in row.items()
                   if name.startswith("param_") and name[len("param_"):] not in sampled and pd.notna(value)}
        best = {"trial": int(row["trial"]), "value": float(row["objective"]),
                "params": {k: _plain(v) for k, v in sampled.items()}, "derived_params": derived}
        if bool(row.get("would_stop")):  # a search without stopping: it kept its score, yet counts as collapsed
            epoch = row.get("would_stop_epoch")
            best["would_stop_epoch"] = int(epoch) if pd.notna(epoch) else None

    epochs = frame["epochs_run"].fillna(0.0)
    max_epochs = experiment.max_epochs
    saved = {outcome: float((max_epochs - epochs[frame["outcome"] == outcome]).clip(lower=0).sum())
             for outcome in ("collapsed", "diverged", "stopped")}
    seconds = frame["seconds"]
    per_epoch, pace = epoch_seconds(experiment)
    compute = {
        "trial_epochs_run": float(epochs.sum()),
        "trial_epochs_requested": int(experiment.trials_requested * max_epochs),
        "trial_epochs_of_started_trials": int(len(frame) * max_epochs),
        # Epochs not run because a trial ended early, by outcome: "collapsed" and "diverged" by the
        # collapse rule (and a divergence), "stopped" by the scheduler (ASHA) or an interruption.
        "epochs_saved": saved,
        "epochs_saved_by_collapse_stopping": saved["collapsed"] + saved["diverged"],
        "epochs_saved_by_scheduler": saved["stopped"],
        "epochs_saved_total": float(sum(saved.values())),
        # Over what the trials would have run without early stopping (as hpsearch's summary): a failed
        # trial's unrun epochs are not savings.
        "saved_fraction": float(sum(saved.values()) / (epochs.sum() + sum(saved.values())))
        if epochs.sum() + sum(saved.values()) else 0.0,
        "trial_seconds": float(seconds.fillna(0).sum()),
        "seconds_per_epoch": _json_float(per_epoch),
        "seconds_per_epoch_from": pace,
        "seconds_saved_estimate": _json_float(sum(saved.values()) * per_epoch),
    }

    importances = objective_importances(experiment) + collapse_importances(experiment)

    label_free = label_free_metric = None
    rank = final_rank(experiment)
    for labelled in ("probe_map", "probe_auc"):
        # Complete trials' probe scores: a trial stopped early (collapsed, or by ASHA) may carry the score of
        # its last epoch, which is not the one the rank is compared with.
        scored = (frame["outcome"] == "complete") & frame[labelled].notna() if labelled in frame else None
        if scored is not None and scored.any():
            label_free_metric = labelled
            label_free = spearman_with_interval(rank[scored], frame.loc[scored, labelled])
            break

    finished = frame[frame["outcome"].isin(FINISHED_OUTCOMES)]
    collapsed_count = int(finished["collapsed"].sum())
    low, high = wilson_interval(collapsed_count, len(finished))
    collapse_rate = {"collapsed_or_diverged": collapsed_count, "finished": int(len(finished)),
                     "stopped": int(finished["stopped_for_collapse"].sum()),
                     "would_have_been_stopped": int(finished["would_stop"].sum()),
                     "counted": experiment.collapsed_wording,
                     "rate": _json_float(collapsed_count / len(finished)) if len(finished) else None,
                     "low": _json_float(low), "high": _json_float(high), "interval": "Wilson score, 95 %",
                     # False: the rule could not fire in trials this short, so the rate counts divergences only
                     "rule_could_fire": experiment.rule_could_fire}

    scores = finished["objective"].where(finished["outcome"] == "complete")
    best_low, best_high = bootstrap_best_interval(scores.to_numpy())
    complete_scores = complete["objective"].to_numpy(dtype=float)
    unscored = int((~np.isfinite(scores.to_numpy(dtype=float))).sum())
    sensitivity: dict[str, Any] = {
        "best": best["value"] if best else None, "best_low": _json_float(best_low), "best_high": _json_float(best_high),
        "best_interval": BEST_RANGE_TEXT,
        # The share of such resamples in which no trial has a score (the range is of the others): a search
        # this size ends without a score that often, (unscored / finished) ** finished.
        "best_none_share": _json_float((unscored / len(scores)) ** len(scores)) if len(scores) else None,
        "complete_trials": int(len(complete_scores)),
    }
    if len(complete_scores):
        q25, median, q75 = np.percentile(complete_scores, [25, 50, 75])
        threshold = best["value"] - NEAR_BEST_FRACTION * abs(best["value"])
        near = int((scores >= threshold).sum())
        sensitivity.update(
            median=float(median), iqr=float(q75 - q25),
            near_best=near, near_best_fraction=near / len(finished) if len(finished) else None,
            near_best_definition=f"finished trials scoring within {100 * NEAR_BEST_FRACTION:.0f} % of the best",
        )
    for target in ("objective", "collapse"):
        firsts = {i.evaluator: next(iter(i.values)) for i in importances if i.target == target and i.values}
        evaluator = next((name for name in EVALUATORS if name in firsts), None)
        if evaluator:
            sensitivity[f"most_important_for_{target}"] = firsts[evaluator]
            sensitivity[f"most_important_for_{target}_by"] = evaluator
            # Where the other evaluator puts another parameter first, the ranking is not settled: said beside it.
            others = {name: first for name, first in firsts.items() if first != firsts[evaluator]}
            if others:
                sensitivity[f"most_important_for_{target}_otherwise"] = others

    collapsed = frame[frame["collapsed"]]
    would = collapsed[collapsed["would_stop"]]
    time_to_collapse = {
        "trials": int(len(collapsed)),
        "counted": experiment.collapsed_wording,
        "would_have_been_stopped": int(len(would)),
        "median_would_stop_epoch": _json_float(would["would_stop_epoch"].median()) if len(would) else None,
        "median_collapse_epoch": _json_float(collapsed["collapse_epoch"].median()) if len(collapsed) else None,
        "median_collapse_step": _json_float(collapsed["collapse_step"].median()) if len(collapsed) else None,
        "median_stop_epoch": _json_float(collapsed["stop_epoch"].median()) if len(collapsed) else None,
        "by_type": {str(kind): int(count)
                    for kind, count in collapsed["collapse_type"].fillna("unknown").value_counts().items()},
    }
    if experiment.outside:
        ranges = ", ".join(f"{name} spans {_describe_range(d)} (space {_describe_range(experiment.distributions[name])})"
                           for name, d in experiment.outside.items())
        notes.append(f"enqueued points lie outside the search space: {ranges}; importances use a range widened to the "
                     "trials they are computed on")
    if experiment.unreadable_results:
        bad = sorted(experiment.unreadable_results.items())
        shown = "; ".join(f"#{n}: {why}" for n, why in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        notes.append(f"{len(bad)} trial folder(s)' result.json could not be read ({shown}): the collapse dynamics "
                     "leave those trials out; restore the files (e.g. from a copy of the search) to include them")
    if not experiment.trajectories:
        has_results = experiment.folder is not None and any(Path(experiment.folder).glob("*/result.json"))
        if not experiment.unreadable_results:
            notes.append("no trial folder's result.json holds a completed epoch: the collapse dynamics are missing"
                         if has_results else
                         "no Ray Tune trial folders with result.json were found: the collapse dynamics are missing")
    else:
        epochs_done = pd.to_numeric(frame.get("epochs_completed", pd.Series(dtype=float)), errors="coerce")
        unseen = sorted(int(n) for n, done in zip(frame["trial"], epochs_done)
                        if done >= 1 and int(n) not in experiment.trajectories
                        and int(n) not in experiment.unreadable_results)
        if unseen:
            shown = ", ".join(f"#{n}" for n in unseen[:10]) + (" ..." if len(unseen) > 10 else "")
            notes.append(f"{len(unseen)} trial(s) that completed epochs have no epoch reports in their folder ({shown}): "
                         "the collapse dynamics leave them out (a search killed before Ray copied their folders, "
                         "with code from before 2026-12-03)")
    cut_short = finished[(finished["outcome"] == "stopped") & ~finished["collapsed"]]
    if len(cut_short):
        notes.append(f"{len(cut_short)} trial(s) the scheduler (ASHA) stopped count as not collapsed in the collapse "
                     "rate and the importance for collapse: they ended before a later collapse could show, so the rate "
                     "is a lower bound")
    if not experiment.rule_could_fire:
        settings = experiment.settings
        grace, patience = int(settings["grace_epochs"]), int(settings["patience_epochs"])
        notes.append(f"a grace of {grace} and a patience of {patience} epochs exceed the trials' {experiment.max_epochs} "
                     f"epochs: the collapse rule could not {'stop' if experiment.collapse_stop else 'have stopped'} any "
                     "trial, so only divergences count as collapsed here, and the collapse rate, the importance for "
                     "collapse and the collapse maps say nothing of collapse (search with --max-epochs "
                     f"{grace + patience} or more, or a shorter --grace-epochs or --patience-epochs)")
    if not experiment.collapse_stop:
        notes.append(f"collapse stopping was off in this search (--no-collapse-stop): the "
                     f"{int(finished['would_stop'].sum())} trial(s) the collapse rule would have stopped ran to the "
                     "end and kept their score, and count as collapsed here (collapse rate, importance for collapse, "
                     "collapse rate per parameter, maps, time to collapse)")
    if "verdict" in frame:
        flagged = finished[flagged_verdicts(finished) != ""]
        if len(flagged):
            from hpsearch.settings import STOP_ON_BEFORE_SETTING

            kinds = ", ".join(f"{count} {kind}" for kind, count in flagged["verdict"].value_counts().sort_index().items())
            stopped_kinds = flagged["verdict"].isin(experiment.settings.get("stop_on", STOP_ON_BEFORE_SETTING))
            why = []
            if (~stopped_kinds).any():
                why.append(f"{int((~stopped_kinds).sum())} with a kind the rule does not stop on (--stop-on)")
            if stopped_kinds.any():
                why.append(f"{int(stopped_kinds.sum())} with a kind it stops on, read within the grace period or for "
                           "fewer epochs in a row than the patience")
            notes.append(f"{len(flagged)} complete trial(s) ended with a collapse verdict ({kinds}) and were not "
                         f"stopped: {'; '.join(why)}; flagged, not counted as collapsed")
    return ExperimentAnalysis(
        experiment=experiment, counts=counts, best=best, compute=compute, importances=importances,
        label_free=label_free, label_free_metric=label_free_metric, collapse_rate=collapse_rate,
        sensitivity=sensitivity, time_to_collapse=time_to_collapse, notes=notes,
    )


# ----------------------------------------------------------------------------------------------
# Outputs


def flagged_verdicts(frame: pd.DataFrame) -> pd.Series:
    """Per trial, the collapse verdict a complete trial ended with that did not count as collapsed (a type the
    rule does not stop on, or read within the grace period or for fewer epochs than the patience): "dimensional",
    say; "" for every other trial (and for all, in a search from before the verdict was recorded)."""
    from hpsearch.settings import COLLAPSE_TYPES

    if "verdict" not in frame:
        return pd.Series("", index=frame.index, dtype=object)
    flagged = (frame["outcome"] == "complete") & ~frame["collapsed"].astype(bool) & frame["verdict"].isin(COLLAPSE_TYPES)
    return frame["verdict"].where(flagged, "").astype(object)


def trials_table(analyses: Sequence[ExperimentAnalysis]) -> pd.DataFrame:
    """One row per trial of every experiment: outcome, scores, collapse timing, final label-free
    metrics and every parameter (sampled and derived)."""
    tables = []
    labels = experiment_labels([analysis.experiment for analysis in analyses])
    for analysis, label in zip(analyses, labels):
        experiment = analysis.experiment
        frame = experiment.trials
        table = pd.DataFrame({
            "experiment": label, "method": experiment.method, "trial": frame["trial"],
            "outcome": frame["outcome"],
            # as the report counts it: stopped for collapse or diverged, or (run without stopping) what the rule
            # would have stopped, whose outcome is complete (stopped where ASHA stopped it first)
            "collapsed": frame["collapsed"].astype(bool), "collapse_type": frame["collapse_type"],
            # a complete trial's last collapse verdict that did not count (see flagged_verdicts)
            "flagged": flagged_verdicts(frame),
            "objective_name": experiment.objective, "objective": frame["objective"],
        })
        for column in ("probe_map", "probe_auc", "collapse_epoch", "collapse_step", "stop_epoch", "would_stop_epoch",
                       "epochs_run", "seconds", "error"):
            table[column] = frame[column] if column in frame else np.nan
        table["final_rankme"] = final_rank(experiment)
        occupancy = occupancy_metric(experiment) or OCCUPANCY_METRIC
        table["final_occupancy"] = final_metric(experiment, occupancy)
        # of what: a report of several searches may hold one from before the attainable share was logged
        table["occupancy_of"] = ("min(probe segments, K)" if occupancy == OCCUPANCY_METRIC else "K") \
            if table["final_occupancy"].notna().any() else ""  # a method without prototypes has no occupancy
        for column in sorted(c for c in frame.columns if c.startswith("param_")):
            table[column] = frame[column]
        tables.append(table)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


# The search settings a trial's score depends on (hpsearch.settings.SearchSettings' names), as the comparison
# names them: searches that differ in one are not compared like for like.
SCORE_SETTINGS = {
    "objective": "objective", "data": "data", "root": "--root", "audio_dir": "--audio-dir", "preset": "preset",
    "max_epochs": "epochs per trial", "steps_per_epoch": "steps per epoch", "batch_size": "batch size",
    "probe_segments": "probe segments", "probe_segments_per_track": "probe segments per track",
    "scheduler": "scheduler", "sampler": "sampler",
}


# And those its collapse rate depends on (the collapse rule).
RULE_SETTINGS = {
    "collapse_stop": "collapse stopping", "grace_epochs": "grace epochs", "patience_epochs": "patience epochs",
    "stop_on": "stops on", "thresholds": "--threshold values",
}


def setting_differences(analyses: Sequence[ExperimentAnalysis],
                        settings: dict[str, str] | None = None) -> list[str]:
    """Each of ``settings`` (default :data:`SCORE_SETTINGS`) that the experiments do not share, as
    ``"name (label: value; ...)"`` (a setting a search.json predates is what such a search ran with)."""
    import dataclasses

    from hpsearch.settings import STOP_ON_BEFORE_SETTING, SearchSettings

    defaults = {f.name: f.default for f in dataclasses.fields(SearchSettings) if f.default is not dataclasses.MISSING}
    defaults.update(stop_on=list(STOP_ON_BEFORE_SETTING), thresholds={})  # (before --stop-on: every collapse type)
    labels = [analysis.label or label  # the page's labels, where set
              for analysis, label in zip(analyses, experiment_labels([analysis.experiment for analysis in analyses]))]

    def shown(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value)) or "none"
        if isinstance(value, dict):
            return ", ".join(f"{key} {item}" for key, item in sorted(value.items())) or "the defaults"
        return str(value)

    def setting_of(experiment: Experiment, key: str) -> Any:
        if key == "batch_size" and "batch_size" in experiment.distributions:  # the space's, not the setting (unused)
            return f"sampled from {_describe_range(experiment.distributions['batch_size'])}"
        return experiment.settings.get(key, defaults.get(key))

    differences = []
    for key, name in (SCORE_SETTINGS if settings is None else settings).items():
        values = [setting_of(analysis.experiment, key) for analysis in analyses]
        if len({json.dumps(value, sort_keys=True, default=str) for value in values}) > 1:
            differences.append(f"{name} (" + "; ".join(f"{label}: {shown(value)}"
                                                        for label, value in zip(labels, values)) + ")")
    return differences


def comparison_rows(analyses: Sequence[ExperimentAnalysis]) -> list[dict[str, Any]]:
    """The across-methods comparison, one row per experiment.

    ``best_none_share`` is the share of the best range's resamples in which no trial has a score; where
    it is :data:`BEST_NONE_LIMIT` or more, ``best_low`` is None: the range's lower end is "no score" (the
    range of the resamples with a score would make a search that mostly collapsed look the steadiest)."""
    rows = []
    labels = experiment_labels([analysis.experiment for analysis in analyses])
    for analysis, label in zip(analyses, labels):
        experiment = analysis.experiment
        none_share = analysis.sensitivity.get("best_none_share")
        row = {
            "experiment": label, "method": experiment.method, "objective": experiment.objective,
            "trials": int(len(experiment.trials)),
            **{key: analysis.sensitivity.get(key) for key in ("best", "best_low", "best_high", "median", "iqr",
                                                               "near_best_fraction", "most_important_for_objective",
                                                               "most_important_for_collapse",
                                                               "most_important_for_objective_otherwise",
                                                               "most_important_for_collapse_otherwise")},
            "best_none_share": none_share,
            "collapse_rate": analysis.collapse_rate["rate"], "collapse_low": analysis.collapse_rate["low"],
            "collapse_high": analysis.collapse_rate["high"],
            "collapse_rule_could_fire": analysis.collapse_rate["rule_could_fire"],
        }
        if none_share is not None and none_share >= BEST_NONE_LIMIT:
            row["best_low"] = None
        rows.append(row)
    return rows


REPORT_SUFFIXES = (".html", ".htm")


def output_paths(report: Path) -> dict[str, Path]:
    """Where the report's companions go: ``<stem>.json``, ``<stem>-trials.csv``, ``<stem>-figures/``."""
    return {"html": report, "json": report.with_suffix(".json"),
            "csv": report.with_name(f"{report.stem}-trials.csv"), "png": report.with_name(f"{report.stem}-figures")}


def check_report_path(report: Path, formats: Sequence[str] = ("html",)) -> dict[str, Path]:
    """The report's output paths; :class:`ReportError` unless ``report`` names an HTML file (``.html``
    or ``.htm``, not a folder), so that the report, its JSON, its CSV and its figure folder are four
    different paths (``--out r.json`` would write the HTML and then the JSON over it), and unless
    they can all be written: the JSON and the CSV replace only an earlier report's (``--out
    runs/x/search.html`` would write its JSON over the search's ``search.json``), and no file stands
    where a folder goes."""
    report = Path(report)
    if report.is_dir():
        raise ReportError(f"--out {report}: is a folder; give the HTML file to write, e.g. {report / 'sensitivity.html'}")
    if report.suffix.lower() not in REPORT_SUFFIXES:
        suggestion = report.with_name(f"{report.stem if report.suffix else report.name}.html")
        raise ReportError(
            f"--out {report}: name the HTML report, ending in .html (e.g. --out {suggestion}); its summary and "
            "trials table are written next to it as <stem>.json and <stem>-trials.csv"
        )
    paths = output_paths(report)
    if len(set(paths.values())) < len(paths):  # cannot happen with an .html suffix; a guard
        raise ReportError(f"--out {report}: the report and its companions would share a path")
    for folder in (report.parent, *report.parent.parents):  # the nearest that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                kind = "a file" if folder.is_file() else "not a folder"
                raise ReportError(f"--out {report}: {folder} is {kind}, so the folder cannot be made there; "
                                  f"give --out a path in a folder, e.g. --out {report.name}")
            try:  # now, not after the analysis (a file made and removed at once: nothing stays)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as error:
                raise ReportError(f"--out {report}: cannot write in {folder} ({error.strerror or error}); give --out "
                                  "a path in a folder you can write in") from None
            break
    if report.exists() and not _an_earlier_report(report, "html"):
        raise ReportError(f"--out {report}: would replace {report.name} in {report.parent}, which is not a sensitivity "
                          f"report; give the report another name, e.g. --out {_another_name(report)}")
    for kind in ("json", "csv"):
        if paths[kind].is_dir():
            raise ReportError(f"--out {report}: {paths[kind]}, where the report's {kind.upper()} goes, is a folder")
        if paths[kind].exists() and not _an_earlier_report(paths[kind], kind):
            whose = ("the search's own" if (paths[kind].parent / SEARCH_FILE).is_file() else "the file")
            raise ReportError(
                f"--out {report}: the report's {kind.upper()} would replace {whose} {paths[kind].name} in "
                f"{paths[kind].parent}, which is not a report's; give the report another name, e.g. --out "
                f"{_another_name(report)}"
            )
    if "png" in formats and paths["png"].exists() and not paths["png"].is_dir():
        raise ReportError(f"--out {report}: {paths['png']}, the folder the figures go in with --format png, is a file; "
                          "move it away or give another --out")
    return paths


def _another_name(report: Path) -> Path:
    """A report name to suggest in place of ``report``, whose page or companions are someone else's files."""
    return report.with_name("sensitivity.html" if report.name != "sensitivity.html" else "sensitivity-report.html")


def _report_folder(folder: Path) -> bool:
    """Whether ``folder`` is not a search but holds a report of this command (its page, JSON or trials CSV, by
    their content): such as the default ``report/`` next to the searches, which a glob like ``runs/*`` takes in."""
    kinds = {".html": "html", ".htm": "html", ".json": "json", ".csv": "csv"}
    try:
        if not folder.is_dir() or (folder / SEARCH_FILE).exists():
            return False
        files = [path for path in folder.iterdir() if path.suffix.lower() in kinds and path.is_file()]
    except OSError:
        return False
    return any(_an_earlier_report(path, kinds[path.suffix.lower()]) for path in files)


def _an_earlier_report(path: Path, kind: str) -> bool:
    """Whether ``path`` is the page, the JSON summary or the trials CSV of a report (which a new report may
    replace), by its content: any other file there is someone's, and is kept."""
    try:
        if kind == "csv":
            with open(path, encoding="utf-8") as stream:
                return stream.readline().startswith(REPORT_CSV_START)
        if kind == "html":  # the page's head, which names it
            with open(path, encoding="utf-8", errors="replace") as stream:
                return REPORT_HTML_TITLE in stream.read(4096)
        written = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(written, dict) and {"generated", "report", "experiments"} <= written.keys()


def write_report(analyses: Sequence[ExperimentAnalysis], report: Path, formats: Sequence[str] = ("html",),
                 stream=None) -> dict[str, Any]:
    """Write the HTML report, its JSON summary and trials CSV (and PNGs if asked); returns the
    summary dict. A PNG export that cannot run is reported in ``summary['png']`` with the fix."""
    from analysis.sensitivity_figures import build_page, export_pngs, keyed

    report = Path(report)
    paths = check_report_path(report, formats)
    analyses = keyed(analyses)  # the names the page shows, for the JSON too
    report.parent.mkdir(parents=True, exist_ok=True)
    page, figures = build_page(analyses)
    summary = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "report": str(paths["html"]),
        "trials_csv": str(paths["csv"]),
        "figures": [{"id": figure.key, "title": figure.title, "experiment": figure.experiment} for figure in figures],
        "experiments": [analysis.to_dict() for analysis in analyses],
        "comparison": comparison_rows(analyses) if len(analyses) > 1 else [],
    }
    if "png" in formats:
        try:
            summary["png"] = export_pngs(figures, paths["png"])
        except KeyboardInterrupt as stop:  # kaleido takes seconds: a stop then leaves the figures it exported
            stop.pngs_in = paths["png"]
            raise
    table = trials_table(analyses)
    # Each file whole or not at all (a full disk leaves no cut-short report), and the three together: a
    # Ctrl-C or SIGTERM here takes effect once they are written, not between the report and its summary.
    try:
        with held_signals():
            write_whole(paths["html"], page)
            with whole(paths["csv"]) as partial:
                table.to_csv(partial, index=False)
            write_whole(paths["json"], json.dumps(summary, indent=2, default=_json_default) + "\n")
    except KeyboardInterrupt as stop:  # raised as the block ends: the files are written
        stop.report_written = paths["html"]
        raise
    return summary


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return _plain(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description=(
            "Sensitivity report of hyperparameter searches: one self-contained HTML file (opens offline) with "
            "outcome counts, parameter importances for the objective and for collapse, per-parameter effects, "
            "two-parameter maps, collapse dynamics, label-free vs labelled scores, parallel coordinates, "
            "optimisation history and, for several searches, a comparison across methods; plus a JSON summary "
            "and a CSV of every trial next to it. Collapsed and diverged trials are included throughout."
        ),
    )
    parser.add_argument("experiments", nargs="*", metavar="RUN_DIR",
                        help="experiment folders written by python -m hpsearch.run (default: the latest search of "
                        "each method under --storage-dir)")
    parser.add_argument("--storage-dir", help="where searches live, for the default RUN_DIRs and the default --out, "
                        "when no RUN_DIR is given (default: runs)")
    parser.add_argument("--out", help=f"the HTML report to write, ending in .html or .htm (default: {DEFAULT_REPORT.as_posix()} "
                        "in the folder holding the first RUN_DIR, or in --storage-dir); <stem>.json and <stem>-trials.csv "
                        "go next to it")
    parser.add_argument("--format", choices=("html", "png"), action="append", dest="formats",
                        help="html (always written), png: also every figure as an image in <stem>-figures/ (needs "
                        "kaleido and Chrome/Chromium); repeatable")
    return parser


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    """One line per experiment, named as in the report (told apart by the parent folder where two
    share a name). Trials the collapse rule would have stopped (a --no-collapse-stop search) count as
    collapsed in the report, and the line says how many there are."""
    lines = []
    for experiment in summary["experiments"]:
        counts = ", ".join(f"{count} {name}" for name, count in experiment["counts"].items())
        rate = experiment["collapse_rate"]
        would = rate["would_have_been_stopped"]
        stopping = experiment.get("collapse_stop", True)
        if would or not stopping:
            counts += f"; the collapse rule would have stopped {would} of them"
            if not stopping:
                counts += ", but stopping was off"
            counts += f": {rate['collapsed_or_diverged']} of {rate['finished']} finished count as collapsed"
        best = experiment["best"]
        best_text = (f"best #{best['trial']} {experiment['objective']} {best['value']:.4f}{_would_stop_text(best)}"
                     if best else "no trial complete")
        lines.append(f"{experiment['name']} ({experiment['method']}): {experiment['trials']} trials ({counts}); {best_text}")
    return lines


def _would_stop_text(best: dict[str, Any]) -> str:
    """`` (one the collapse rule would have stopped ...)`` for a best trial of a search without stopping that
    counts as collapsed (it ran to the end and kept its score), else ``""``."""
    if "would_stop_epoch" not in best:
        return ""
    epoch = best["would_stop_epoch"]
    return (f" (the collapse rule would have stopped it{f' at epoch {epoch}' if epoch is not None else ''}; with "
            "stopping off it ran to the end: it counts as collapsed, and scored)")


def _refuse_repeats(folders: Sequence[str | Path]) -> None:
    """:class:`ReportError` if a folder is given twice, under the same spelling or another one
    (``runs/a``, ``./runs/../runs/a``, a link to it): it would be reported twice."""
    seen: dict[Path, str | Path] = {}
    for folder in folders:
        try:
            resolved = Path(folder).expanduser().resolve()
        except (OSError, RuntimeError):  # e.g. a symlink loop; load_experiment says what is wrong
            resolved = Path(folder).expanduser().absolute()
        if resolved in seen:
            first = seen[resolved]
            same = (f"{folder}: the same experiment folder was given twice" if str(first) == str(folder) else
                    f"{first} and {folder}: the same experiment folder was given twice ({resolved})")
            raise ReportError(f"{same}; give each folder once")
        seen[resolved] = folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = sys.argv[1:] if argv is None else list(argv)
    # RUN_DIRs before, between or after the options; after "--" (a folder named like an option), as they come
    args = parse_mixed(parser, arguments, "experiments")
    formats = args.formats or ["html"]
    if args.storage_dir is not None and not args.storage_dir.strip():
        parser.error("--storage-dir is empty; give the folder that holds the searches (default: runs)")
    if args.out is not None and not args.out.strip():
        parser.error(f"--out is empty; give the HTML file to write, e.g. --out {DEFAULT_REPORT.as_posix()}")
    if args.storage_dir is not None and args.experiments:
        print(f"{PROG}: note: --storage-dir is not used when RUN_DIRs are given (the report goes next to the first "
              "of them, or to --out)", file=sys.stderr)
    storage_dir = args.storage_dir if args.storage_dir is not None else "runs"
    try:
        with sigterm_interrupts():
            return _write_the_report(args, formats, storage_dir)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: one line; the report's files are written all or none
        written, pngs = getattr(stop, "report_written", None), getattr(stop, "pngs_in", None)
        if written:
            said = f" after the report was written; it is complete: {written}"
        else:
            said = ", no report written" + (f" (the PNG figures exported so far are in {pngs})" if pngs else "")
        print(f"\n{PROG}: interrupted{said}", file=sys.stderr)
        return exit_code(stop)  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    except BrokenPipeError:  # an output closed before the report was written (stderr): it may be cut short
        silence_closed_output()
        return 1


def _write_the_report(args: argparse.Namespace, formats: list[str], storage_dir: str) -> int:
    out: Path | None = None  # the report, once known
    try:
        unreadable: list[str] = []
        folders = [Path(p) for p in args.experiments] or default_experiments(storage_dir, unreadable)
        for problem in unreadable:
            print(f"{PROG}: note: left out: {problem}", file=sys.stderr)
        _refuse_repeats(args.experiments or folders)
        if args.experiments:
            reports = [folder for folder in folders if _report_folder(folder)]
            if reports and len(reports) < len(folders):  # runs/* after a first report: its report/ folder too
                for folder in reports:
                    print(f"{PROG}: note: left out: {folder}: the folder of an earlier report, not a search",
                          file=sys.stderr)
                folders = [folder for folder in folders if folder not in reports]
            elif reports:
                raise ReportError(f"{reports[0]}: the folder of an earlier report, not a search folder; give the "
                                  "searches' folders, such as runs/vicreg-<time>/")
            experiments = [load_experiment(folder) for folder in folders]
        else:  # the latest search of each method: one that cannot be read yet (no trial: it just started) or at all
            experiments, left_out = [], []  # (a damaged journal) is left out, said so, and the others are shown
            for folder in folders:
                try:
                    experiments.append(load_experiment(folder))
                except ReportError as error:
                    left_out.append(error)
            if not experiments:
                raise left_out[0]
            for error in left_out:
                print(f"{PROG}: note: left out: {error}", file=sys.stderr)
        if args.out is not None:
            out = Path(args.out).expanduser()
        elif args.experiments:  # next to the experiments given, as it would be next to runs/'s
            out = experiments[0].folder.parent / DEFAULT_REPORT
        else:
            out = Path(storage_dir).expanduser() / DEFAULT_REPORT
        check_report_path(out, formats)  # before the analysis, which can take a while
        analyses = [analyse(experiment) for experiment in experiments]
        summary = write_report(analyses, out, formats)
    except ReportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a write that fails names no file (a full disk): the report does
        print(f"{PROG}: error: {error.filename or out or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
    paths = output_paths(out)
    png = summary.get("png") or {}
    try:  # the report is written: a stop or a closed output from here on leaves it whole, and says so
        for line in _summary_lines(summary):
            print(line)
        for experiment in summary["experiments"]:  # what the report says it could not show, or shows with care
            for note in experiment.get("notes", []):
                print(f"{experiment['name']}: note: {note}")
        print(f"report: {paths['html']}\nsummary: {paths['json']}\ntrials: {paths['csv']}")
        if png.get("written") is not None and not png.get("reason"):
            removed = f" (removed {len(png['removed'])} of an earlier report)" if png.get("removed") else ""
            print(f"figures: {len(png['written'])} PNG files in {paths['png']}{removed}")
        sys.stdout.flush()  # here, where a closed pipe is caught, not as Python exits
    except KeyboardInterrupt as stop:
        stop.report_written = paths["html"]
        raise
    except BrokenPipeError:  # piped into a command that stopped reading (| head): the exit status stays the report's
        silence_closed_output()
    if png.get("reason"):  # not exported, or only in part: the figures' folder is not this report's
        done = f" after {len(png['written'])} of {len(summary['figures'])} figures" if png.get("written") else ""
        print(f"{PROG}: PNG export {'failed' + done if done else 'skipped'}: {png['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
