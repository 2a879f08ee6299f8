"""A search's results on disk: ``trials.csv``, the best checkpoint, and the summary.

Everything here reads the Optuna journal (the study is the record of what each trial did) and the
Ray trial folders (where checkpoints live); nothing needs Ray running.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from optuna.storages.journal import JournalFileBackend

from hpsearch.settings import COLLAPSE_TYPES
from musicssl.paths import whole, write_whole

__all__ = [
    "JOURNAL_FILE",
    "STUDY_NAME",
    "TRIALS_FILE",
    "BEST_BACKBONE_FILE",
    "BEST_CONFIG_FILE",
    "SearchJournal",
    "SearchSummary",
    "drop_unfinished_record",
    "journal_storage",
    "load_study",
    "trials_frame",
    "write_trials_csv",
    "summarize",
    "format_summary",
    "finished_records",
    "export_best_checkpoint",
    "NO_FINAL_REPORT",
    "trial_error",
    "trial_folder_name",
]

JOURNAL_FILE = "optuna.journal"
STUDY_NAME = "search"
TRIALS_FILE = "trials.csv"
BEST_BACKBONE_FILE = "best_backbone.pt"

# Where a search's splits come from, as its messages about too few valid tracks say.
SPLITS_HINT = "(a tags file's split column; without one, splits are drawn 70/10/20)"


def splits_hint(data: str | None) -> str:
    """How the valid split of ``--data`` gets more tracks: a tags file's split column, or, for a named dataset,
    which keeps its official splits, more of its valid tracks' audio."""
    from musicssl.data.loaders import dataset_name

    name = dataset_name(data) if data else None
    if name is None or name == "corpus":
        return SPLITS_HINT
    return (f"({name} keeps its official splits: its valid split holds more tracks only as more of their audio is "
            "found; or train on a tags file of your own, whose split column you choose)")
BEST_CONFIG_FILE = "best_config.json"
SUMMARY_FILE = "summary.json"
CONFIG_KEY = "optuna_trial"
ERROR_FILE = "error.txt"  # Ray Tune's record of a trial's failures, in its folder
# The error of a failed trial that reported none (its worker died): its error.txt says why.
NO_FINAL_REPORT = f"the trial ended without its final report (see {ERROR_FILE} in its Ray trial folder)"
# That error in the study, as this and earlier versions of the searcher wrote it.
_UNEXPLAINED = (NO_FINAL_REPORT, "the trial raised an exception (see error.txt in its Ray trial folder)")
OUTCOME_ORDER = ("complete", "collapsed", "diverged", "failed", "stopped", "running")

_COLUMNS_FIRST = (
    "trial", "state", "outcome", "objective", "best_objective", "best_epoch", "probe_map", "probe_auc",
    "rankme", "verdict", "collapse_type", "collapse_epoch", "collapse_step", "stop_epoch", "would_stop_epoch",
    "epochs_run", "epochs_completed", "steps", "seconds", "cpu_seconds", "device", "precision", "collapse_reasons",
    "diverged_step", "error",
)  # fmt: skip


def drop_unfinished_record(journal: str | Path) -> int:
    """Cut off the record at the end of ``journal`` that a write left unfinished (no line end: a disk
    that filled, or a kill, in the middle of the write). Optuna never reads such a record, but appends
    the next one onto it, and the journal can then no longer be read. Returns the bytes cut off."""
    with open(journal, "rb+") as stream:
        size = position = stream.seek(0, os.SEEK_END)
        while position > 0:
            start = max(position - 65536, 0)
            stream.seek(start)
            block = stream.read(position - start)
            end = block.rfind(b"\n")
            if end >= 0:
                position = start + end + 1
                break
            position = start
        if position == size:  # ends with a line end (or is empty): whole
            return 0
        stream.truncate(position)
        stream.flush()
        os.fsync(stream.fileno())
    return size - position


