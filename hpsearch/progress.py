"""Live progress: one compact line per finished trial, instead of Ray Tune's status tables, and the
search's result files kept current after each trial."""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from ray.tune import Callback

from hpsearch.results import NO_FINAL_REPORT, trial_error
from hpsearch.settings import COLLAPSE_TYPES
from hpsearch.trainable import TRIAL_NUMBER_KEY
from musicssl.cli import silence_closed_output

__all__ = ["ProgressPrinter", "ResultsWriter", "format_params", "results_written_by", "trial_line"]


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.4g}"


def _score(value: Any) -> str:
    """A score with 4 decimals, as the search's summary gives it (0.3210, not 0.321)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return _number(value)
    return f"{value:.4f}"


def format_params(params: dict[str, Any]) -> str:
    """``name=value`` pairs with short numbers, in name order."""
    return " ".join(f"{name}={_number(value)}" for name, value in sorted(params.items()))


def trial_line(record: dict[str, Any], objective: str, max_epochs: int) -> str:
    """The outcome of one trial in a few words: score, or collapse type and where it began."""
    outcome = record.get("outcome") or "stopped"
    epochs = record.get("epochs_run")
    if not isinstance(epochs, (int, float)):
        epochs = record.get("epoch", 0) or 0
    parts = [f"{outcome:<9}"]
    if outcome == "complete":
        parts.append(f"{objective} {_score(record.get('objective'))}")
    elif outcome in ("collapsed", "diverged"):
        where = f"epoch {record.get('collapse_epoch')}" if record.get("collapse_epoch") is not None else ""
        step = record.get("collapse_step", record.get("diverged_step"))
        where += f" (step {step})" if step is not None else ""
        parts.append(f"{record.get('collapse_type') or outcome} from {where.strip()}".strip())
    elif outcome == "failed":
        parts.append(str(record.get("error") or "error")[:120])
    if outcome == "complete" and record.get("would_stop_epoch") is not None:
        parts.append(f"(collapse rule: {record.get('collapse_type')} from epoch {record.get('collapse_epoch')})")
    elif outcome == "complete" and record.get("verdict") in COLLAPSE_TYPES:  # a collapse the rule did not stop on
        parts.append(f"(flagged: {record['verdict']})")
    parts.append(f"{epochs:.3g}/{max_epochs} ep")
    if isinstance(record.get("seconds"), (int, float)):
        parts.append(f"{record['seconds']:.1f} s")
    return "  ".join(parts)


class ProgressPrinter(Callback):
    """Prints ``[done/total] #number outcome score ... | params`` when a trial finishes.

    ``journal`` is the search's Optuna journal: on setup (also after a resume) the count and the
    best score so far are read from it, so the numbering continues where the search stopped.
    """

    def __init__(self, total: int, objective: str, max_epochs: int, journal: str, study_name: str,
                 stream: TextIO | None = None, config_key: str = TRIAL_NUMBER_KEY) -> None:
        self.total = total
        self.objective = objective
        self.max_epochs = max_epochs
        self.journal = journal
        self.study_name = study_name
        self.config_key = config_key
        self._stream = stream
        self.done = 0
        self.best: tuple[float, int] | None = None
        self.started = time.monotonic()

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stream"] = None  # streams do not pickle; Tune pickles callbacks with the experiment
        return state

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        from hpsearch.results import load_study

        from hpsearch.searcher import search_journal

        self.started = time.monotonic()
        self.journal = search_journal(self.journal)  # restored with the path of a folder since moved or copied?
        study = load_study(self.journal, self.study_name)
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        self.done = len(finished)
        complete = [t for t in finished if t.value is not None and t.state.name == "COMPLETE"]
        if complete:
            best = max(complete, key=lambda t: t.value)
            self.best = (best.value, best.number)
        if self.done:
            print(f"resuming: {self.done}/{self.total} trials already finished", file=self.stream, flush=True)

    def _print(self, trial, record: dict[str, Any]) -> None:
        if record.get("replayed"):
            return  # finished (and counted) before the search was interrupted
        self.done += 1
        number = trial.config.get(self.config_key, "?")
        value = record.get("objective")
        if record.get("outcome") == "complete" and isinstance(value, (int, float)) and math.isfinite(value):
            # A tie goes to the lower trial number, as in the summary and best_backbone.pt (results.summarize)
            if self.best is None or value > self.best[0] or (
                    value == self.best[0] and isinstance(number, int) and isinstance(self.best[1], int)
                    and number < self.best[1]):
                self.best = (float(value), number)
        best = f"best {_score(self.best[0])} (#{self.best[1]})" if self.best else "best -"
        params = {k: v for k, v in trial.config.items() if k != self.config_key}
        elapsed = time.monotonic() - self.started
        width = len(str(self.total))
        line = (f"[{self.done:>{width}}/{self.total}] #{number:<3} {trial_line(record, self.objective, self.max_epochs)}"
                f"  | {best} | {elapsed / 60:.1f} min | {format_params(params)}")
        print(line, file=self.stream, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        record = dict(trial.last_result or {})
        if not record.get("final"):
            record["outcome"] = "stopped"
        self._print(trial, record)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        record = dict(trial.last_result or {})
        record["outcome"] = "failed"
        if "error" not in record:  # no report of its own error: Ray's error.txt, which it has written by now
            folder = Path(trial.error_file).parent if getattr(trial, "error_file", None) else None
            record["error"] = trial_error(folder) or NO_FINAL_REPORT
        self._print(trial, record)


_write_results: Callable[[], None] | None = None  # the running search's, while its Tune run goes
_replayed: frozenset[int] = frozenset()  # its study's trials finished before this run: replayed, not rerun
_running: dict[str, tuple[ResultsWriter, Any]] = {}  # Tune's trial id: the writer and trial, while it runs


def keep_trial_folder(trial_id: str) -> None:
    """Copy a running trial's folder (its epoch reports) to the search's now. The searcher calls it before it
    records the trial's end in the study: Tune tells the searcher of a trial's end before its callbacks, and a
    kill in between left a study that holds the trial finished, so never runs it again, with its epoch reports
    in Ray's staging folder only (the search's held those of Ray's last copy, if any)."""
    writer, trial = _running.pop(trial_id, (None, None))
    if writer is not None:
        writer._copy(trial, to_search=True)


