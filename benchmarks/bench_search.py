"""Benchmarks of the search (``python -m hpsearch.run``), printed as numbers and ratios.

``python benchmarks/bench_search.py timing``
    The default 64-trial VICReg search (corpus cached) as a user runs it; wall time against the
    15-minute target, with the machine's load average (the machine may be shared).
``python benchmarks/bench_search.py savings --method vicreg --trials 64``
    The same search (same seed) with and without collapse stopping: trial-epochs run by each,
    the fraction saved (target >= 30%), and whether any of the 5 best trials of the search without
    stopping would have been stopped (target: none). Reuses finished runs of the same name.
``python benchmarks/bench_search.py replay --method vicreg --trials 64``
    Replay other grace/patience settings of the stopping rule on the run without stopping (from
    its logged collapse metrics): what each would save and whether it would stop a best-5 trial.
    ``--seed-runs CSV ...`` (files written by ``noise --csv``): also judged by the trials' mean over seeds.
    The rules judge by the search's own collapse thresholds (its search.json); ``--threshold NAME=VALUE``
    (repeatable, as ``hpsearch.run`` takes it) replays them with another line, e.g.
    ``--threshold complete_min_mean_cosine=0.985``.
    ``--max-epochs N`` (savings, replay, noise): trials of N epochs instead of the search's default; the
    runs are named ``METHOD-TRIALS-Nep-stop`` / ``-nostop``.
    ``--search-flags="..." --tag TAG`` (savings): more ``hpsearch.run`` flags for both searches (preset,
    steps, batch size, resources), e.g. the paper preset on a GPU::

        python benchmarks/bench_search.py savings --method vicreg --trials 32 --max-epochs 8 --tag paper \\
            --search-flags="--preset paper --steps-per-epoch 20 --batch-size 64 --concurrency 8 \\
            --cpus-per-trial 2 --gpus-per-trial 0.125"

    (with ``=``: a value that starts with ``--`` is otherwise taken for a flag). The runs are then named
    ``METHOD-TRIALS[-Nep]-TAG-stop`` / ``-nostop``; pass the same ``--tag`` to replay and noise.
    With ``--search-flags="--sampler random" --tag random`` both searches draw the same settings, trial
    for trial (TPE's later draws follow the trials' outcomes), so they differ only by the stops (on the
    CPU; not when one of them was resumed, which reseeds its sampler). The benchmark says whether they did.
``python benchmarks/bench_search.py noise --method vicreg --trials 64 [--seeds 0,1,2] [RUN_DIR]``
    How much of a search's ranking is its seed: trials of a finished search (default: the run
    without stopping; ranks 1-5, 10, 20, the median and the last of its complete trials, ``--ranks``)
    trained again outside Ray with other seeds, without collapse stopping, as its trials train (train
    + collapse metrics + probe, the search's threads). Prints each one's objective per seed, whether
    the search's own seed reproduces the search's number, the seed-to-seed spread, and how the 5 best
    score on the other seeds against the other trials retrained.
``python benchmarks/bench_search.py overhead --trials 6``
    Ray's per-trial overhead: the same default trials run one at a time through Ray and directly
    (``train()`` + probe in this process, one thread); target <= 10% of a trial.
``python benchmarks/bench_search.py report RUN_DIR [RUN_DIR ...]``
    Print the numbers of finished searches without running anything.

Long runs go to ``--storage-dir`` (default /tmp/hpsearch-bench); run one benchmark at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from musicssl.cli import int_in

REPO = Path(__file__).resolve().parents[1]


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def run_cli(args: list[str], log: Path | None = None) -> tuple[int, float]:
    """Run ``python -m hpsearch.run ARGS``; returns (exit code, wall seconds). Output goes to ``log``."""
    command = [sys.executable, "-m", "hpsearch.run", *args]
    started = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    return code, time.perf_counter() - started


def needs_run(folder: Path, rerun: bool) -> bool:
    """Whether the search in ``folder`` must be run: no run there, or ``rerun`` (the earlier one is
    removed). A search's summary.json is rewritten after each trial, so only one that says all its
    trials finished counts as done; an unfinished one stops the benchmark rather than be measured."""
    if folder.exists() and rerun:
        shutil.rmtree(folder)
    if not folder.exists():
        return True
    if not finished(folder):
        raise UsageError(f"{folder} holds a search that did not finish: continue it (python -m hpsearch.run ... "
                         f"--name {folder.name} --storage-dir {folder.parent} --resume; its wall time then is not "
                         "a timing), remove it, or pass --rerun")
    return False


def finished(folder: Path) -> bool:
    """Whether the search in ``folder`` says all its trials finished (its summary.json, rewritten after each)."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        return summary["trials_finished"] == summary["trials_requested"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


class UsageError(Exception):
    """Bad input to a benchmark (a folder, a flag's value, a file): said in one line, exit code 2."""