class SearchJournal(JournalFileBackend):
    """Optuna's journal file, except that a write that fails (a full disk) or is cut short (Ctrl-C) leaves
    no unfinished record behind for the next write to be appended onto."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        try:
            super().append_logs(logs)
        except BaseException:
            # After Optuna's lock: the search's driver is the journal's only writer (its folder is locked).
            with contextlib.suppress(OSError):
                drop_unfinished_record(self._file_path)
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickled with the study (Ray Tune saves the searcher with it), Optuna's backend keeps the byte offset of
        # every record it had read. They hold only while the file has only grown since: in a journal that lost
        # records (a machine that stopped before they reached the disk, an older copy put back) they point into
        # the middle of another record, and every read failed. The file is read from its start instead.
        self.__dict__.update(state)
        self._log_number_offset = {0: 0}


def drop_stale_journal_lock(journal: str | Path) -> bool:
    """Remove the lock Optuna's journal writers take (``optuna.journal.lock``, a symbolic link to the journal),
    where one is left; whether one was. Call it only while holding the search's folder lock: the search's
    driver is then the journal's only writer, so a lock found is one a killed driver left. Optuna waits 30 s
    before it takes such a lock over, and never where the link's target is gone (the search's folder moved):
    it looked at the target's time in a loop, for good, at full CPU."""
    lock = Path(f"{journal}.lock")
    if not os.path.lexists(lock):
        return False
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return True


def journal_storage(journal: str | Path):
    """The Optuna storage of the journal file ``journal``, through :class:`SearchJournal`."""
    from optuna.storages import JournalStorage

    return JournalStorage(SearchJournal(str(journal)))


def load_study(journal: str | Path, study_name: str = STUDY_NAME):
    """The search's Optuna study, read from its journal file."""
    import optuna

    journal = Path(journal)
    if not journal.is_file():
        raise FileNotFoundError(f"{journal}: no Optuna journal here (not a search folder?)")
    return optuna.load_study(study_name=study_name, storage=journal_storage(journal))


def trials_frame(study) -> pd.DataFrame:
    """One row per Optuna trial: number, state, outcome, scores, collapse, epochs, seconds, params.

    Parameters appear as ``param_<name>``: the sampled ones (as Optuna records them) and the
    derived ones the trainer received (e.g. ``param_base_ema_rate`` next to
    ``param_one_minus_ema_rate``). The last epoch's metrics appear as ``last_<metric>``.
    """
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        row.update({key: attrs.get(key) for key in _COLUMNS_FIRST[2:]})
        if trial.state.name == "RUNNING":
            row["outcome"] = "running"
        elif trial.state.name == "WAITING":
            row["outcome"] = "waiting"
        if trial.state.name == "COMPLETE":
            row["objective"] = trial.value
        params = dict(attrs.get("config") or {})
        params.update(trial.params)
        row.update({f"param_{name}": value for name, value in sorted(params.items())})
        row.update({f"last_{name}": value for name, value in sorted((attrs.get("last_metrics") or {}).items())})
        row["datetime_start"] = trial.datetime_start
        row["datetime_complete"] = trial.datetime_complete
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(_COLUMNS_FIRST))
    return frame.sort_values("trial").reset_index(drop=True) if rows else frame


def write_trials_csv(study, folder: Path) -> pd.DataFrame:
    """Write ``trials.csv`` (see :func:`trials_frame`) into ``folder`` and return the frame.

    A failed trial that reported no error of its own (its worker process died) has, in its ``error``
    column, the cause Ray's ``error.txt`` in its folder gives (:func:`trial_error`), once Ray has put
    that file into the search's folder (at the latest when the search ends)."""
    frame = trials_frame(study)
    if len(frame):
        unexplained = frame["error"].isin(_UNEXPLAINED)
        for position in frame.index[unexplained]:
            found = next(filter(None, map(trial_error, _trial_folders(Path(folder), int(frame.at[position, "trial"])))),
                         None)
            if found:
                frame.at[position, "error"] = found
    with whole(Path(folder) / TRIALS_FILE) as partial:  # rewritten after each trial: never left cut short
        frame.to_csv(partial, index=False)
    return frame


