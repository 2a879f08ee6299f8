"""One search trial: the shared trainer on the trial's parameters, reporting every epoch to Ray Tune.

Reports (each a ``ray.tune.report`` call):

- after every epoch (an epoch-end hook of :func:`musicssl.train.train`): ``epoch``, ``step``, the
  epoch's mean loss terms (``train_*``), the collapse metrics (``collapse_*``), the rule's
  ``collapse_verdict``, and ``objective``: the epoch's RankMe for ``--objective rankme``; for the
  probe objectives NaN, unless the probe runs every epoch (only under ASHA, which compares trials
  at its rungs);
- once more after ``train()`` returns, with ``final=True``: the ``outcome`` (complete, collapsed,
  diverged, failed), the final ``objective`` and what the searcher records (see
  :data:`FINAL_KEYS`). The probe runs here, after the last epoch, only for a complete trial: a
  collapsed or diverged one is not worth its cost. A complete trial attaches its backbone as a
  Tune checkpoint (``backbone.pt``, a plain ``state_dict``, and ``config.json``); one whose disk is
  full is written again for up to a minute (:func:`_report_with_checkpoint`), in the folder whose disk
  the search watches (``TrialSettings.staging_dir``). One that finds no room all the same (a quota
  spent, a full disk the search does not watch) reports its record as failed for want of room, then
  raises: the searcher stops the search on that report, and the trial trains again when the search
  is continued.

An exception in a trial is reported as ``outcome="failed"`` with the error, then re-raised, so
Tune marks the trial errored (and the search goes on).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpsearch.settings import TrialSettings
from hpsearch.stopping import CollapseMonitor

__all__ = [
    "TRIAL_NUMBER_KEY",
    "SCHEDULER_TIME_KEY",
    "FINAL_KEYS",
    "NO_ROOM_FOR_CHECKPOINT",
    "OUTCOMES",
    "build_train_config",
    "run_trial",
    "objective_key",
]

# The Optuna trial number, added to each trial's config by the searcher.
TRIAL_NUMBER_KEY = "optuna_trial"
# The time ASHA reads: the epoch, in every epoch report but the last one. A scheduler that stops a
# trial on its last epoch saves nothing and would lose the trial's final report (its outcome, its
# score and its checkpoint); without this key in a report, ASHA leaves the trial alone.
SCHEDULER_TIME_KEY = "scheduler_epoch"
OUTCOMES = ("complete", "collapsed", "diverged", "failed", "stopped")
# How the error of a trial whose checkpoint found no room begins (the searcher then stops the search).
NO_ROOM_FOR_CHECKPOINT = "no room for its checkpoint"
# What the final report carries for the searcher to record (besides the last epoch's metrics).
FINAL_KEYS = (
    "outcome", "objective", "probe_map", "probe_auc", "rankme", "epochs_run", "epochs_completed", "steps",
    "seconds", "cpu_seconds", "verdict", "collapse_type", "collapse_epoch", "collapse_step", "stop_epoch", "would_stop_epoch",
    "collapse_reasons", "diverged_step", "error", "best_objective", "best_epoch", "device", "precision",
)  # fmt: skip


# A complete trial's checkpoint is written to a temporary folder for Tune to copy. The folder lives
# while ``tune.report`` waits for the driver to take the report: a search killed then (SIGKILL, out of
# memory) ends the trial's process without removing it. Its name carries the process's id, and each
# trial removes those of ended processes once they are old enough that no other process can be
# writing them (a machine whose /tmp is shared by containers, each with its own process ids).
CHECKPOINT_FOLDER_PREFIX = "hpsearch-checkpoint-"
STALE_CHECKPOINT_SECONDS = 3600.0
# A checkpoint whose disk is full is written again every ROOM_RETRY_SECONDS for up to ROOM_WAIT_SECONDS
# (:func:`_report_with_checkpoint`): long enough for the search's room watch (every 2 s) to stop the search.
ROOM_WAIT_SECONDS = 60.0
ROOM_RETRY_SECONDS = 2.0


def _remove_stale_checkpoint_folders(temporary: str | None = None, now: float | None = None) -> list[str]:
    """Remove this module's temporary checkpoint folders whose process has ended and which are at
    least :data:`STALE_CHECKPOINT_SECONDS` old; return their paths. Best effort: anything that cannot
    be read or removed is left."""
    temporary = temporary or tempfile.gettempdir()
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(temporary))
    except OSError:
        return removed
    for entry in entries:
        pid_text, _, rest = entry.name.removeprefix(CHECKPOINT_FOLDER_PREFIX).partition("-")
        if not entry.name.startswith(CHECKPOINT_FOLDER_PREFIX) or not rest or not pid_text.isdigit():
            continue  # not one of ours, or one named before the process id was in the name
        try:
            if not entry.is_dir(follow_symlinks=False) or now - entry.stat(follow_symlinks=False).st_mtime < (
                    STALE_CHECKPOINT_SECONDS):
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.lexists(entry.path):
                removed.append(entry.path)
        except (OSError, OverflowError, ValueError):
            continue  # a process of another user (it runs), or a folder that went meanwhile
    return removed


def objective_key(objective: str) -> str:
    """The per-epoch metric an objective reads: RankMe of the embedding, or the probe score itself."""
    return "collapse_rankme_embedding" if objective == "rankme" else objective


def build_train_config(settings: TrialSettings, params: Mapping[str, Any]):
    """The :class:`musicssl.train.TrainConfig` of a trial: the search's settings, the space's
    ``FIXED`` values, then the trial's sampled parameters."""
    from musicssl.train import TrainConfig, apply_overrides, check_config, method_settings
    from study_spaces import get_space

    training, method_params = get_space(settings.method).split(params)
    config = TrainConfig(
        method=settings.method,
        preset=settings.preset,
        data=settings.data,
        max_epochs=settings.max_epochs,
        steps_per_epoch=settings.steps_per_epoch,
        batch_size=settings.batch_size,
        seed=settings.seed,
        num_threads=settings.num_threads,
        accelerator=settings.accelerator,
        probe_segments=settings.probe_segments,
        probe_segments_per_track=settings.probe_segments_per_track,
        # The probe is run here (after the last epoch, complete trials only), never by train().
        probe_every_epoch=False,
        final_probe=False,
        out_dir=None,
    )
    config = apply_overrides(config, training)
    config.method_params = dict(method_params)
    method_settings(config)  # names, types and ranges checked now, not after the first epoch
    check_config(config, devices=False)  # the trainer's own rules too (the trials may run where the GPUs are)
    return config


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: Any) -> Any:
    """Python scalars for Tune's result files (numpy and torch scalars have .item())."""
    return value.item() if hasattr(value, "item") else value