def read_run(folder: Path) -> tuple[pd.DataFrame, dict, dict]:
    missing = [name for name in ("trials.csv", "summary.json", "search.json") if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"{folder} is not a search's folder (no {', '.join(missing)}): pass the folder of a search, "
                         "e.g. runs/NAME")
    trials = pd.read_csv(folder / "trials.csv")
    summary = json.loads((folder / "summary.json").read_text())
    settings = json.loads((folder / "search.json").read_text())
    return trials, summary, settings


def ranked_complete(trials: pd.DataFrame) -> pd.DataFrame:
    """A search's complete trials, best objective first."""
    return trials[trials["state"] == "COMPLETE"].sort_values("objective", ascending=False)


def rank_correlation(first: pd.Series, second: pd.Series) -> float:
    """Spearman's rank correlation of two series over their shared index."""
    return float(first.rank().corr(second.rank()))


def one_search_folder(args) -> Path:
    """The search folder a benchmark reads: the one given, else the savings run without stopping."""
    if len(args.folders) > 1:
        raise UsageError(f"{args.benchmark} takes one search folder, got {len(args.folders)}")
    return Path(args.folders[0]) if args.folders else Path(args.storage_dir) / (args.name or f"{run_stem(args)}-nostop")


def describe(folder: Path) -> None:
    trials, summary, settings = read_run(folder)
    seconds = pd.to_numeric(trials["seconds"], errors="coerce")
    print(f"{folder.name}: {settings['method']}, {summary['trials_finished']}/{summary['trials_requested']} trials, "
          f"counts {summary['counts']}")
    print(f"  trial-epochs run {summary['trial_epochs_run']:.1f} of {summary['trial_epochs_requested']} "
          f"({100 * summary['saved_fraction']:.1f}% saved: {summary['epochs_saved']})")
    print(f"  best #{summary['best_trial']} {summary['objective']} {summary['best_value']}")
    if summary.get("seconds"):
        print(f"  search wall time {summary['seconds']:.0f} s ({summary['seconds'] / 60:.1f} min); trial seconds: "
              f"median {seconds.median():.1f}, mean {seconds.mean():.1f}, sum {seconds.sum():.0f}")


# ----------------------------------------------------------------------------------------------


def bench_timing(args) -> None:
    # The same run as the "with stopping" half of `savings --method vicreg --trials 64`.
    name = args.name or f"vicreg-{args.trials}-stop"
    folder = Path(args.storage_dir) / name
    if not needs_run(folder, args.rerun):
        changed = not_default(folder, args.trials)
        if changed:
            raise UsageError(f"{folder} is not the default search ({', '.join(changed)}): pass --rerun, or --name for "
                             "another folder")
        # The search's own seconds (summed over its runs, were it resumed): without the interpreter's start and
        # end, a few seconds under the command's wall time that a fresh run gives.
        print(f"(reusing the finished run {folder}: its summary's seconds, not the command's wall time)")
        wall = json.loads((folder / "summary.json").read_text())["seconds"]
    else:
        print(f"load average before: {load_average()}")
        log = Path(args.storage_dir) / f"{name}.log"
        code, wall = run_cli(["vicreg", "--trials", str(args.trials), "--name", name, "--storage-dir", args.storage_dir],
                             log=log)
        print(f"exit code {code}; load average after: {load_average()}")
        if code != 0 or not finished(folder):
            raise SystemExit(f"{name}: python -m hpsearch.run exited with {code} before its last trial finished "
                             f"(log: {log}): not a timing")
    describe(folder)
    print(f"RESULT timing: {args.trials}-trial default vicreg search took {wall / 60:.1f} min "
          f"(target <= 15 min: {'met' if wall <= 900 else 'NOT met'})")


# What makes a search the default one that timing measures: every setting that changes its work.
TIMING_SETTINGS = ("method", "trials", "objective", "scheduler", "max_epochs", "steps_per_epoch", "batch_size",
                   "probe_segments", "probe_segments_per_track", "preset", "data", "seed", "sampler", "concurrency",
                   "cpus_per_trial", "gpus_per_trial", "collapse_stop", "grace_epochs", "patience_epochs",
                   "thresholds", "stop_on", "asha_grace_epochs", "asha_reduction_factor", "reuse_actors")