@dataclass
class SearchSummary:
    """What a search produced, in numbers."""

    method: str
    objective: str
    trials_requested: int
    trials_finished: int
    counts: dict[str, int]
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    trial_epochs_run: float
    trial_epochs_requested: int
    epochs_saved: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    best_backbone: str | None = None
    # The objective of an untrained backbone, when measured (for a probe objective, the bar training has to
    # clear; for rankme a reference only, as training often lowers it): its BatchNorm statistics measured
    # on the training tracks, the state training leaves them in.
    untrained_value: float | None = None
    # The same backbone with its initial BatchNorm statistics (mean 0, variance 1), for comparison.
    untrained_value_initial_bn: float | None = None
    # Complete trials whose last verdict was a collapse the rule did not stop on (e.g. dimensional): how many
    # of each type, and their numbers.
    flagged: dict[str, int] = field(default_factory=dict)
    flagged_trials: dict[str, list[int]] = field(default_factory=dict)
    # The names in ``best_params`` the sampler drew; the others were derived from them or held fixed by the
    # space (empty where not known: all are shown as parameters).
    best_sampled: list[str] = field(default_factory=list)
    # With collapse stopping off (--no-collapse-stop): trials the rule would have stopped, and the
    # trial-epochs that would have saved.
    would_stop: int = 0
    would_save_epochs: float = 0.0
    # The best trial's last collapse verdict, when it is one (e.g. "dimensional"), and, with collapse
    # stopping off, what the rule found in it if it would have stopped it (collapse_type,
    # collapse_epoch, would_stop_epoch) and the best complete trial it would have let run.
    best_verdict: str | None = None
    best_would_stop: dict[str, Any] | None = None
    best_let_run_trial: int | None = None
    best_let_run_value: float | None = None
    # --data, as the search was started with (for advice that depends on it).
    data: str | None = None

    @property
    def trial_epochs_without_stopping(self) -> float:
        """What the trials run so far would have cost had none been stopped early."""
        return self.trial_epochs_run + sum(self.epochs_saved.values())

    @property
    def saved_fraction(self) -> float:
        """Saved trial-epochs over what the finished trials would have run without early stopping (an
        interrupted search's trials not yet run are not savings, nor a failed trial's unrun epochs)."""
        total = self.trial_epochs_without_stopping
        return sum(self.epochs_saved.values()) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["saved_fraction"] = self.saved_fraction
        values["trial_epochs_without_stopping"] = self.trial_epochs_without_stopping  # the fraction's base
        return values


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def summarize(frame: pd.DataFrame, method: str, objective: str, trials: int, max_epochs: int) -> SearchSummary:
    """Counts by outcome, the best complete trial, and trial-epochs run against those requested.

    Epochs are counted as optimiser steps / steps per epoch, so a trial that diverged mid-epoch
    counts its fraction. Trials not finished count their epochs so far; the requested total is
    ``trials * max_epochs``.
    """
    counts = {name: 0 for name in OUTCOME_ORDER}
    # A trial without an outcome (not one this searcher wrote) counts as stopped, here and in the savings.
    outcomes = frame.get("outcome", pd.Series(dtype=object)).fillna("stopped")
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    finished = int(sum(count for name, count in counts.items() if name not in ("running", "waiting")))
    complete = frame[(frame.get("state") == "COMPLETE")] if len(frame) else frame
    best_trial = best_value = best_verdict = best_would_stop = let_run_trial = let_run_value = None
    best_params: dict[str, Any] = {}
    if len(complete):
        best = complete.loc[complete["objective"].astype(float).idxmax()]
        best_trial, best_value = int(best["trial"]), float(best["objective"])
        best_params = {
            name[len("param_"):]: (value.item() if hasattr(value, "item") else value)
            for name, value in best.items()
            if name.startswith("param_") and not (isinstance(value, float) and math.isnan(value))
        }
        if best.get("verdict") in COLLAPSE_TYPES:
            best_verdict = str(best["verdict"])
        # With stopping off, a collapsed trial can be the best: a probe can still score a backbone whose
        # head found the trivial solution (benchmarks/README.md, "Collapse stopping on the paper preset").
        stop_epoch = _float(best.get("would_stop_epoch"))
        if stop_epoch is not None:
            epoch = _float(best.get("collapse_epoch"))
            best_would_stop = {
                "collapse_type": best.get("collapse_type"),
                "collapse_epoch": None if epoch is None else int(epoch),
                "would_stop_epoch": int(stop_epoch),
            }
            let_run = complete[pd.to_numeric(complete["would_stop_epoch"], errors="coerce").isna()]
            if len(let_run):
                other = let_run.loc[let_run["objective"].astype(float).idxmax()]
                let_run_trial, let_run_value = int(other["trial"]), float(other["objective"])
    epochs = pd.to_numeric(frame.get("epochs_run", pd.Series(dtype=float)), errors="coerce").fillna(0.0)
    saved: dict[str, float] = {}
    for outcome in ("collapsed", "diverged", "stopped"):
        mask = outcomes == outcome
        saved[outcome] = float((max_epochs - epochs[mask]).clip(lower=0).sum()) if len(frame) else 0.0
    flagged: dict[str, int] = {}
    flagged_trials: dict[str, list[int]] = {}
    if len(frame) and "verdict" in frame:
        ended = frame[(frame.get("outcome") == "complete") & frame["verdict"].isin(COLLAPSE_TYPES)]
        flagged_trials = {str(name): sorted(int(number) for number in numbers)
                          for name, numbers in ended.groupby("verdict")["trial"]}
        flagged = {name: len(numbers) for name, numbers in flagged_trials.items()}
    # Only trials that ran to the end: one a scheduler stopped, or that failed or still runs, would not
    # have cost its remaining epochs anyway.
    would = pd.to_numeric(frame.get("would_stop_epoch", pd.Series(dtype=float)), errors="coerce")
    would = would[frame.get("outcome", pd.Series(dtype=object)) == "complete"].dropna() if len(frame) else would
    return SearchSummary(
        method=method,
        objective=objective,
        trials_requested=trials,
        trials_finished=finished,
        counts={name: count for name, count in counts.items() if count or name in OUTCOME_ORDER[:4]},
        best_trial=best_trial,
        best_value=best_value,
        best_params=best_params,
        trial_epochs_run=float(epochs.sum()),
        trial_epochs_requested=trials * max_epochs,
        epochs_saved=saved,
        flagged=flagged,
        flagged_trials=flagged_trials,
        would_stop=int(len(would)),
        would_save_epochs=float((epochs[would.index] - would).clip(lower=0).sum()),
        best_verdict=best_verdict,
        best_would_stop=best_would_stop,
        best_let_run_trial=let_run_trial,
        best_let_run_value=let_run_value,
    )