@contextlib.contextmanager
def results_written_by(write: Callable[[], None], replayed: Iterable[int] = ()) -> Iterator[None]:
    """While the block runs, :class:`ResultsWriter` calls ``write()`` after each finished trial.
    ``replayed``: the Optuna numbers of the trials the study holds finished (a restored trial among
    them reports its record again; any other restored trial is trained again from its start)."""
    global _write_results, _replayed
    before = _write_results, _replayed
    _write_results, _replayed = write, frozenset(replayed)
    try:
        yield
    finally:
        _write_results, _replayed = before
        _running.clear()


_room_watch: tuple[Callable[[], str | None], Callable[..., None]] | None = None  # the running search's
_write_failure: tuple[str, str] | None = None  # why the running search's record could not be written, and the advice
ROOM_CHECK_SECONDS = 2.0
ROOM_ADVICE = "free some space"

# Why a search stops when the command reading its output ends (``| head``, a pager that quits), and the advice.
OUTPUT_CLOSED = "its output was closed (the command reading it ended: head, or a pager that quit)"
OUTPUT_CLOSED_ADVICE = "read its output to the end, or send it to a file (> search.log)"
_output_closed = False  # a guarded standard output or error was closed while this process ran a search


def output_closed() -> bool:
    """Whether the command reading this search's standard output (or error) has ended
    (:func:`closed_output_stops_the_search`)."""
    return _output_closed