class _EpochReporter:
    """The epoch-end hook: judges collapse, measures the objective, reports, and stops the run."""

    def __init__(self, settings: TrialSettings, data, monitor: CollapseMonitor, report) -> None:
        self.settings = settings
        self.data = data
        self.monitor = monitor
        self.report = report
        self.key = objective_key(settings.objective)
        self.best_objective = math.nan
        self.best_epoch: int | None = None
        self.last: dict[str, Any] = {}
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def __call__(self, module, record: dict) -> None:
        settings = self.settings
        metrics = {name: _plain(value) for name, value in record.items()}
        if settings.probe_every_epoch:
            from musicssl.train import probe_score

            metrics.update(probe_score(module.method.backbone, self.data, settings.probe_segments_per_track, settings.seed))
        verdict = self.monitor.update(metrics["epoch"], metrics["step"], metrics)
        metrics["collapse_verdict"] = verdict
        objective = metrics.get(self.key, math.nan)
        metrics["objective"] = float(objective) if _finite(objective) else math.nan
        if _finite(objective) and not (objective <= self.best_objective):
            self.best_objective, self.best_epoch = float(objective), int(metrics["epoch"])
        # In every report: a trial a scheduler stops sends no final report (before: its best was lost).
        metrics["best_objective"], metrics["best_epoch"] = self.best_objective, self.best_epoch
        stop = self.monitor.fired and (settings.collapse_stop or self.monitor.collapse_type == "diverged")
        metrics["collapse_stop"] = bool(stop)
        if not stop and int(metrics["epoch"]) < settings.max_epochs:
            metrics[SCHEDULER_TIME_KEY] = int(metrics["epoch"])
        if self.monitor.fired:
            # Also in the epoch reports: a trial a scheduler stops later sends no final report.
            metrics.update(_rule_record(self.monitor, settings.collapse_stop))
        # The trial's time so far: a trial a scheduler stops sends no final report, and trials.csv then
        # gives its last epoch's.
        metrics["seconds"] = time.perf_counter() - self.started
        metrics["cpu_seconds"] = time.process_time() - self.cpu_started
        self.last = metrics
        if stop:
            module.trainer.should_stop = True
        self.report(metrics)