def format_summary(summary: SearchSummary) -> str:
    """A few lines for the console."""
    # Printed when the search has ended: a trial the study still lists as running stopped with it.
    counts = ", ".join(f"{count} {'unfinished' if name == 'running' else name}" for name, count in summary.counts.items())
    lines = [f"{summary.method}: {summary.trials_finished}/{summary.trials_requested} trials finished ({counts})"]
    if summary.best_trial is not None:
        lines.append(f"best: trial #{summary.best_trial}, {summary.objective} {summary.best_value:.4f}")

        def listed(names) -> str:
            return ", ".join(f"{name}={value:.4g}" if isinstance(value := summary.best_params[name], float)
                             else f"{name}={value}" for name in sorted(names))

        sampled = [name for name in summary.best_sampled if name in summary.best_params] or list(summary.best_params)
        lines.append(f"  params: {listed(sampled)}")
        others = set(summary.best_params) - set(sampled)
        if others:
            lines.append(f"  derived or fixed by the space: {listed(others)}")
        if summary.best_would_stop:
            found = summary.best_would_stop
            lines.append(
                f"  collapsed: the rule reads {found['collapse_type']} collapse in it from epoch {found['collapse_epoch']} "
                f"and would have stopped it at epoch {found['would_stop_epoch']}"
                + ("" if summary.best_verdict == found["collapse_type"] else
                   f", and its last epoch's verdict is {summary.best_verdict or 'none'}")
                + " (a probe can still score a collapsed backbone well)"
                + ("" if summary.best_let_run_trial is None else
                   f"; the best trial it lets run: #{summary.best_let_run_trial}, "
                   f"{summary.objective} {summary.best_let_run_value:.4f}"))
        elif summary.best_verdict:
            lines.append(f"  its last epoch's collapse verdict: {summary.best_verdict} (trials.csv's verdict column)")
    else:
        lines.append("best: no trial completed")
    if summary.untrained_value is not None:
        initial = ("" if summary.untrained_value_initial_bn is None
                   else f"; {summary.untrained_value_initial_bn:.4f} with its initial statistics")
        lines.append(f"reference: an untrained backbone scores {summary.objective} {summary.untrained_value:.4f} "
                     f"(BatchNorm statistics from the training tracks, as training leaves them{initial})")
        if summary.objective == "rankme":  # label-free: a backbone that has learned nothing can spread widest
            lines.append("  a reference, not a bar: an untrained backbone's embedding is often of higher rank than a "
                         "trained one's, and RankMe ranks trained settings against each other")
        elif summary.best_value is not None and summary.best_value <= summary.untrained_value >= 1.0:
            lines.append(  # probe_map and probe_auc are at most 1: nothing can score above it
                "  no trial scored above it, and it scores the most the objective gives: the valid tracks cannot tell "
                f"these settings apart; give the valid split more tracks {splits_hint(summary.data)}"
            )
        elif summary.best_value is not None and summary.best_value <= summary.untrained_value:
            lines.append(
                "  no trial scored above it: at this training length the search ranks settings by how they start "
                "to learn; give trials more steps (--max-epochs, --steps-per-epoch) for finished representations"
            )
    saved = ", ".join(f"{value:.1f} by {name}" for name, value in summary.epochs_saved.items() if value)
    if summary.trial_epochs_without_stopping > 0:  # nothing to say before a trial has finished
        lines.append(
            f"compute: {summary.trial_epochs_run:.1f} of {summary.trial_epochs_without_stopping:.1f} trial-epochs "
            f"run by the finished trials ({100 * summary.saved_fraction:.0f}% saved{': ' + saved if saved else ''})"
        )
    if summary.would_stop:
        lines.append(f"collapse stop off: the rule would have stopped {summary.would_stop} trial(s), saving "
                     f"{summary.would_save_epochs:.1f} trial-epochs (trials.csv's would_stop_epoch)")
    if summary.flagged:
        flagged = "; ".join(f"{count} {name}" + _trial_numbers(summary.flagged_trials.get(name, []))
                            for name, count in summary.flagged.items())
        reasons = "collapse stopping off, " if summary.would_stop else ""
        lines.append(f"flagged, not stopped: {flagged} (trials that ran to the end with a collapse verdict on "
                     f"their last epoch: {reasons}a type --stop-on ignores, or one still within the grace period or "
                     "shorter than the patience; see trials.csv's verdict column)")
    if summary.seconds is not None:
        lines.append(f"time: {summary.seconds / 60:.1f} min")
    if summary.best_backbone:
        lines.append(f"best backbone: {summary.best_backbone}")
        folder = shlex.quote(str(Path(summary.best_backbone).parent))
        lines.append(f"  its settings, trained for longer: python -m musicssl.train --from {folder} --max-epochs N")
    return "\n".join(lines)