def not_default(folder: Path, trials: int) -> list[str]:
    """The settings (``NAME=VALUE``) in which the search in ``folder`` differs from ``python -m hpsearch.run
    vicreg --trials TRIALS``, by its search.json."""
    from hpsearch.settings import SearchSettings

    default = SearchSettings(method="vicreg", trials=trials).to_dict()
    try:
        stored = json.loads((folder / "search.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{folder / 'search.json'}: unreadable ({error}): not a search to time; pass --rerun") from None
    if not isinstance(stored, dict):
        raise UsageError(f"{folder / 'search.json'}: not a search's settings: pass --rerun")
    # a setting a search from older code did not record is not counted against it
    return [f"{key}={stored[key]!r}" for key in TIMING_SETTINGS if key in stored and stored[key] != default[key]]


def run_stem(args) -> str:
    """The stem of a savings run's name: method and trials, the trial length when not the default, and
    the ``--tag`` of runs with other ``--search-flags``."""
    stem = f"{args.method}-{args.trials}"
    if args.max_epochs is not None:
        stem += f"-{args.max_epochs}ep"
    return f"{stem}-{args.tag}" if args.tag else stem


# Flags a savings run sets itself, so not accepted in --search-flags.
SAVINGS_OWN_FLAGS = ("--trials", "--name", "--storage-dir", "--seed", "--max-epochs", "--no-collapse-stop", "--resume")


def savings_flags(args, name: str, stop: bool) -> list[str]:
    """The ``hpsearch.run`` flags (after the method) of one of a savings benchmark's two searches."""
    flags = ["--trials", str(args.trials), "--name", name, "--storage-dir", args.storage_dir, "--seed", str(args.seed)]
    if args.max_epochs is not None:
        flags += ["--max-epochs", str(args.max_epochs)]
    if not stop:
        flags.append("--no-collapse-stop")
    return flags + shlex.split(args.search_flags or "")


def bench_savings(args) -> None:
    runs = {}
    for stop in (True, False):
        name = f"{run_stem(args)}-{'stop' if stop else 'nostop'}"
        folder = Path(args.storage_dir) / name
        if needs_run(folder, args.rerun):
            print(f"running {name} (load average {load_average()})", flush=True)
            log = Path(args.storage_dir) / f"{name}.log"
            code, wall = run_cli([args.method, *savings_flags(args, name, stop)], log=log)
            print(f"  exit code {code}, {wall / 60:.1f} min", flush=True)
            if not finished(folder):  # refused, or stopped before its last trial: not measured
                lines = log.read_text(errors="replace").strip().splitlines()
                raise SystemExit(f"{name}: python -m hpsearch.run exited with {code} before its last trial finished "
                                 f"(log: {log}){': ' + lines[-1] if lines else ''}")
        runs[stop] = folder
        describe(folder)
    with_stop, _, stop_settings = read_run(runs[True])
    without, _, _ = read_run(runs[False])
    epochs_with = float(pd.to_numeric(with_stop["epochs_run"], errors="coerce").sum())
    epochs_without = float(pd.to_numeric(without["epochs_run"], errors="coerce").sum())
    saved = 1.0 - epochs_with / epochs_without
    # The rule of the search with stopping, replayed on the search without it (its trials.csv's
    # would_stop_epoch holds the rule of the day that search ran, which may since have changed).
    rule = stored_rule(runs[True])
    monitors = replay(epoch_records(runs[False]), rule)
    complete = ranked_complete(without)
    top = complete.head(5)
    would_stop = [number for number in top["trial"] if monitors[number].fired]
    print(f"trial-epochs: with collapse stop {epochs_with:.1f}, without {epochs_without:.1f}: "
          f"{100 * saved:.1f}% saved (target >= 30%)")
    flagged = sum(monitor.fired for monitor in monitors.values())
    print(f"without stopping, the rule (stop on {', '.join(rule.stop_on)}, grace {rule.grace_epochs}, patience "
          f"{rule.patience_epochs}) would have stopped {flagged} of {len(without)} trials")
    print("5 best trials without stopping (trial, objective, would stop at epoch, as):")
    for row in top.itertuples():
        monitor = monitors[row.trial]
        print(f"  #{row.trial}  {row.objective:.4f}  {monitor.stop_epoch}  {monitor.collapse_type}")
    same, shared, gap = same_draws(with_stop, without)
    print(f"settings drawn: the same in {same} of {shared} trial numbers"
          + (f"; the {gap[0]} trials that ran to the end in both score within {gap[1]:.2g} of each other" if gap[0] else ""))
    if stop_settings.get("sampler") == "random" and same < shared:
        print("warning: a random pair should draw the same settings in every trial: was one of them resumed (which "
              "reseeds its sampler) or run with other flags? Then the saving is not the stops' alone")
    print(f"RESULT savings {args.method}: {100 * saved:.1f}% of trial-epochs saved "
          f"({'met' if saved >= 0.3 else 'NOT met'}); {len(would_stop)} of the 5 best trials without stopping "
          f"would have been stopped ({'met' if len(would_stop) == 0 else 'NOT met'})")


def same_draws(first: pd.DataFrame, second: pd.DataFrame) -> tuple[int, int, tuple[int, float]]:
    """How two searches' trials.csv compare trial number by trial number: in how many of the numbers both
    hold the settings are the same, of how many, and of those with the same settings that completed in both,
    how many and the largest difference of their objectives."""
    columns = sorted(c for c in set(first.columns) & set(second.columns) if c.startswith("param_"))
    left, right = first.set_index("trial"), second.set_index("trial")
    numbers = left.index.intersection(right.index)
    mine, theirs = left.loc[numbers, columns], right.loc[numbers, columns]
    same = list(numbers[((mine == theirs) | (mine.isna() & theirs.isna())).all(axis=1)])
    both = [number for number in same if left.at[number, "outcome"] == right.at[number, "outcome"] == "complete"]
    gap = max((abs(float(left.at[n, "objective"]) - float(right.at[n, "objective"])) for n in both), default=0.0)
    return len(same), len(numbers), (len(both), gap)


def epoch_records(folder: Path) -> dict[int, list[dict]]:
    """Per Optuna trial number, the epoch reports of a search: those the sensitivity report reads
    (Ray's result.json; of a trial run again after a kill, its last run)."""
    from analysis.sensitivity import read_trajectories

    prototypes = {}
    for params_file in folder.glob("*/params.json"):
        try:
            params = json.loads(params_file.read_text())
        except (OSError, ValueError):  # cut short by a kill: read_trajectories leaves that folder out too
            continue
        if isinstance(params, dict) and params.get("num_prototypes"):
            prototypes[params.get("optuna_trial")] = float(params["num_prototypes"])
    records = {}
    for number, frame in read_trajectories(folder).items():
        # Searches run before 2026-12-02 did not log the mean assignment's effective prototypes:
        # K ** (its entropy over log K) is the same number.
        if "collapse_assignment_entropy" in frame and "collapse_effective_prototypes" not in frame and number in prototypes:
            frame["collapse_effective_prototypes"] = prototypes[number] ** frame["collapse_assignment_entropy"]
        records[number] = frame.to_dict("records")
    return records


def stored_rule(folder: Path):
    """The collapse stopping rule a search ran with (from its search.json)."""
    from hpsearch.settings import SearchSettings

    return SearchSettings.load(folder).trial_settings().collapse_rule()


def replay(records: dict[int, list[dict]], rule):
    """Per trial number, a CollapseMonitor of ``rule`` fed the trial's epoch records (up to where it fires)."""
    from hpsearch.stopping import CollapseMonitor

    monitors = {}
    for number, rows in records.items():
        monitor = monitors[number] = CollapseMonitor(rule)
        for row in rows:
            monitor.update(int(row["epoch"]), int(row["step"]), row)
            if monitor.fired:
                break
    return monitors


def seed_table(trials: pd.DataFrame, settings: dict, files: list[str], seeds: list[int] | None = None) -> pd.DataFrame:
    """Per trial (rows), the objective on each seed (columns): the search's own value for its seed and
    the runs of ``noise --csv`` files, on ``seeds`` (default: all found). Only trials that have every
    one of those seeds are kept."""
    frames = []
    for file in files:
        try:
            frame = pd.read_csv(file)
        except (OSError, ValueError) as error:  # missing, unreadable, empty
            raise UsageError(f"--seed-runs {file}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
        missing = [column for column in ("trial", "seed", "objective") if column not in frame]
        if missing:
            raise UsageError(f"--seed-runs {file}: no {', '.join(missing)} column: pass files written by noise --csv")
        frames.append(frame)
    runs = pd.concat(frames, ignore_index=True)
    if "search" in runs and set(runs["search"].dropna()) - {settings["name"]}:
        raise UsageError(f"--seed-runs: runs of {sorted(set(runs['search'].dropna()))}, not of {settings['name']}")
    complete = ranked_complete(trials)[["trial", "objective"]]
    own = complete.assign(seed=int(settings["seed"]))
    runs = runs[runs["trial"].isin(complete["trial"]) & (runs["seed"] != int(settings["seed"]))]
    runs = pd.concat([runs[["trial", "seed", "objective"]], own], ignore_index=True)
    if seeds is not None:
        runs = runs[runs["seed"].isin(seeds)]
    table = runs.pivot_table(index="trial", columns="seed", values="objective", aggfunc="mean", dropna=False)
    kept = table.dropna()
    if len(kept) < len(table):  # a seed not run for a trial, or a retrain that diverged or failed (NaN)
        print(f"left out of the means: {len(table) - len(kept)} trials without a finite objective on every seed "
              f"({', '.join(f'#{number}' for number in table.index.difference(kept.index)[:10])}"
              f"{', ...' if len(table) - len(kept) > 10 else ''})")
    if kept.empty:
        raise UsageError("no trial has a run on every one of the seeds asked for: pass --seeds with fewer of them")
    return kept


def replay_rules(args) -> None:
    """Replay stopping rules on a search run without stopping: what each would have saved, and
    whether it would have stopped any of the 5 best trials (no retraining; TPE's feedback aside, which a
    ``--sampler random`` search has none of).
    With ``--seed-runs`` (``noise --csv`` files), also the 5 best by the mean over seeds, and the mean
    objective of the trials each rule stops against those it lets run."""
    from hpsearch.settings import COLLAPSE_TYPES_VERSION, DEFAULT_STOP_ON
    from hpsearch.settings import collapse_thresholds
    from hpsearch.stopping import COLLAPSE_TYPES, CollapseStopRule

    folder = one_search_folder(args)
    trials, _, settings = read_run(folder)
    own = settings.get("thresholds") or {}
    given = {**own, **args.threshold}
    try:
        thresholds = collapse_thresholds(given)
    except (TypeError, ValueError) as error:  # a search.json edited by hand (SettingsError is a ValueError)
        raise UsageError(f"{folder / 'search.json'}: its collapse thresholds {own} are not valid ({error})") from None
    records = epoch_records(folder)
    # A search still running (or killed) has trials with epoch reports that have not finished: a row
    # without epochs_run in trials.csv ("running"), or none yet.
    finished = {int(number): float(epochs)  # trial number -> epochs run
                for number, epochs in zip(trials["trial"], pd.to_numeric(trials["epochs_run"], errors="coerce"))
                if pd.notna(epochs)}
    unfinished = sorted(set(records) - set(finished))
    if unfinished:
        print(f"left out (not finished): {', '.join(f'#{number}' for number in unfinished)}")
        records = {number: rows for number, rows in records.items() if number not in unfinished}
    max_epochs = settings["max_epochs"]
    complete = ranked_complete(trials)
    best = set(complete["trial"].head(5))
    means = None
    if args.seed_runs:
        table = seed_table(trials, settings, args.seed_runs, args.seeds)
        means = table.mean(axis=1)
        best_by_mean = list(means.sort_values(ascending=False).index[:5])
        ranks = {number: rank for rank, number in enumerate(complete["trial"], start=1)}
        print(f"the mean over seeds {', '.join(str(seed) for seed in table.columns)} of {len(means)} trials; its 5 best: "
              + ", ".join(f"#{number} ({means[number]:.4f}, rank {ranks[number]} in the search)" for number in best_by_mean))
        others = [seed for seed in table.columns if seed != int(settings["seed"])]
        if others:
            searched = complete.set_index("trial")["objective"][table.index]
            print(f"rank correlation of the search's values with the mean over the other seeds "
                  f"({', '.join(map(str, others))}): {rank_correlation(searched, table[others].mean(axis=1)):.2f}")
    print(f"replaying stopping rules on {folder.name} ({len(records)} trials, {max_epochs} epochs each):")
    if given:
        from hpsearch.run import threshold_parts

        sources = ["--threshold" if name in args.threshold else "the search's" for name in given]
        print("  collapse thresholds: " + ", ".join(f"{part} ({source})" for part, source in
                                                    zip(threshold_parts(given), sources)) + "; the others default")
    print("  stop on                              grace patience  saved   stopped  best-5 stopped"
          + ("  by the mean  mean: stopped / run" if means is not None else ""))
    # The default; the default with the earlier verdicts (version 2, until 2026-12-04: the projection's
    # L2-std rule also judged prototype scores; version 1, until 2026-12-02: also "partial" was part of
    # "cluster", and no count rule); complete only; every type.
    rules = ((DEFAULT_STOP_ON, COLLAPSE_TYPES_VERSION), (DEFAULT_STOP_ON, 2), (DEFAULT_STOP_ON, 1),
             (("complete",), COLLAPSE_TYPES_VERSION), (COLLAPSE_TYPES, COLLAPSE_TYPES_VERSION))
    for stop_on, version in rules:
        label = ",".join(stop_on) + (f" (verdict v{version})" if version != COLLAPSE_TYPES_VERSION else "")
        for grace, patience in ((0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)):
            rule = CollapseStopRule(grace_epochs=grace, patience_epochs=patience, thresholds=thresholds,
                                    stop_on=stop_on, collapse_types_version=version)
            run = requested = 0.0
            stopped = []
            for number, monitor in replay(records, rule).items():
                epochs = finished[number]
                requested += epochs
                if monitor.fired and monitor.collapse_type != "diverged":
                    stopped.append(number)
                    run += min(epochs, monitor.stop_epoch)
                else:
                    run += epochs
            line = (f"  {label:<36} {grace:>5} {patience:>8}  {100 * (1 - run / requested):5.1f}%  "
                    f"{len(stopped):>7}  {len(best.intersection(stopped)):>14}")
            if means is not None:
                held = means.index.isin(stopped)
                line += f"  {len(set(best_by_mean).intersection(stopped)):>11}  " + " / ".join(
                    f"{part.mean():.4f}" if len(part) else "-" for part in (means[held], means[~held]))
            print(line)


def ranked_trials(trials: pd.DataFrame, ranks: list[str]) -> list[tuple[int, int]]:
    """``(rank, trial number)`` of a search's complete trials at ``ranks`` (1-based numbers, "median",
    "last"), best first, each trial once."""
    numbers = [int(number) for number in ranked_complete(trials)["trial"]]
    if not numbers:
        raise UsageError("the search has no complete trial to train again")
    chosen: dict[int, int] = {}
    for rank in ranks:
        position = {"median": (len(numbers) + 1) // 2, "last": len(numbers)}.get(rank)
        if position is None:
            try:
                position = int(rank)
            except ValueError:
                raise UsageError(f"--ranks: {rank!r} is neither a rank (1, 2, ...) nor median or last") from None
            if position < 1:
                raise UsageError(f"--ranks: ranks start at 1, got {rank}")
        if position <= len(numbers):
            chosen.setdefault(position, numbers[position - 1])
    return sorted(chosen.items())


def retrain(folder: Path, numbers: list[int], seeds: list[int], show=print, csv: str | None = None) -> pd.DataFrame:
    """Train the search's trials ``numbers`` again with each of ``seeds``: its settings and the trial's
    parameters (the config the study recorded it was given, else its sampled values through today's
    space), collapse stopping off, in this process. One row per run: search, trial, seed, objective,
    outcome, seconds; written to ``csv`` after each run. A run that raises is recorded as failed."""
    import dataclasses

    import optuna

    from hpsearch.results import load_study
    from hpsearch.run import prepare_search_data
    from hpsearch.settings import SearchSettings
    from hpsearch.stopping import CollapseMonitor
    from hpsearch.trainable import _EpochReporter, _train_and_score
    from study_spaces import get_space

    settings = SearchSettings.load(folder)
    study = load_study(folder / "optuna.journal")
    space = get_space(settings.method)
    data = prepare_search_data(settings, verbose=False)
    by_number = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    rows = []
    for number in numbers:
        trial = by_number[number]
        params = trial.user_attrs.get("config") or space.sample(optuna.trial.FixedTrial(trial.params))
        for seed in seeds:
            trial_settings = dataclasses.replace(settings.trial_settings(), seed=seed, collapse_stop=False)
            monitor = CollapseMonitor(trial_settings.collapse_rule())
            reporter = _EpochReporter(trial_settings, data, monitor, report=lambda metrics: None)
            started = time.perf_counter()
            try:
                record, _ = _train_and_score(trial_settings, params, data, monitor, reporter)
                objective, outcome, note = record["objective"], record["outcome"], ""
            except Exception as error:  # noqa: BLE001 - one run's failure is recorded, as a search's trial is
                objective, outcome, note = float("nan"), "failed", f": {type(error).__name__}: {error}"
            rows.append({"search": settings.name, "trial": number, "seed": seed, "objective": objective,
                         "outcome": outcome, "seconds": time.perf_counter() - started})
            show(f"  #{number} seed {seed}: {objective:.4f} ({outcome}, {rows[-1]['seconds']:.0f} s){note}", flush=True)
            if csv:
                pd.DataFrame(rows).to_csv(csv, index=False)
    return pd.DataFrame(rows)


def bench_noise(args) -> None:
    folder = one_search_folder(args)
    if not (folder / "optuna.journal").is_file():
        raise UsageError(f"{folder} is not a search's folder (no optuna.journal): pass the folder of a search, "
                         "e.g. runs/NAME")
    trials, _, settings = read_run(folder)
    if args.csv:
        try:
            Path(args.csv).write_text("")  # an unwritable path fails now, not after the runs
        except OSError as error:
            raise UsageError(f"--csv {args.csv}: cannot write there ({error.strerror or error})") from None
    search_seed = int(settings["seed"])
    seeds = args.seeds or [search_seed, search_seed + 1, search_seed + 2]
    chosen = ranked_trials(trials, args.ranks.split(","))
    print(f"noise: {folder.name} ({settings['method']}, {settings['max_epochs']} epochs of {settings['steps_per_epoch']} "
          f"steps), {len(chosen)} trials x seeds {', '.join(map(str, seeds))} (the search's: {search_seed}); "
          f"load average {load_average()}", flush=True)
    runs = retrain(folder, [number for _, number in chosen], seeds, csv=args.csv)
    if args.csv:
        print(f"runs written to {args.csv}")
    table = runs.pivot(index="trial", columns="seed", values="objective")
    searched = trials.set_index("trial")["objective"]
    others = [seed for seed in seeds if seed != search_seed]
    print(f"  rank  trial  search   {''.join(f'seed {seed:<4}' for seed in seeds)}mean    std")
    for rank, number in chosen:
        values = table.loc[number]
        print(f"  {rank:>4}  #{number:<4}  {searched[number]:.4f}   {'  '.join(f'{values[seed]:.4f}  ' for seed in seeds)}"
              f"{values.mean():.4f}  {values.std():.4f}")
    if search_seed in seeds:
        difference = (table[search_seed] - searched[table.index]).abs()
        print(f"the search's seed reproduces the search's objective for {int((difference <= 1e-6).sum())} of "
              f"{len(difference)} trials (largest difference {difference.max():.2g})")
    pooled = float((table.std(axis=1) ** 2).mean() ** 0.5)
    complete = pd.to_numeric(ranked_complete(trials)["objective"])
    print(f"seed-to-seed std of one trial's objective (pooled over {len(table)} trials): {pooled:.4f}; across the "
          f"search's {len(complete)} complete trials: std {complete.std():.4f}, best - median "
          f"{complete.max() - complete.median():.4f}")
    if others:
        other_mean = table[others].mean(axis=1)
        groups = {"the 5 best": [number for rank, number in chosen if rank <= 5],
                  "the others retrained but the last": [number for rank, number in chosen if 5 < rank < len(complete)],
                  "the last": [number for rank, number in chosen if rank == len(complete) > 5]}
        averages = [f"{group} {other_mean[numbers].mean():.4f} ({len(numbers)} trials)"
                    for group, numbers in groups.items() if numbers]
        rank_corr = rank_correlation(searched[table.index], other_mean)
        print(f"on the other seeds ({', '.join(map(str, others))}), average objective: {'; '.join(averages)}; rank "
              f"correlation of the trials' mean there with the search's values {rank_corr:.2f}")
    print(f"RESULT noise {settings['method']}: seed-to-seed std {pooled:.4f} against a best - median spread of "
          f"{complete.max() - complete.median():.4f} in the search; load average {load_average()}")


def bench_overhead(args) -> None:
    """Same trials, one at a time: through Ray (reused actor) and directly in this process."""
    import torch

    from hpsearch.run import prepare_search_data, run_search
    from hpsearch.settings import SearchSettings
    from hpsearch.trainable import build_train_config
    from musicssl.train import probe_score, train

    points = [{"inv_weight": 25.0, "var_weight": 25.0, "cov_weight": 1.0, "learning_rate": 1e-3,
               "weight_decay": 1e-4 * (k + 1)} for k in range(args.trials)]
    name = f"overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = SearchSettings(method="vicreg", trials=args.trials, name=name, storage_dir=args.storage_dir,
                              concurrency=1, collapse_stop=False, points_to_evaluate=points)
    data = prepare_search_data(settings, verbose=False)
    trial_settings = settings.trial_settings()

    def direct() -> list[float]:
        torch.set_num_threads(1)
        times = []
        for point in points:
            started = time.perf_counter()
            result = train(build_train_config(trial_settings, point), data=data, progress_bar=False)
            probe_score(result.backbone, data, trial_settings.probe_segments_per_track, trial_settings.seed)
            times.append(time.perf_counter() - started)
        return times

    print(f"load average {load_average()}", flush=True)
    direct_before = direct()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    result = run_search(settings, data=data, stream=open(os.devnull, "w"))
    direct_after = direct()
    frame = result.trials.sort_values("trial")
    completes = pd.to_datetime(frame["datetime_complete"])
    gaps = completes.diff().dt.total_seconds().iloc[1:]  # trial k completion - trial k-1 completion
    direct_mean = (sum(direct_before) + sum(direct_after)) / (2 * len(points))
    inside = pd.to_numeric(frame["seconds"]).iloc[1:].mean()
    print(f"direct trial (train + probe, 1 thread): {direct_mean:.2f} s  (before {sum(direct_before) / len(points):.2f}, "
          f"after {sum(direct_after) / len(points):.2f})")
    print(f"through Ray, completion to completion (trials 2..{len(points)}): {gaps.mean():.2f} s; "
          f"inside the trainable: {inside:.2f} s; first trial (new actor, imports): {frame['seconds'].iloc[0]:.2f} s")
    # Ray's share: the time between two trials' completions spent outside the trainable, against the time
    # inside it, both measured in the Ray run. The direct trials are a side figure: they drift with the
    # process (warming, aging) by more than Ray adds, so their difference from the gaps can even be negative.
    overhead = gaps.mean() - inside
    print(f"direct minus through Ray: {direct_mean - gaps.mean():+.2f} s per trial (a side figure, see above)")
    print(f"RESULT overhead: {overhead:.2f} s per trial outside the trainable = {100 * overhead / inside:.1f}% of a "
          f"default trial ({'met' if overhead <= 0.1 * inside else 'NOT met'}; target <= 10%); "
          f"load average {load_average()}")


def seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated whole numbers from 0 to 2**32 - 1, each once."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if any(not 0 <= seed < 2**32 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be different numbers from 0 to 2**32 - 1, got {text!r}")
    return seeds


def parsed_thresholds(pairs: list[str], parser: argparse.ArgumentParser) -> dict:
    """``--threshold NAME=VALUE`` pairs as hpsearch.run reads them, each name and value checked (exit 2
    with the problem named)."""
    from hpsearch.run import threshold_values
    from hpsearch.settings import SettingsError, collapse_thresholds

    try:
        values = threshold_values(pairs)
    except SettingsError as error:
        parser.error(str(error))
    try:
        collapse_thresholds(values)
    except ValueError as error:  # SettingsError (an unknown name) is one too
        parser.error(f"--threshold: {error}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["timing", "savings", "replay", "noise", "overhead", "report"])
    parser.add_argument("folders", nargs="*", help="for report: finished search folders; for replay and noise: one "
                        "(default: the savings run without stopping)")
    parser.add_argument("--method", default="vicreg")
    parser.add_argument("--trials", type=int_in(1), default=None,
                        help="trials per search (default: 64; overhead: 6, and at least 2)")
    parser.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    parser.add_argument("--max-epochs", type=int_in(1), default=None,
                        help="for savings, replay and noise: epochs per trial (default: the search's own default)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--search-flags", default="", metavar="FLAGS",
                        help="for savings: more python -m hpsearch.run flags for both searches, in one quoted string "
                        "given with = (--search-flags=\"--preset paper --gpus-per-trial 0.125\"); needs --tag")
    parser.add_argument("--tag", default=None,
                        help="for savings, replay and noise: a word in the runs' names (METHOD-TRIALS[-Nep]-TAG-stop), "
                        "for runs with --search-flags")
    parser.add_argument("--storage-dir", default="/tmp/hpsearch-bench")
    parser.add_argument("--rerun", action="store_true", help="run again, removing the earlier run's folder")
    parser.add_argument("--seeds", type=seed_list, default=None, help="for noise: comma-separated seeds (default: the search's and "
                        "the next two); for replay with --seed-runs: the seeds to average (default: all found)")
    parser.add_argument("--ranks", default="1,2,3,4,5,10,20,median,last",
                        help="for noise: which complete trials, by rank (1 = best; median, last)")
    parser.add_argument("--csv", default=None, help="for noise: also write its runs (trial, seed, objective, ...) here")
    parser.add_argument("--seed-runs", nargs="+", default=None, metavar="CSV",
                        help="for replay: noise --csv files; judge the rules by the trials' mean over seeds too")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="for replay: a collapse threshold (musicssl.collapse.CollapseThresholds) for the replayed "
                        "rules in place of the search's own, e.g. complete_min_mean_cosine=0.985; repeatable")
    args = parser.parse_args()
    if args.threshold:
        if args.benchmark != "replay":
            parser.error("--threshold is for replay (a search's thresholds are hpsearch.run flags: for savings, "
                         "pass them in --search-flags)")
        args.threshold = parsed_thresholds(args.threshold, parser)
    else:
        args.threshold = {}
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        parser.error(f"--tag: letters, digits, '_', '.' and '-' only (it is part of a folder name), got {args.tag!r}")
    if args.search_flags:
        if args.benchmark != "savings":
            parser.error("--search-flags is for savings (replay and noise read the finished runs: pass --tag)")
        try:
            extra = shlex.split(args.search_flags)
        except ValueError as error:
            parser.error(f"--search-flags: {error}")
        # hpsearch.run takes unambiguous prefixes too (--trial for --trials).
        given = {token.split("=")[0] for token in extra if token.startswith("--") and len(token.split("=")[0]) > 2}
        own = sorted({flag for flag in SAVINGS_OWN_FLAGS if any(flag.startswith(name) for name in given)})
        if own:
            parser.error(f"--search-flags: {', '.join(own)} is set by the benchmark itself (use its own --trials, "
                         "--seed, --max-epochs, --storage-dir)")
        if not args.tag:
            parser.error("--search-flags changes the searches: name their runs with --tag (e.g. --tag paper), so "
                         "that they are not taken for the default runs")
    try:
        run_benchmark(args, parser)
    except UsageError as error:
        parser.error(str(error))


def run_benchmark(args, parser) -> None:
    try:
        Path(args.storage_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--storage-dir {args.storage_dir}: cannot make that folder ({error.strerror or error})") from None
    if args.benchmark == "timing":
        if args.method != "vicreg" or args.seed != 0 or args.max_epochs is not None:
            # Its target is the README's default command; savings times any method (both its runs).
            parser.error("timing is of the default search, `python -m hpsearch.run vicreg --trials N`: --method, "
                         "--seed and --max-epochs do not apply (use savings for another method or setting)")
        args.trials = args.trials or 64
        bench_timing(args)
    elif args.benchmark == "savings":
        args.trials = args.trials or 64
        bench_savings(args)
    elif args.benchmark == "replay":
        args.trials = args.trials or 64
        replay_rules(args)
    elif args.benchmark == "noise":
        args.trials = args.trials or 64
        bench_noise(args)
    elif args.benchmark == "overhead":
        args.trials = args.trials or 6
        if args.trials < 2:
            raise UsageError("overhead needs --trials 2 or more: it times the gaps between trials")
        bench_overhead(args)
    else:
        if not args.folders:
            raise UsageError("report takes the folders of finished searches: bench_search.py report runs/NAME ...")
        for folder in args.folders:
            describe(Path(folder))


if __name__ == "__main__":
    main()