def _rule_record(monitor: CollapseMonitor, stopping: bool) -> dict[str, Any]:
    """What the stopping rule found: with stopping on, why the trial ended; off, when it would have."""
    return {
        "collapse_type": monitor.collapse_type,
        "collapse_epoch": monitor.collapse_epoch,
        "collapse_step": monitor.collapse_step,
        "collapse_reasons": "; ".join(monitor.stop_reasons),
        ("stop_epoch" if stopping or monitor.collapse_type == "diverged" else "would_stop_epoch"): monitor.stop_epoch,
    }


def _final_record(settings: TrialSettings, monitor: CollapseMonitor, reporter: _EpochReporter) -> dict[str, Any]:
    last = reporter.last
    epochs_completed = len(monitor.verdicts)
    steps = int(last.get("step", 0))
    return {
        "final": True,
        "epoch": epochs_completed,
        "step": steps,
        "epochs_completed": epochs_completed,
        "steps": steps,
        "epochs_run": steps / settings.steps_per_epoch,
        # The last epoch's collapse verdict, whether or not the rule stops on it (e.g. "dimensional").
        "verdict": monitor.verdicts[-1] if monitor.verdicts else None,
        "best_objective": reporter.best_objective,
        "best_epoch": reporter.best_epoch,
        **{k: v for k, v in last.items() if k.startswith(("train_", "collapse_"))},
    }


def run_trial(
    config: dict[str, Any],
    data=None,
    settings: TrialSettings | None = None,
    finished: Mapping[int, Mapping[str, Any]] | None = None,
) -> None:
    """Ray Tune function trainable: train one trial of ``settings.method`` with ``config``'s parameters.

    ``data`` is the :class:`musicssl.data.pipeline.PreparedData` the driver prepared (handed over
    with ``tune.with_parameters``; trials never build data). ``finished`` maps Optuna trial
    numbers already finished in the study to their final records: a trial restored by a resume
    whose result the study already holds (the driver stopped after telling Optuna but before
    saving Tune's state) reports that record again instead of training twice.
    """
    from ray import tune

    if settings is None or data is None:
        raise ValueError("run_trial needs settings= and data= (bind them with tune.with_parameters)")
    number = config.get(TRIAL_NUMBER_KEY)
    if finished and number in finished:
        tune.report({**finished[number], "final": True, "replayed": True})
        return
    started, cpu_started = time.perf_counter(), time.process_time()
    _remove_stale_checkpoint_folders(settings.staging_dir)
    params = {name: value for name, value in config.items() if name != TRIAL_NUMBER_KEY}
    monitor = CollapseMonitor(settings.collapse_rule())
    reporter = _EpochReporter(settings, data, monitor, tune.report)
    try:
        record, checkpoint = _train_and_score(settings, params, data, monitor, reporter)
    except Exception as error:
        record = _final_record(settings, monitor, reporter)
        record.update(outcome="failed", objective=math.nan, error=f"{type(error).__name__}: {error}")
        record["seconds"] = time.perf_counter() - started
        record["cpu_seconds"] = time.process_time() - cpu_started
        tune.report(record)
        raise
    record["seconds"] = time.perf_counter() - started
    # CPU time of the trial's process: what the trial costs whatever else shares the machine.
    record["cpu_seconds"] = time.process_time() - cpu_started
    if checkpoint is None:
        tune.report(record)
        return
    try:
        _report_with_checkpoint(record, *checkpoint, tune.report, trial_folder=_trial_folder(),
                                temporary=settings.staging_dir)
    except Exception as error:
        from musicssl.paths import full_disk_error

        found = full_disk_error(error)
        if found is None:
            raise
        # Reported before the error is raised: the searcher stops the search on this report (see its
        # on_trial_result), as its watch of the disks would, so the trial trains again when the search is
        # continued. A quota spent, or a full disk it does not watch (a cluster node's), is seen only here.
        record.update(outcome="failed", objective=math.nan,
                      error=f"{NO_ROOM_FOR_CHECKPOINT}: {found}")
        tune.report(record)
        raise