def _trial_numbers(numbers: list[int], shown: int = 8) -> str:
    """``: #3, #7``: trials by number, the first ``shown`` of them ("" for none)."""
    if not numbers:
        return ""
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return ": " + ", ".join(f"#{number}" for number in numbers[:shown]) + more


def finished_records(study) -> dict[int, dict[str, Any]]:
    """Final records of the study's finished trials, keyed by trial number (what a resumed Tune
    trial reports instead of training again, see :func:`hpsearch.trainable.run_trial`)."""
    from optuna.trial import TrialState

    records = {}
    for trial in study.get_trials(deepcopy=False):
        if not trial.state.is_finished():
            continue
        attrs = dict(trial.user_attrs)
        record = {k: v for k, v in attrs.items() if k not in ("config", "last_metrics", "tune_trial_id")}
        record.update(attrs.get("last_metrics") or {})
        # A stopped (PRUNED) trial's value is Optuna's: its last intermediate value. Its own final report had none.
        complete = trial.state == TrialState.COMPLETE and trial.value is not None
        record["objective"] = trial.value if complete else math.nan
        record["epoch"] = attrs.get("epochs_completed", 0)
        record["step"] = attrs.get("steps", 0)
        records[trial.number] = {k: (math.nan if v is None else v) for k, v in record.items()}
    return records


def trial_folder_name(number: int | None, trial_id: str) -> str:
    """``trial-<Optuna number>-<Tune id>``, the name of a trial's folder in the search's folder (Tune's default
    spells out every parameter)."""
    return f"trial-{number:04d}-{trial_id}" if isinstance(number, int) else f"trial-{trial_id}"