class _GuardedOutput:
    """A text stream whose first write after the reader ended (BrokenPipeError) sends what follows to
    nowhere: the descriptor is pointed at the null device, so that no later write, nor Python's flush at
    exit, raises, and :func:`output_closed` says so. Everything else is the stream's own."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _closed(self) -> None:
        global _output_closed
        _output_closed = True
        silence_closed_output(self._stream)
        # The running search stops at its next step (the room watch's way); before Tune runs, the watch's
        # first look (as the first trial starts) sees output_closed().
        record_not_written(OUTPUT_CLOSED, OUTPUT_CLOSED_ADVICE)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                self._stream.flush()  # what was held goes to the null device now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def closed_output_stops_the_search() -> Iterator[None]:
    """While the block runs, standard output and error are guarded (:class:`_GuardedOutput`): once the
    command reading them ends, the search stops as Ctrl-C stops it (its state saved, to be continued), for
    :data:`OUTPUT_CLOSED`, and prints nothing more there, where it would otherwise fail with Ray Tune's
    chain of BrokenPipeError tracebacks and leave its running trials unrecorded."""
    global _output_closed
    before = (sys.stdout, sys.stderr, _output_closed)
    sys.stdout, sys.stderr, _output_closed = _GuardedOutput(sys.stdout), _GuardedOutput(sys.stderr), False
    try:
        yield
    finally:
        sys.stdout, sys.stderr, _output_closed = before


@contextlib.contextmanager
def room_watched_by(problem: Callable[[], str | None], stopped: Callable[..., None]) -> Iterator[None]:
    """While the block runs, :class:`ResultsWriter` calls ``problem()`` as each trial starts and every
    :data:`ROOM_CHECK_SECONDS`; once it says why the search cannot go on (the disk is short of room),
    the Tune run is stopped as Ctrl-C stops it (its state saved, the trials that were running left to
    train again when the search is continued), and ``stopped(why, advice)`` is called. The same happens at
    the next step of the run after :func:`record_not_written`."""
    global _room_watch, _write_failure
    before, _room_watch, _write_failure = _room_watch, (problem, stopped), None
    try:
        yield
    finally:
        _room_watch, _write_failure = before, None


def record_not_written(why: str, advice: str = ROOM_ADVICE) -> None:
    """The running search's record (its study) could not be written: stop the search as the room watch
    does, with ``why`` and ``advice`` (what to do before continuing it). A disk the watch cannot see as
    full (a quota spent) or a folder no longer writable would otherwise leave every later trial unrecorded.
    Without a running search (a watch), nothing."""
    global _write_failure
    if _room_watch is not None and _write_failure is None:
        _write_failure = (why, advice)


def stopping_for_a_record_not_written() -> bool:
    """Whether the running search is being stopped because its record could not be written."""
    return _room_watch is not None and _write_failure is not None


def _stop_tune_run() -> bool:
    """Stop the Tune run of this process as its Ctrl-C handler does (Tune sets the same handler for
    SIGUSR1, and every run sets it again). False where no run's handler is set (a run off the main
    thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        return False  # off the main thread, a handler found is an earlier run's, which sets signals (it cannot here)
    handler = signal.getsignal(signal.SIGUSR1)
    if not callable(handler) or getattr(handler, "__name__", "") != "signal_interrupt_tune_run":
        return False
    tune_logger = logging.getLogger("ray.tune.tune")  # its warning speaks of Ctrl-C: the caller says why instead
    was_disabled, tune_logger.disabled = tune_logger.disabled, True
    try:
        handler(signal.SIGUSR1, None)
    finally:
        tune_logger.disabled = was_disabled
    return True


def drop_stale_staging(folder: Path) -> int:
    """Before a search's Ray experiment is restored: remove the files of its staging folders in this Ray
    session that the search's ``folder`` holds a copy of as new or newer. Returns how many it removed.

    Ray Tune stages a run's files (each trial's ``result.json``, ``params.json``, ...; the experiment's
    state) under the session folder of the Ray it runs on, ``<session>/artifacts/<time>/<name>/driver_artifacts``,
    and copies all it finds there over the search's folder as it saves its state. A restored run reuses the
    path it was started with (the time is saved with the experiment). A search continued on the cluster it
    ran on before, after it ran somewhere else in between (a local Ray), finds there the staging folder of
    its first run on that cluster, and Ray's copy put that run's files over newer ones: a trial that had
    finished in between lost its epoch reports (its ``result.json`` cut back to the 1 epoch it had then, or
    to none). Only a staging folder of this search is touched: one that holds a trial's folder or a saved
    state of the same name as the search's folder does (another search's trials have other ids).
    A file the search's folder holds no copy of, or an older one, is left for Ray to copy.
    """
    try:
        from ray.train.constants import _get_ray_train_session_dir

        artifacts = Path(_get_ray_train_session_dir())
        ours = {entry.name for entry in folder.iterdir()}
    except Exception:  # noqa: BLE001 - no Ray session, another Ray, or no folder yet: nothing staged to judge
        return 0
    removed = 0
    for staged in artifacts.glob(f"*/{glob.escape(folder.name)}/driver_artifacts"):
        try:
            names = {entry.name for entry in staged.iterdir()}
        except OSError:
            continue
        if not any(name in ours for name in names if name.startswith(("trial-", "experiment_state-"))):
            continue  # another experiment of the same name (in another storage folder)
        for path in sorted(staged.rglob("*")):
            kept = folder / path.relative_to(staged)
            try:
                if (path.is_file() and not path.is_symlink() and kept.is_file()
                        and kept.stat().st_mtime >= path.stat().st_mtime):
                    path.unlink()
                    removed += 1
            except OSError:
                continue
    return removed