def _trial_folder() -> Path | None:
    """The trial's folder in the search's folder, where Ray copies its checkpoint (None outside a Tune run,
    or where the search's folder is not on a local file system)."""
    import pyarrow.fs
    from ray import tune

    try:
        storage = tune.get_context().get_storage()  # (get_trial_dir() is its reports' folder, in Ray's temporary one)
        local = isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)
        return Path(storage.trial_fs_path) if local else None
    except Exception:  # no Tune session
        return None


def _report_with_checkpoint(
    record: dict[str, Any], state: dict, trial_config: dict, report, trial_folder: Path | None = None,
    temporary: str | Path | None = None, wait: float = ROOM_WAIT_SECONDS,
) -> None:
    """Write a complete trial's checkpoint (``backbone.pt``, ``config.json``) to a folder in ``temporary``
    (default: Python's temporary folder) and ``report`` the final ``record`` with it (``tune.report``: Ray
    copies the folder into ``trial_folder``, the trial's folder in the search's).

    A write that finds its disk full, here or in Ray's copy, is tried again every
    :data:`ROOM_RETRY_SECONDS` for up to ``wait`` seconds, the trained backbone kept: the search's room
    watch stops the search meanwhile (the trial then trains again when the search is continued; recorded
    as failed, it would not), or room another program frees lets the trial end as it would have. It waits
    only while a disk lacks room for the checkpoint's copies on it (bytes, or inodes): a disk-full error
    with room left (a quota) is raised at once (:func:`run_trial` reports it, and the searcher stops the
    search on that report), as are other errors. A copy cut short is removed
    (``trial_folder``'s ``checkpoint_*`` folders that were not there before)."""
    import torch
    from ray import tune

    from musicssl.paths import by_file_system, full_disk_error

    size = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    deadline = time.monotonic() + wait
    before = set(trial_folder.glob("checkpoint_*")) if trial_folder is not None else set()
    # A disk lacks room when it cannot take the copies written on it (the staged one and Ray's, on one
    # disk) and 1 MB, or has fewer than 100 inodes left: the search's floors for a disk it watches are
    # higher (hpsearch.room), so its watch then stops the search.
    copies = by_file_system((path, size) for path in (temporary or tempfile.gettempdir(),
                                                      *([trial_folder] if trial_folder is not None else [])))
    while True:
        try:
            with tempfile.TemporaryDirectory(prefix=f"{CHECKPOINT_FOLDER_PREFIX}{os.getpid()}-",
                                             dir=temporary) as folder:
                # Through a Python file: torch.save to a path raises a RuntimeError without the errno.
                with open(Path(folder) / "backbone.pt", "wb") as stream:
                    torch.save(state, stream)
                (Path(folder) / "config.json").write_text(json.dumps(trial_config, indent=2, default=str))
                report(record, checkpoint=tune.Checkpoint.from_directory(folder))
            return
        except Exception as error:  # torch.save raises a RuntimeError, from the OSError
            if full_disk_error(error) is None:
                raise
            if trial_folder is not None:
                for partial in set(trial_folder.glob("checkpoint_*")) - before:
                    shutil.rmtree(partial, ignore_errors=True)
            short = any(_lacks_room(disk, need) for disk, need in copies.items())
            if not short or time.monotonic() + ROOM_RETRY_SECONDS > deadline:
                raise
        time.sleep(ROOM_RETRY_SECONDS)