def trial_error(folder: Path | str | None) -> str | None:
    """Why the trial whose folder is ``folder`` failed, in one line, from Ray Tune's ``error.txt`` there (its last
    failure); None where there is no such file.

    A trial whose worker process died (killed, out of memory, a crash) has no exception of its own: Ray's
    text says the actor died, and this says so in a person's words. Else the exception's last line (its type and
    message), as a traceback ends."""
    if folder is None:
        return None
    folder = Path(folder)
    try:
        text = (folder / ERROR_FILE).read_text(errors="replace")
    except OSError:
        return None
    blocks = text.split("Failure # ")
    lines = [line.rstrip() for line in blocks[-1].splitlines()[1 if len(blocks) > 1 else 0:]]
    last = "\n".join(lines)
    where = f"({ERROR_FILE} in {folder.name})"
    if "the trial's worker was killed for memory" in last:  # hpsearch.run._fail_trials_whose_worker_is_lost
        return f"its worker process was killed for memory by Ray's memory monitor {where}"
    lost = re.search(r"the trial's worker was lost \((\w+)\)", last)
    if lost:
        return f"its worker process was lost ({lost.group(1)}) {where}"
    if "The actor died" in last or "actor is dead" in last:
        return f"its worker process died (killed, out of memory, or crashed) {where}"
    message = next((line for line in reversed(lines) if line and not line[0].isspace()), "")
    if not message:
        return None
    return f"{message[:300]}{'...' if len(message) > 300 else ''} {where}"


def _trial_folders(experiment: Path, number: int) -> list[Path]:
    """The folders of Optuna trial ``number``: by its ``params.json``, else by the folder's name
    (``trial-<number>-<Tune id>``, :func:`trial_folder_name`). Ray Tune copies ``params.json``
    into the experiment when it saves the experiment; a search that ended without that (killed, or
    stopped together with its Ray) may lack it, or hold it cut short, for its last trials."""
    folders = []
    prefix = trial_folder_name(number, "")
    for folder in sorted(path for path in experiment.iterdir() if path.is_dir()):
        try:
            params = json.loads((folder / "params.json").read_text())
        except (OSError, ValueError):  # missing, or cut short by a kill: the name says
            if folder.name.startswith(prefix):
                folders.append(folder)
            continue
        if isinstance(params, dict) and params.get(CONFIG_KEY) == number:
            folders.append(folder)
    return folders


def export_best_checkpoint(experiment: Path, trial_number: int) -> Path | None:
    """Copy the backbone of Optuna trial ``trial_number`` to ``best_backbone.pt`` (a plain
    ``state_dict``) and its config to ``best_config.json`` in ``experiment``; None if the trial
    left no checkpoint, and then the files of an earlier best are removed (``musicssl.train --from``
    and ``analysis.downstream`` would take them for the best's). Nothing is copied when
    ``best_config.json`` names that trial already: it is written after the backbone, so a kill
    between the two leaves it naming the trial before."""
    experiment = Path(experiment)
    target = experiment / BEST_BACKBONE_FILE
    try:  # exported already (the files are rewritten after each trial; the best often stays)
        if target.is_file() and json.loads((experiment / BEST_CONFIG_FILE).read_text())["trial"] == trial_number:
            return target
    except (OSError, ValueError, KeyError, TypeError):
        pass
    candidates = []
    for folder in _trial_folders(experiment, trial_number):
        candidates.extend(sorted(folder.glob("checkpoint_*/backbone.pt")))
    if not candidates:
        for stale in (experiment / BEST_CONFIG_FILE, target):  # the config first: it names the backbone's trial
            stale.unlink(missing_ok=True)
        return None
    source = max(candidates, key=lambda path: path.stat().st_mtime)
    (experiment / BEST_CONFIG_FILE).unlink(missing_ok=True)  # no moment where it names another trial's backbone
    with whole(target) as partial:
        shutil.copyfile(source, partial)
    config = source.parent / "config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        values["trial"] = trial_number
        write_whole(experiment / BEST_CONFIG_FILE, json.dumps(values, indent=2, default=str) + "\n")
    return target