class ResultsWriter(Callback):
    """Copies each finished trial's folder (its ``result.json``: every epoch's report) from Ray's staging
    folder to the search's, and rewrites ``trials.csv``, the best backbone and ``summary.json``, before
    its progress line is printed (list it before :class:`ProgressPrinter`): a search that ends without
    its summary (killed, out of memory, or ended by its own Ray after a signal to every process of a
    job) leaves them as of its last finished trial, and a running search can be looked at.

    It holds nothing: Tune pickles callbacks with the experiment, and a restored experiment writes
    what the search that continues it says (:func:`results_written_by`), where its folder is now.
    A failed write is reported, and never fails the trial or the search. It also watches the disk's
    room for the search (:func:`room_watched_by`).
    """

    def __init__(self) -> None:
        self.__setstate__({})

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._failed_before = self._failed_copy_before = False
        self._room_checked = -math.inf  # time.monotonic() of the last look at the disk's room
        self._stopping = False

    def on_step_end(self, iteration, trials, **info) -> None:
        self._look_at_room(at_once=False)

    def _look_at_room(self, at_once: bool) -> None:
        """Every ROOM_CHECK_SECONDS, and as each trial starts (short trials come and go in between); at once
        after a record of the search could not be written (:func:`record_not_written`)."""
        if _room_watch is None or self._stopping or (_write_failure is None and not at_once and
                                                     time.monotonic() - self._room_checked < ROOM_CHECK_SECONDS):
            return
        self._room_checked = time.monotonic()
        problem, stopped = _room_watch
        why, advice = _write_failure or ((OUTPUT_CLOSED, OUTPUT_CLOSED_ADVICE) if _output_closed else
                                         (problem(), ROOM_ADVICE))
        if why is not None and _stop_tune_run():
            self._stopping = True
            print(f"stopping: {why}", file=sys.stderr, flush=True)
            stopped(why, advice)

    def _write(self, trial) -> None:
        if _write_results is None or (trial.last_result or {}).get("replayed"):
            return  # another search's run, or a trial that finished before the search was interrupted
        try:
            _write_results()
        except Exception as error:  # noqa: BLE001 - Tune would fail the trial; the end writes them again
            if not self._failed_before:  # once, until a write succeeds again
                print(f"note: trials.csv, the best backbone and summary.json could not be updated "
                      f"({type(error).__name__}: {error}); the search goes on and writes them again after each "
                      "trial and at its end", file=sys.stderr, flush=True)
            self._failed_before = True
        else:
            self._failed_before = False

    def _copy(self, trial, to_search: bool) -> None:
        # Ray Tune writes a trial's result.json (its epoch reports) to a staging folder under Ray's
        # session folder and copies that whole folder to the search's folder when it saves the
        # experiment's state (every 10 s or more) and at the end: a search killed before then (kill -9,
        # out of memory, a crashed machine) lost finished trials' epoch reports. So each trial's folder is
        # copied to the search's as the trial ends (``to_search``). And as a trial the resume replays
        # starts, the result.json the search's folder already holds for it is copied into its new staging
        # folder, where Ray's logger appends the replayed final record: otherwise Ray's next copy would put
        # the new one, that record alone, over the epoch reports. A trial run again after an interruption
        # trains from its start: its new reports replace the interrupted run's, which were appended to
        # before (each epoch twice). (progress.csv is left to Ray: its rows would not line up with another
        # run's columns.)
        staging, kept = getattr(trial, "local_path", None), getattr(trial, "path", None)
        if not staging or not kept or os.path.realpath(staging) == os.path.realpath(kept):
            return
        try:
            import pyarrow.fs

            filesystem = trial.storage.storage_filesystem
            if to_search:
                if os.path.isdir(staging):
                    filesystem.create_dir(kept, recursive=True)
                    pyarrow.fs.copy_files(staging, kept, destination_filesystem=filesystem)
            elif (getattr(trial, "config", None) or {}).get(TRIAL_NUMBER_KEY) in _replayed:
                result = os.path.join(staging, "result.json")
                if ((not os.path.exists(result) or os.path.getsize(result) == 0) and
                        filesystem.get_file_info(f"{kept}/result.json").type == pyarrow.fs.FileType.File):
                    os.makedirs(staging, exist_ok=True)
                    pyarrow.fs.copy_files(f"{kept}/result.json", result, source_filesystem=filesystem)
        except Exception as error:  # noqa: BLE001 - Ray copies the folder itself at the end
            if not self._failed_copy_before:
                print(f"note: trial {trial}'s folder could not be copied {'to' if to_search else 'from'} the "
                      f"search's folder ({type(error).__name__}: {error}); Ray copies it at the end of the search",
                      file=sys.stderr, flush=True)
            self._failed_copy_before = True

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._look_at_room(at_once=True)
        self._copy(trial, to_search=False)
        _running[trial.trial_id] = (self, trial)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial)

    def _ended(self, trial) -> None:
        _running.pop(trial.trial_id, None)
        self._copy(trial, to_search=True)  # (again: Ray's logger has closed its result.json since)
        self._write(trial)