def _lacks_room(path: str | Path, size: int) -> bool:
    """Whether the disk of ``path`` has less than ``size`` bytes and 1 MB free (or cannot say), or fewer
    than 100 files (inodes) left."""
    from musicssl.paths import free_bytes, free_files

    files = free_files(path)
    return (free_bytes(path) or 0) < size + 1_000_000 or (files is not None and files < 100)


def _train_and_score(
    settings: TrialSettings, params: dict[str, Any], data, monitor: CollapseMonitor, reporter: _EpochReporter
) -> tuple[dict[str, Any], tuple[dict, dict] | None]:
    """Train, then decide the outcome; returns the final record and, for a complete trial, the
    checkpoint to attach (backbone state_dict, trial config)."""
    from musicssl.data.index import GENERATED_CORPUS_KEY
    from musicssl.data.loaders import read_audio_alone, split_by_groups
    from musicssl.train import probe_score, train

    train_config = build_train_config(settings, params)
    result = train(train_config, data=data, epoch_end_hooks=[reporter], progress_bar=False)
    record = _final_record(settings, monitor, reporter)
    record["steps"] = record["step"] = int(result.final.get("steps", record["steps"]))
    record["epochs_run"] = record["steps"] / settings.steps_per_epoch
    # Where it trained: with --gpus-per-trial, the GPU Ray gave it and bf16; on the CPU, float32.
    record["device"], record["precision"] = result.final.get("device"), result.final.get("precision")
    last = reporter.last
    record["rankme"] = last.get("collapse_rankme_embedding", math.nan)
    if monitor.fired:
        record.update(_rule_record(monitor, settings.collapse_stop))
    if result.diverged_step is not None or result.verdict == "diverged" or monitor.collapse_type == "diverged":
        step = result.diverged_step if result.diverged_step is not None else monitor.collapse_step
        record.update(outcome="diverged", objective=math.nan, verdict="diverged", collapse_type="diverged",
                      diverged_step=step)
        if monitor.collapse_type != "diverged":  # in the epoch it stopped in, as the rule's stops give it
            epoch = step // settings.steps_per_epoch + 1
            record.update(collapse_epoch=epoch, collapse_step=step, stop_epoch=epoch,
                          collapse_reasons="non-finite training loss")
            record.pop("would_stop_epoch", None)  # (a rule that fired with stopping off) it stopped: diverged
        return record, None
    if monitor.fired and settings.collapse_stop:
        record.update(outcome="collapsed", objective=math.nan)
        return record, None
    if settings.objective == "rankme":
        objective = last.get("collapse_rankme_embedding", math.nan)
    else:
        scores = {k: last[k] for k in ("probe_map", "probe_auc") if k in last}
        if not scores:
            scores = probe_score(result.backbone, data, settings.probe_segments_per_track, settings.seed, result.device)
        record.update(scores)
        objective = scores[settings.objective]
    if not _finite(objective):
        epoch = len(monitor.verdicts)  # its scores were read after its last epoch
        record.update(outcome="diverged", objective=math.nan, verdict="diverged", collapse_type="diverged",
                      collapse_epoch=epoch, collapse_step=record["steps"], stop_epoch=epoch,
                      collapse_reasons=f"objective {settings.objective} is {objective}")
        record.pop("would_stop_epoch", None)
        return record, None
    record.update(outcome="complete", objective=float(objective))
    if not (record["objective"] <= reporter.best_objective):
        record["best_objective"], record["best_epoch"] = record["objective"], record["epoch"]
    state = {name: tensor.detach().cpu() for name, tensor in result.backbone.state_dict().items()}
    trial_config = {"params": params, "objective": settings.objective, "value": record["objective"],
                    "train_config": train_config.to_dict(),
                    # a generated corpus's version, seed and size: which songs the backbone trained on
                    "training_corpus": data.index.extra.get(GENERATED_CORPUS_KEY),
                    # whether it read a folder's audio alone (no tags file): its splits are drawn from the paths
                    "training_data_unlabeled": read_audio_alone(data.index),
                    # whether its tags file's split_group column drew the splits (a column added later does not)
                    "training_split_groups": split_by_groups(data.index)}
    return record, (state, trial_config)
