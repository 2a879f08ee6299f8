"""Hyperparameter search of one pretext method: ``python -m hpsearch.run METHOD --trials N``.

Ray Tune runs the trials (local Ray by default, or an existing cluster with ``--address``); an
Optuna sampler, seeded (TPE, or random with ``--sampler random``), proposes them from
``study_spaces/<METHOD>.py`` and records them in ``<storage-dir>/<name>/optuna.journal`` (open it with
``optuna-dashboard``). Every trial runs the shared trainer and reports its objective and collapse
metrics each epoch; a trial whose collapse verdict persists is stopped early and recorded as PRUNED
and infeasible, so TPE learns to avoid its region.

The folder ``<storage-dir>/<name>/`` then holds Ray Tune's results (a folder per trial),
``optuna.journal``, ``search.json`` (the settings), ``trials.csv`` (one row per trial),
``best_backbone.pt`` (the best trial's backbone ``state_dict``) with ``best_config.json``, and
``summary.json``, the last four rewritten after each finished trial. Re-running with the same
``--name`` (or ``--resume``) continues an interrupted search up to ``--trials`` in total.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (torch, Ray, Lightning: seconds): a Ctrl-C meanwhile is one line
    from musicssl.cli import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting("python -m hpsearch.run")

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, TextIO

from hpsearch.settings import (
    COLLAPSE_TYPES, OBJECTIVES, SAMPLERS, SCHEDULERS, SEARCH_FILE, SearchSettings, SettingsError, TrialSettings,
    flag_text, name_problem,
)  # fmt: skip
from musicssl.cli import ArgumentParser, counted
from musicssl.machine import usable_cpus
from musicssl.paths import PARTIAL_SUFFIX, os_error_in_chain, write_whole

__all__ = ["SearchError", "SearchResult", "build_parser", "main", "prepare_search_data", "run_search"]

PROG = "python -m hpsearch.run"


class SearchError(RuntimeError):
    """The search cannot start: bad method, data, folder or cluster; the message says how to fix it."""


@dataclass
class SearchResult:
    """What :func:`run_search` leaves behind."""

    folder: Path
    settings: SearchSettings
    trials: Any  # pandas DataFrame of trials.csv
    summary: Any  # hpsearch.results.SearchSummary
    interrupted: bool
    stopped_for: str | None = None  # why the search stopped itself before its trials were all run (disk room)
    stopped_advice: str = "free some space"  # what to do before continuing it


# ----------------------------------------------------------------------------------------------
# Checks that fail fast, before Ray starts


def check_method(method: str) -> None:
    """The method must be a registered pretext method whose settings the trainer can tell from its own
    (:func:`musicssl.train.check_method_fields`), with a search space module that keeps the contract of
    ``study_spaces`` (a malformed one is refused as it loads, its module and the fix named)."""
    from musicssl.pretext.registry import UnknownMethodError, get_method
    from musicssl.train import ConfigError, check_method_fields
    from study_spaces import SpaceError, UnknownSpaceError, get_space

    try:
        check_method_fields(get_method(method))
        get_space(method)
    except (UnknownMethodError, UnknownSpaceError, SpaceError, ConfigError) as error:
        raise SearchError(str(error)) from None


def check_space(settings: SearchSettings) -> tuple[int, bool]:
    """Sample the space once (in memory) and build the trainer settings from it, so that a space
    whose names or values the trainer rejects fails now rather than in every trial. Returns the
    largest batch size a trial can get, and whether the space samples it."""
    import optuna

    from hpsearch.trainable import build_train_config
    from musicssl.train import ConfigError
    from study_spaces import SpaceError, get_space

    space = get_space(settings.method)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    try:
        params = space.sample(trial)
        config = build_train_config(settings.trial_settings(), params)
    except (SpaceError, ConfigError, ValueError, TypeError) as error:
        raise SearchError(f"the search space {space.module} does not fit the trainer: {error}") from None
    note = _short_schedule_note(settings, space)
    if note:
        print(f"note: {note}", file=sys.stderr)
    distribution = trial.distributions.get("batch_size")
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        largest = max(int(choice) for choice in distribution.choices)
    elif isinstance(distribution, optuna.distributions.IntDistribution):
        largest = int(distribution.high)
    else:
        return int(config.batch_size), False
    if settings.batch_size != SearchSettings.batch_size:  # given, and not what the trials train with
        print(f"note: study_spaces/{settings.method}.py samples the batch size (up to {largest}): --batch-size "
              f"{settings.batch_size} sets only the batches the untrained reference measures its BatchNorm "
              "statistics on", file=sys.stderr)
    return largest, True


SCHEDULE_DRAWS = 200  # random draws of the space that the check of its schedules against --max-epochs looks at


def _short_schedule_note(settings: SearchSettings, space) -> str | None:
    """Where some of the configurations the space samples have a schedule longer than the trials
    (:func:`musicssl.train.schedule_notes`: a clustering teacher's temperature warm-up of 3 epochs in trials
    of 2), what share of :data:`SCHEDULE_DRAWS` random draws, with the first one's note: such trials are
    scored before their schedule ends, and the value recorded for the parameter is one they never reached."""
    import optuna

    from hpsearch.trainable import build_train_config
    from musicssl.train import schedule_notes

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    trial_settings = settings.trial_settings()
    found: list[str] = []
    for _ in range(SCHEDULE_DRAWS):
        trial = study.ask()
        try:
            notes = schedule_notes(build_train_config(trial_settings, space.sample(trial)))
        except Exception:  # noqa: BLE001 - a draw the trainer refuses is check_space's to report, not this note's
            continue
        if notes:
            found.append(notes[0].split(";")[0])
    if not found:
        return None
    return (f"{len(found)} of {SCHEDULE_DRAWS} random draws of study_spaces/{settings.method}.py have a schedule "
            f"longer than --max-epochs {settings.max_epochs}; in the first, {found[0]}. Such trials are scored before "
            "their schedule ends (trials.csv's last_train_* columns say where it was); raise --max-epochs to let "
            "every schedule finish")


def _corpus_started_on(settings: SearchSettings):
    """For a search on ``corpus`` started on the corpus of an earlier generator version (other splits): that
    corpus's :class:`TrackIndex`, read where that version built it (or from ``--root``) as the search first
    read it, so that the search continues on it (and on its mel cache); None for any other search. Raises
    :class:`SearchError` when that corpus is gone."""
    from musicssl.corpus.build import GENERATOR_VERSION, default_corpus_dir
    from musicssl.corpus.splits import corpus_identity, describe_corpus
    from musicssl.data.index import TrackIndex
    from musicssl.data.loaders import dataset_name

    started_on = settings.corpus
    if (started_on is None or dataset_name(settings.data) != "corpus"
            or started_on.get("generator_version") == GENERATOR_VERSION):
        return None
    if settings.root is not None:
        folder = Path(settings.root).expanduser()
    elif started_on.get("tracks") is not None:
        folder = default_corpus_dir(int(started_on["tracks"]), float(started_on["seconds"]), int(started_on["seed"]),
                                    version=int(started_on["generator_version"]))
    else:
        folder = None
    found = corpus_identity(folder) if folder is not None else None
    if found != started_on or not (folder / "tracks.csv").is_file():
        now = f"it holds one of {describe_corpus(found)}" if found else "it holds none"
        raise SearchError(
            f"the search was started on the corpus of {describe_corpus(started_on)}, which is no longer in {folder} "
            f"({now}); this version builds generator version {GENERATOR_VERSION}, whose splits differ, and the "
            "trials so far trained and were scored on the old ones: start a new search with another --name"
        )
    print(f"note: the search continues on the corpus it was started on ({describe_corpus(started_on)}, {folder}); "
          f"new searches use generator version {GENERATOR_VERSION}", file=sys.stderr, flush=True)
    return TrackIndex.from_csv(folder / "tracks.csv", name="corpus")  # named as `corpus` was: its mel cache


def prepare_search_data(settings: SearchSettings, verbose: bool = True, max_batch_size: int | None = None):
    """Prepare the data once, in the driver: open the dataset (building the embedded corpus if it
    is missing) and build its mel cache for the preset's front-end. Trials reuse it as is.
    ``max_batch_size``: the largest batch size the method's space samples (None where it samples none, and
    the trials train with ``settings.batch_size``)."""
    from hpsearch.results import splits_hint
    from musicssl.corpus.splits import describe_corpus
    from musicssl.data.cache import LogMelConfig
    from musicssl.data.index import GENERATED_CORPUS_KEY
    from musicssl.data.loaders import DATASET_NAMES, DatasetError, check_dataset_option, dataset_name
    from musicssl.data.pipeline import batch_problem, prepare_data
    from musicssl.models import PRESETS
    from musicssl.train import TrainConfig, listed_probe_problem, probe_problem, view_config

    if settings.preset not in PRESETS:
        raise SearchError(f"unknown --preset {settings.preset!r}; available: {', '.join(sorted(PRESETS))}")
    spec = settings.data
    started_on = _corpus_started_on(settings)
    if started_on is None and dataset_name(spec) is None and not Path(spec).expanduser().exists():
        raise SearchError(
            f"--data {spec!r}: no such file or folder, and not a dataset name "
            f"({', '.join(sorted(DATASET_NAMES))}, jamendo-*-splitK, jamendo-*-low); give a tracks.csv, a folder of "
            "audio with a tags file, or 'corpus'"
        )
    front_end = LogMelConfig(n_mels=PRESETS[settings.preset].n_mels)
    try:
        check_dataset_option(spec, settings.root, settings.audio_dir)
    except DatasetError as error:
        raise SearchError(str(error)) from None
    batch_size = max_batch_size or settings.batch_size
    fix = (f"study_spaces/{settings.method}.py samples batch sizes up to {max_batch_size}: use data with more "
           "training tracks, or leave the larger sizes out of that space" if max_batch_size
           else "lower --batch-size or use more data")

    def unscorable(valid_tracks: str, tags: int, problem: str) -> SearchError:
        fix = ("use --objective rankme, which needs no tags" if not tags else
               f"give tagged tracks to the train and the valid split {splits_hint(spec)}, or use --objective rankme, which "
               "needs no tags")
        return SearchError(
            f"--objective {settings.objective}: --data {spec!r} has {valid_tracks} valid tracks and {tags} tags: "
            f"{problem}; {fix}"
        )

    def check_index(index) -> None:  # before the cache is built, which decodes every track
        problem = batch_problem(index, batch_size)
        if problem:
            raise SearchError(f"--data {spec!r} {problem}" + (f"; {fix}" if len(index.split("train")) else ""))
        problem = listed_probe_problem(index) if settings.objective.startswith("probe_") else None
        if problem:
            raise unscorable(f"{len(index.split('valid'))} listed", len(index.tag_names), problem)

    try:
        if started_on is not None:
            data = prepare_data(started_on, front_end, verbose=verbose, check_index=check_index)
        else:
            data = prepare_data(spec, front_end, verbose=verbose, root=settings.root, audio_dir=settings.audio_dir,
                                check_index=check_index)
    except SearchError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        from musicssl.paths import cache_hint

        hint = cache_hint(error) if isinstance(error, OSError) else ""  # e.g. a MUSICSSL_CACHE that is a file
        raise SearchError(f"--data {spec!r}: {error}{hint}") from None
    found = data.index.extra.get(GENERATED_CORPUS_KEY)
    if settings.corpus is not None and found != settings.corpus:  # e.g. a corpus folder built again since
        raise SearchError(
            f"--data {settings.data!r}: the search was started on a generated corpus of "
            f"{describe_corpus(settings.corpus)}, and this data is "
            f"{describe_corpus(found) if found else 'not a generated corpus'}: its trials so far trained and were "
            "scored on other tracks or splits; start a new search with another --name"
        )
    train_ids, valid_ids = data.track_ids("train"), data.track_ids("valid")
    # A trial trains on the tracks long enough for its views (the mel cache keeps shorter ones, long enough to
    # evaluate): counted here, or each trial would fail on them.
    views = view_config(TrainConfig())
    needed = views.in_frames(data.cache.settings).min_track_frames
    # ViewDataset's rule (not the class: it raises when no track is long enough, and that is said below)
    short = sum(data.cache.frames(track_id) < needed for track_id in train_ids)
    if short and verbose:
        print(f"note: {short} of the {len(train_ids)} training tracks are too short for a trial's views (under "
              f"{needed / data.cache.settings.frames_per_second:.2f} s: {views.n_views} views of "
              f"{views.segment_seconds:g} s starting >= {views.min_gap_seconds:g} s apart): trials train on the "
              f"other {len(train_ids) - short}")
    if len(train_ids) - short < batch_size:
        long_enough = (f", {len(train_ids) - short} of them long enough for a trial's views (at least "
                       f"{needed / data.cache.settings.frames_per_second:.2f} s)" if short else "")
        raise SearchError(
            f"--data {spec!r} has {len(train_ids)} usable training tracks{long_enough}, fewer than the batch size "
            f"{batch_size}; {fix}"
        )
    if settings.objective.startswith("probe_"):
        problem = probe_problem(data)
        if problem:
            raise unscorable(f"{len(valid_ids)} usable", len(data.index.tag_names), problem)
        if len(valid_ids) < FEW_VALID_TRACKS and verbose:
            print(f"note: --objective {settings.objective} is measured on {len(valid_ids)} valid tracks: on so few, "
                  f"trials' scores tie or differ by chance more than by their settings; give the valid split more "
                  f"tracks {splits_hint(spec)}")
    now = tracks_record(data) if settings.tracks is not None else None  # a new search records it once, at its start
    if now is not None and now["digest"] != settings.tracks.get("digest"):
        def counts(record: dict) -> str:
            return ", ".join(f"{record.get(name, '?')} {name}" for name in ("train", "valid", "test", "tags"))

        raise SearchError(
            f"--data {spec!r}: the search was started on other tracks, splits or tags ({counts(settings.tracks)}; "
            f"now {counts(now)}, or the same counts of other tracks): its trials so far trained and were scored on "
            "those; restore the data as it was, or start a new search with another --name (data unchanged since "
            "may read otherwise from 2026-12-06 on: an audio file under two names, a link, is one track, and a file "
            "with a track index's columns under another name than tracks.csv joins its tags by ',' where no cell "
            "holds a ';')"
        )
    return data


# Below this many valid tracks a probe objective's scores say more about the tracks than about the settings.
FEW_VALID_TRACKS = 20


def tracks_record(data) -> dict[str, Any]:
    """What a search trains and scores on: the usable tracks of each split (ids, sorted) with their
    tags, as a SHA-256 digest, and the counts of each split's tracks and of the tags."""
    import numpy as np

    digest = hashlib.sha256(json.dumps(list(data.index.tag_names)).encode())
    labels = dict(zip(data.index.track_ids, data.index.labels()))
    record: dict[str, Any] = {}
    for split in ("train", "valid", "test"):
        ids = sorted(data.track_ids(split))  # the same tracks in another row order are the same data
        record[split] = len(ids)
        digest.update(json.dumps([split, ids]).encode())
        for track_id in ids:
            digest.update(np.packbits(np.asarray(labels[track_id], dtype=bool)).tobytes())
    record["tags"] = len(data.index.tag_names)
    record["digest"] = digest.hexdigest()
    return record


RAY_CLIENT_SCHEMES = ("ray://", "anyscale://")  # Ray Client addresses: left to Ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """The cluster an address names must answer as a Ray head does, within seconds (Ray's own
    timeout is minutes, and its error obscure): ``HOST:PORT`` (or ``auto``, resolved as Ray does:
    ``RAY_ADDRESS``, else the cluster ``ray start`` last recorded on this machine) must accept a
    connection and speak HTTP/2, as the head's GCS (a gRPC server) does; a dashboard or other
    server on that port does not. ``ray://`` client addresses are left to Ray."""
    given = address
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            address = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise SearchError("--address auto: no Ray cluster found on this machine; start one with 'ray start "
                              "--head', or leave --address out to run locally") from None
    if address.startswith(RAY_CLIENT_SCHEMES):  # given, or what RAY_ADDRESS names for auto
        return
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address as Ray writes it: [::1]:6379
        host = host[1:-1]
    elif ":" in host:  # ::1:6379 (Ray cannot read it either)
        raise SearchError(f"--address {given!r}: write an IPv6 host in brackets, e.g. [{host}]:{port}")
    if not host or not port.isdigit():
        raise SearchError(f"--address {given!r}: expected 'auto' or HOST:PORT (the head node's GCS, e.g. 10.0.0.1:6379)")
    if not 0 < int(port) < 65536:
        raise SearchError(f"--address {given!r}: port {port} is not a port number (1-65535); give the one 'ray start "
                          "--head' printed (6379 by default)")
    where = f"--address {given}" + (f" (found: {address})" if given == "auto" else "")
    tls = os.environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true")  # a TLS GCS: no plain HTTP/2
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as connection:
            if tls:
                return
            connection.settimeout(timeout)
            # HTTP/2's client preface and an empty SETTINGS frame; a gRPC server answers with a SETTINGS frame.
            connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            reply = b""
            while len(reply) < 9:
                chunk = connection.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError as error:
        raise SearchError(
            f"{where}: cannot reach a Ray cluster there ({error}); start one with 'ray start --head' on that "
            "machine, or leave --address out to run locally"
        ) from None
    if not reply:
        raise SearchError(
            f"{where}: the connection opens but nothing answers (a tunnel or port forward with no Ray head "
            "behind it?); check that 'ray start --head' runs there"
        )
    if len(reply) < 9 or reply[3] != 0x04:
        raise SearchError(
            f"{where}: something answers there, but not a Ray head node's GCS; give the address 'ray start "
            "--head' printed (HOST:6379 by default; not the dashboard's port)"
        )


# ----------------------------------------------------------------------------------------------
# The search


def _experiment_folder(settings: SearchSettings) -> Path:
    return (Path(settings.storage_dir).expanduser() / settings.name).absolute()


def default_name(method: str, storage_dir: str | Path) -> str:
    """``<method>-<YYYYmmdd-HHMMSS>``, with a suffix if that folder exists (never reuse one).

    The folder is created here, atomically, so that two searches started in the same second cannot
    both pick it; :func:`run_search` removes it again if the search fails before it starts.
    """
    base = f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(storage_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    name, number = base, 2
    while True:
        try:
            (root / name).mkdir()
            return name
        except FileExistsError:
            name, number = f"{base}-{number}", number + 1


def check_storage(settings: SearchSettings) -> None:
    """Refuse a ``--storage-dir`` that is not a folder this process can create and write in."""
    from musicssl.paths import make_writable_folder

    if Path(settings.storage_dir).expanduser().is_file():
        raise SearchError(f"--storage-dir {settings.storage_dir}: is a file, not a folder; give a folder you can "
                          "write in")
    try:
        make_writable_folder(Path(settings.storage_dir).expanduser())
    except OSError as error:
        raise SearchError(f"--storage-dir {settings.storage_dir}: cannot write there ({error.strerror or error}); "
                          "give a folder you can write in") from None


def check_room(settings: SearchSettings, folder: Path, finished: int, checkpoint: int, resume: bool,
               local: bool = True):
    """Refuse to start (or continue) a search without disk room for the trials it runs at once, and
    say so when the trials left need more than there is (it stops when the room runs short). Returns
    the room under which the running search stops (:func:`hpsearch.room.room_floors`; ``local``: its
    trials run on this machine, and stage their files in its temporary folders)."""
    from hpsearch.room import room_floors, room_problem, search_bytes
    from musicssl.paths import free_bytes, size_text

    left = max(settings.trials - finished, 0)
    floors = room_floors(settings, checkpoint, folder, left, local)
    shown = folder if resume else Path(settings.storage_dir).expanduser()  # a new search's folder is not made yet
    problem = room_problem({shown if path == folder else path: floor for path, floor in floors.items()}, shown)
    if problem:
        raise SearchError(f"{problem}: free some space, or " + (
            "move the search's folder to a disk with room and give --storage-dir its new place" if resume
            else "give --storage-dir a folder on a disk with room"))
    need, free = search_bytes(settings, checkpoint, left), free_bytes(shown)
    if free is not None and need > free:
        print(f"note: the {counted(left, 'trial')} left take about {size_text(need)} on disk, and the disk of "
              f"{shown} has {size_text(free)} free: the search stops when the room runs short, and continues with "
              "--resume once there is more", file=sys.stderr, flush=True)
    return floors


def _trial_settings(settings: SearchSettings, own_ray: bool) -> TrialSettings:
    """What the trials share; the trials of a Ray this search started (``own_ray``) stage their checkpoints
    in the temporary folder whose disk the search watches (:func:`hpsearch.room.trial_temp_dir`), the
    others (on a cluster's nodes) in their own."""
    from hpsearch.room import trial_temp_dir

    trial = settings.trial_settings()
    return dataclasses.replace(trial, staging_dir=str(trial_temp_dir())) if own_ray else trial


def _disk_full_error(error: BaseException, folder: Path, settings: SearchSettings, address: str | None) -> SearchError | None:
    """For an error that is a write finding a disk full: which disk, and what to do, as a :class:`SearchError`.
    The disk is the one of the file the error names, else the fullest of the search's folder's and the
    temporary folders' (Ray's copies of the trials' files name none)."""
    from hpsearch.room import ray_temp_dir, temp_folder_text, temp_move_text, trial_temp_dir
    from musicssl.paths import free_bytes, full_disk_error, same_file_system

    found = full_disk_error(error)
    if found is None:
        return None
    temps = (ray_temp_dir(), trial_temp_dir())
    if isinstance(found.filename, (str, bytes, os.PathLike)):
        where = _written_file(found.filename)
    else:
        # One candidate per file system, the search's folder first: free space read twice on one disk that
        # other work is filling would name the temporary folder for the folder's own disk.
        candidates: list[Path] = []
        for path in (folder, *temps):
            if not any(same_file_system(path, kept) for kept in candidates):
                candidates.append(path)
        where = min(candidates, key=lambda path: free_bytes(path) or 0)
    temp = ""
    if not (where == folder or folder in where.parents) and any(where == t or t in where.parents for t in temps):
        temp = f", {temp_folder_text(where)} ({temp_move_text(where)})"
    return SearchError(f"the disk of {where}{temp} is full ({found.strerror or 'no space left'}); free some space "
                       f"there, and continue the search with {_continue_command(settings, address)}")


# A write refused (the folder's permissions, a file made immutable, a file system mounted read-only).
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _written_file(filename: str | bytes | os.PathLike) -> Path:
    """The file a write was for: the target of ``musicssl.paths.whole``'s partial file (``.NAME.PID.partial``)."""
    path = Path(os.fsdecode(filename))
    found = re.fullmatch(r"\.(.+)\.\d+" + re.escape(PARTIAL_SUFFIX), path.name)
    return path.with_name(found.group(1)) if found else path


def _not_writable_error(error: BaseException, settings: SearchSettings, address: str | None) -> SearchError | None:
    """For an error that is a write refused (:data:`NOT_WRITABLE_ERRNOS`, in ``error``'s chain), a :class:`SearchError`
    naming the file and saying how to go on: the search's results, written after its trials, would otherwise end
    it in a traceback."""
    found = os_error_in_chain(error, NOT_WRITABLE_ERRNOS)
    if found is None:
        return None
    where = _written_file(found.filename) if found.filename else "the search's folder"
    return SearchError(f"{where} cannot be written ({found.strerror}); make it writable again, and continue the search "
                       f"with {_continue_command(settings, address)}")


def latest_search(method: str, storage_dir: str | Path) -> str | None:
    """The search of ``method`` in ``storage_dir`` last started or resumed (its ``search.json`` is the
    newest), among those named by default (for ``--resume`` without ``--name``)."""
    default = re.compile(rf"{re.escape(method)}-\d{{8}}-\d{{6}}(-\d+)?")  # default_name's, not a --name's
    folders = [p.parent for p in Path(storage_dir).expanduser().glob(f"{method}-*/{SEARCH_FILE}")
               if default.fullmatch(p.parent.name)]
    return max(folders, key=lambda p: (p / SEARCH_FILE).stat().st_mtime).name if folders else None


def probe_memory_note(settings: SearchSettings, memory_bytes: int | None = None) -> str | None:
    """A note when the trials' probe sets alone (``--probe-segments`` log-mel crops each, held for the
    whole trial) would take over a quarter of this machine's memory: Ray then kills trials for memory
    (each is recorded as failed), so the whole search may fail one trial at a time."""
    from musicssl.models import PRESETS

    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not on this system
            return None
    preset = PRESETS[settings.preset]
    per_trial = settings.probe_segments * preset.n_mels * preset.n_frames * 4  # float32
    total = per_trial * settings.concurrency
    if total <= memory_bytes / 4:
        return None
    return (f"each trial's probe set of {settings.probe_segments} segments takes {per_trial / 2**30:.1f} GiB, "
            f"{total / 2**30:.1f} GiB for {settings.concurrency} trials at a time, of this machine's "
            f"{memory_bytes / 2**30:.0f} GiB; Ray kills trials that run it out of memory (lower --probe-segments; "
            "256, the default, is plenty for the collapse metrics)")


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def check_local_gpus(settings: SearchSettings) -> None:
    """A local search with ``--gpus-per-trial`` needs that many CUDA devices on this machine: Ray would
    otherwise wait for them forever, warning only in its logs."""
    if settings.gpus_per_trial <= 0:
        return
    found = _local_gpus()
    if found < math.ceil(settings.gpus_per_trial):
        raise SearchError(
            f"--gpus-per-trial {settings.gpus_per_trial:g}: this machine has {found} CUDA device(s) that torch can "
            "use; train on the CPU with --gpus-per-trial 0 (also when resuming a search started with GPUs), or run on a "
            "cluster with GPUs (--address)"
        )


def cluster_shortfalls(nodes: list[dict[str, float]], cpus: float, gpus: float) -> list[str]:
    """What keeps a trial of ``cpus`` CPUs and ``gpus`` GPUs off every node (``nodes``: each alive
    node's total resources, as ``ray.nodes()`` gives them): Ray places a trial's resources together,
    on one node. Empty when some node can hold it."""
    if any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        return []
    short = []
    for resource, flag, wanted in (("CPU", "--cpus-per-trial", cpus), ("GPU", "--gpus-per-trial", gpus)):
        largest = max((node.get(resource, 0) for node in nodes), default=0)
        if wanted > largest:
            short.append(f"{flag} {wanted:g} but no node of the cluster has {wanted:g} {resource}(s) now (the most "
                         f"on one node: {largest:g})")
    if not short:  # each fits on some node, never both on one
        most_cpus = max((node.get("CPU", 0) for node in nodes if node.get("GPU", 0) >= gpus), default=0)
        short.append(f"--cpus-per-trial {cpus:g} with --gpus-per-trial {gpus:g}, but no node of the cluster has both "
                     f"now (the most CPUs on a node with {gpus:g} GPU(s): {most_cpus:g})")
    return short


def cluster_room(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many trials of ``cpus`` CPUs and ``gpus`` GPUs the nodes (each alive node's total resources)
    hold at once: each trial on one node."""
    def fits(node: dict[str, float]) -> int:
        counts = [math.floor(node.get(resource, 0) / wanted + 1e-9)
                  for resource, wanted in (("CPU", cpus), ("GPU", gpus)) if wanted > 0]
        return min(counts) if counts else 0

    return sum(fits(node) for node in nodes)


def warn_cluster_too_small(settings: SearchSettings) -> None:
    """Where no node of the cluster can hold a trial now, trials wait, and Ray says so only after a
    minute, in terms of its own API: said here at once, with the flags to change (a warning: a node
    that joins later may still run them). Where it holds fewer than ``--concurrency`` at once, a note:
    the others wait, though the searcher draws their settings as Ray queues them (TPE then learns from
    fewer finished trials), and their Optuna trials show as RUNNING meanwhile."""
    import ray

    nodes = [node.get("Resources") or {} for node in ray.nodes() if node.get("Alive")]
    shortfalls = cluster_shortfalls(nodes, settings.cpus_per_trial, settings.gpus_per_trial)
    for shortfall in shortfalls:
        print(f"warning: {shortfall}; trials wait until such a node joins, or ask for less", file=sys.stderr,
              flush=True)
    room = cluster_room(nodes, settings.cpus_per_trial, settings.gpus_per_trial)
    if not shortfalls and room < min(settings.concurrency, settings.trials):
        gpus = f" and {settings.gpus_per_trial:g} GPU(s)" if settings.gpus_per_trial else ""
        print(f"note: --concurrency {settings.concurrency}, but the cluster holds {counted(room, 'trial')} of "
              f"{settings.cpus_per_trial:g} CPU(s){gpus} at a time now: the others wait for room, their settings "
              "drawn as they are queued (TPE learns from fewer finished trials) and their Optuna trials RUNNING "
              f"meanwhile; give --concurrency {room}, or add nodes", file=sys.stderr, flush=True)


def _ray_environment(local: bool, verbose: bool) -> None:
    # Ray 2.60 turns on token authentication for local clusters; a local search needs none.
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not verbose:
        # Tune's newer console output prints its configuration table even at verbose=0; the
        # classic one is silent there, and ProgressPrinter reports instead.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _settle_temporary_folders() -> None:
    """For a search on this machine, before anything reads them: relative temporary folders made absolute
    (Ray's processes run in other folders: a relative ``TMPDIR`` failed Ray's start after 30 s, "The current
    node timed out during startup", with a traceback), and a ``TMPDIR`` not made yet made now, as Ray makes
    it when it starts. The trials stage their checkpoints there (:func:`hpsearch.room.trial_temp_dir`), and
    the room the search keeps is counted there from its first check."""
    for name in ("RAY_TMPDIR", "TMPDIR", "TEMP", "TMP"):
        value = os.environ.get(name)
        if value and not os.path.isabs(value):
            os.environ[name] = os.path.abspath(value)
    if os.environ.get("TMPDIR"):
        with contextlib.suppress(OSError):  # a folder that cannot be made: Python and Ray pass over it
            os.makedirs(os.environ["TMPDIR"], exist_ok=True)


def trial_folder_name(trial) -> str:
    """``trial-<Optuna number>-<Tune id>`` (:func:`hpsearch.results.trial_folder_name`)."""
    from hpsearch.results import trial_folder_name as folder_name

    return folder_name(trial.config.get("optuna_trial"), trial.trial_id)


def _init_ray(settings: SearchSettings, address: str | None, verbose: bool, reserved: Path | None = None) -> bool:
    """Start (or join) Ray; returns whether this call started it (and so must shut it down).

    ``reserved``: the empty folder reserved for the search's default name, removed when a signal ends
    the process while Ray starts (:func:`_stops_held_while_ray_starts`)."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.WARNING
    held: list[int] = []
    end_now = functools.partial(_end_a_stuck_start, reserved)
    try:
        with _stops_held_while_ray_starts(held, abandon=end_now):
            if address:
                try:
                    # Something that answers as a gRPC server but is no Ray head (a raylet's port, Ray Client's,
                    # another service) holds ray.init for 30 s or minutes: the search ends, as an error, once Ray
                    # says no GCS answers there (_join_output), or else after JOIN_TIMEOUT_S.
                    with contextlib.ExitStack() as joining:
                        if not address.startswith(RAY_CLIENT_SCHEMES):  # Ray Client waits, and says why
                            joining.enter_context(_or_end_after(
                                _join_timeout(), functools.partial(_end_a_join_that_hangs, address, reserved)))
                            joining.enter_context(_join_output(functools.partial(_end_at_no_gcs, address, reserved)))
                        ray.init(address=address, logging_level=level, log_to_driver=verbose)
                except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as error:
                    # RayError: e.g. AuthenticationError, a cluster with token authentication and no token here.
                    raise SearchError(f"--address {address}: could not join the Ray cluster: {error}") from None
            else:
                cpus = max(1, math.ceil(settings.concurrency * settings.cpus_per_trial))
                available = usable_cpus()
                if cpus > available:
                    threads = max(1, math.floor(settings.cpus_per_trial))
                    print(f"note: {cpus} CPUs requested for {counted(settings.concurrency, 'concurrent trial')}, "
                          "this search "
                          f"may use {available} (its CPU affinity and quota): they run all the same, "
                          + (f"each with {threads} torch threads, much slower than with at most {available} "
                             f"(lower --cpus-per-trial to at most {available})" if threads > available else
                             "sharing its cores (lower --concurrency or --cpus-per-trial)"),
                          file=sys.stderr)
                # address="local": a Ray of this search's own, even when another Ray (a cluster started with
                # `ray start`, another search) runs on this machine; plain ray.init() would try to join that one.
                # The GPUs are those torch sees (check_local_gpus counted them), not Ray's own count, which can
                # miss a GPU that torch uses (no NVML library) and leave GPU trials waiting for good.
                gpus = _local_gpus() if settings.gpus_per_trial > 0 else None
                try:
                    with _ray_processes_in_a_group_of_their_own():
                        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                                 logging_level=level, log_to_driver=verbose)
                except OSError as error:  # before Ray starts a process (a traceback before, exit 1)
                    if "AF_UNIX path length" not in str(error):
                        raise
                    from hpsearch.room import ray_temp_dir

                    raise SearchError(f"Ray cannot start in its temporary folder {ray_temp_dir()}: the paths of its "
                                      "sockets there would be longer than the 107 bytes the system allows; set "
                                      "RAY_TMPDIR to a folder with a shorter path, such as /tmp/ray") from None
    except BaseException:
        if not held:
            raise
        # The stop asked for comes first: the same signal, sent to every process of a job, may have
        # stopped Ray's own processes and failed its start; or a second one interrupted it.
    if held:  # a Ctrl-C or SIGTERM came while Ray started: stop as Ctrl-C does, before the search begins
        # A Ray whose start failed (its GCS stopped by the same SIGTERM, sent to every process of a job) can
        # hold ray.shutdown() for 25 s: after a SIGTERM, the process ends if it takes over 5 s. Signals are
        # ignored meanwhile (one more must not cut the shutdown or that limit short), and their handlers
        # come back set in the kernel too (ray.shutdown() sets SIGTERM's action back to the default there).
        with contextlib.ExitStack() as stopping:
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGTERM, signal.SIGINT):
                    handler = signal.signal(signum, signal.SIG_IGN)
                    stopping.callback(signal.signal, signum, signal.SIG_DFL if handler is None else handler)
            if signal.SIGTERM in held:
                stopping.enter_context(_or_end_after(5.0, end_now))
            with contextlib.suppress(Exception):
                ray.shutdown()
        raise KeyboardInterrupt
    return True


def _end_a_stuck_start(reserved: Path | None) -> None:
    """End the process from a thread while ``ray.init`` is stuck in Ray's own code (its GCS stopped by
    a signal sent to every process of the job: Ray waits 30-60 s for it). Nothing of the search has
    begun; the folder reserved for its default name is removed. Ray's processes end with this one."""
    _end_before_the_search(reserved, "interrupted (while Ray was starting)", 130)


def _end_before_the_search(reserved: Path | None, line: str, code: int) -> None:
    """End the process at once from any thread, before anything of the search began: remove the folder
    reserved for its default name, say ``line`` and exit with ``code``."""
    if reserved is not None:
        with contextlib.suppress(OSError):
            reserved.rmdir()
    if _STDERR_HELD:  # the line must reach the console, not the join's capture (_join_output)
        with contextlib.suppress(OSError):
            os.dup2(_STDERR_HELD[0], 2)
    with contextlib.suppress(OSError):  # os.write: the main thread may hold sys.stderr's lock
        os.write(2, f"{PROG}: {line}\n".encode())
    os._exit(code)


JOIN_TIMEOUT_S = 60.0  # joining a Ray cluster takes seconds; HPSEARCH_JOIN_TIMEOUT_S changes the limit


def _join_timeout() -> float:
    text = os.environ.get("HPSEARCH_JOIN_TIMEOUT_S", "")
    try:
        value = float(text) if text.strip() else JOIN_TIMEOUT_S
    except ValueError:
        value = JOIN_TIMEOUT_S
    return value if math.isfinite(value) and value > 0 else JOIN_TIMEOUT_S


def _end_a_join_that_hangs(address: str, reserved: Path | None) -> None:
    """End the process, as a command-line error, when ``ray.init`` has not joined the cluster at
    ``address`` in time (Ray's own wait is minutes). Nothing of the search has begun."""
    _end_before_the_search(
        reserved, f"error: --address {address}: no Ray cluster joined within {_join_timeout():g} s (something "
        "answers there, but not as a Ray head's GCS does, or the head is slow to answer); give the address 'ray "
        "start --head' printed (HOST:6379 by default; ray://HOST:10001 for Ray Client), or set "
        "HPSEARCH_JOIN_TIMEOUT_S for a cluster slower to answer", 2)


def _end_at_no_gcs(address: str, reserved: Path | None) -> None:
    """End the process, as a command-line error, when the server at ``address`` answered Ray's first call
    to a GCS with "no such method": a gRPC server, but no Ray head's GCS (a raylet's port, say). Ray
    itself would retry for 30 s, printing a line each second."""
    _end_before_the_search(
        reserved, f"error: --address {address}: a gRPC server answers there, but not a Ray head's GCS (a raylet's "
        "or another service's port, or a Ray of another version); give the address 'ray start --head' printed "
        "(HOST:6379 by default)", 2)


# The console's stderr while _join_output holds file descriptor 2 (a duplicate of it), for a line that
# ends the process meanwhile (_end_before_the_search).
_STDERR_HELD: list[int] = []
# What Ray's C++ client writes each second while the server at the address answers its first call to a
# GCS with gRPC's UNIMPLEMENTED: no GCS serves there.
_NO_GCS_LINE = re.compile(r"Failed to get cluster ID from GCS server: .*rpc_code: 12\b")


@contextlib.contextmanager
def _join_output(no_gcs: Callable[[], None], every: float = 0.2) -> Iterator[None]:
    """Hold what is written to stderr (file descriptor 2: Ray's C++ core writes there) while ``ray.init``
    joins a cluster, and write it out after, as it was. A thread reads it meanwhile: once Ray's client
    says that no GCS answers at the address (:data:`_NO_GCS_LINE`), it calls ``no_gcs``, which must end
    the process. Where stderr cannot be held (no temporary folder, say) the block runs as it is."""
    saved = None
    try:
        sink = tempfile.TemporaryFile()
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(ValueError, OSError, AttributeError):  # a closed or absent (None) sys.stderr
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
    except OSError:
        if saved is not None:
            os.close(saved)
        sink.close()
        yield
        return
    _STDERR_HELD.append(saved)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            with contextlib.suppress(OSError):
                if _NO_GCS_LINE.search(os.pread(sink.fileno(), 1 << 20, 0).decode(errors="replace")):
                    no_gcs()

    watcher = threading.Thread(target=watch, name="hpsearch-join-output", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        with contextlib.suppress(ValueError, OSError, AttributeError):  # (None: stderr closed)
            sys.stderr.flush()
        os.dup2(saved, 2)
        _STDERR_HELD.remove(saved)
        os.close(saved)
        with contextlib.suppress(OSError):
            held = memoryview(os.pread(sink.fileno(), 1 << 24, 0))
            while held:
                held = held[os.write(2, held):]
        sink.close()


@contextlib.contextmanager
def _or_end_after(seconds: float, end: Callable[[], None]) -> Iterator[None]:
    """Call ``end`` (which must end the process) from a thread of its own if the block is still running
    after ``seconds``: for Ray's code that waits for processes a signal stopped, where no handler runs."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            end()

    threading.Thread(target=watch, name="hpsearch-stop-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


@contextlib.contextmanager
def _stops_held_while_ray_starts(held: list[int], at_most: float = 5.0, stuck: float = 3.0,
                                 abandon: Callable[[], None] = functools.partial(_end_a_stuck_start, None)
                                 ) -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM that comes while ``ray.init`` runs (about 3-5 s locally): it is added
    to ``held``, and the caller stops once Ray has started. A second signal, or ``at_most`` seconds
    after the first with Ray still starting, interrupts the start (KeyboardInterrupt). After a SIGTERM,
    if Ray's own code holds the start ``stuck`` seconds more, ``abandon()`` is called from a thread of
    its own, and must end the process (a Ctrl-C never ends it so: in a notebook, the kernel).

    ``ray.init`` sets SIGTERM handlers of its own: one exits at once with code 15 and no word, its
    node's stops Ray's processes and exits with code 1. And it starts Ray's processes through fork
    hooks in which Python ignores an exception: a SIGTERM (or Ctrl-C) that came there was lost, and
    the search ran on to its end. A SIGTERM sent to every process of a job stops Ray's GCS or raylet
    too, and ``ray.init`` then waits 30-60 s in Ray's C++ code, where no Python handler runs: a thread
    learns of the signal through Python's wakeup file descriptor and ends the wait (not in the first
    half second of Ray's GCS, before it says its port: Ray then waits up to 30 s for it holding the
    GIL, and no thread of this process runs Python). Other signals that reach that descriptor go on to
    the one set before (an asyncio loop's, say). A SIGINT that is ignored (a background job of a
    script) stays ignored. (Ray's core worker, made in the last half second of ``ray.init``, also
    prints a stack dump for a SIGTERM before it passes it on to the handler here.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    closing = threading.Event()
    main = threading.main_thread().ident

    def hold(signum, frame):
        if held and not closing.is_set():
            raise KeyboardInterrupt
        held.append(signum)

    def watch(signals: socket.socket, passed_on: int) -> None:
        first: tuple[float, int] | None = None
        interrupted_at = None
        while not closing.is_set():
            try:
                for signum in signals.recv(64):
                    if signum in stops:
                        first = first or (time.monotonic(), signum)
                    elif passed_on >= 0:
                        with contextlib.suppress(OSError):
                            os.write(passed_on, bytes([signum]))
            except (TimeoutError, OSError):  # TimeoutError: no signal within the socket's timeout
                pass
            now = time.monotonic()
            if first is None and held:  # a signal held whose byte the thread did not read
                first = (now, held[0])
            if first is not None and interrupted_at is None and now - first[0] >= at_most:
                # A start in Python code is interrupted there: hold() raises. A SIGINT where it is handled
                # (for a SIGTERM, Ray's core worker would print a stack dump first).
                signal.pthread_kill(main, signal.SIGINT if signal.SIGINT in stops else first[1])
                interrupted_at = now
            if (interrupted_at is not None and now - interrupted_at >= stuck and first[1] == signal.SIGTERM
                    and not closing.is_set()):
                abandon()
                return

    try:
        from ray._private import utils

        set_sigterm_handler = utils.set_sigterm_handler
    except (ImportError, AttributeError):  # another Ray: its handler may replace the one set here
        set_sigterm_handler = None
    with contextlib.ExitStack() as restore:  # undone in the reverse order, each step even if one fails
        reader, writer = socket.socketpair()
        restore.callback(writer.close)
        restore.callback(reader.close)
        writer.setblocking(False)
        reader.settimeout(0.05)
        if set_sigterm_handler is not None:
            utils.set_sigterm_handler = lambda handler: None
            restore.callback(setattr, utils, "set_sigterm_handler", set_sigterm_handler)
        stops = [signum for signum in (signal.SIGTERM, signal.SIGINT)
                 if signal.getsignal(signum) is not signal.SIG_IGN or signum == signal.SIGTERM]
        # The descriptor first: a signal that comes from here on reaches the thread.
        passed_on = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        restore.callback(signal.set_wakeup_fd, passed_on)
        for signum in stops:
            previous = signal.signal(signum, hold)  # None: a handler set outside Python
            restore.callback(signal.signal, signum, signal.SIG_DFL if previous is None else previous)
        watcher = threading.Thread(target=watch, args=(reader, passed_on), name="hpsearch-held-stop", daemon=True)
        watcher.start()
        restore.callback(watcher.join)  # a signal it sent meanwhile reaches hold(), not the handlers restored
        restore.callback(closing.set)  # from here a signal is only held: nothing may cut the restoring short
        yield


@contextlib.contextmanager
def _ray_processes_in_a_group_of_their_own():
    """Start the local Ray's processes (its GCS, raylet and helpers) each in a process group of its own.

    A signal to the search's process group (GNU ``timeout``, ``kill -TERM -PGID``) then reaches the
    search alone, which stops its trials through Ray and prints its summary. In the search's group,
    Ray's GCS and raylet died with it: the search hung for a minute and ended with a GCS error,
    without a summary. They still end with the search: ``ray.shutdown`` stops them, and the kernel
    ends them when it dies (Ray's fate sharing, Linux only). Elsewhere (macOS) Ray instead starts a
    reaper that ends the search's process group when the search dies, so there they stay in it.
    Ray starts them through ``ray._private.services.ConsolePopen``, with a ``preexec_fn`` of its
    own; the new group is made there (``Popen(process_group=...)`` needs Python 3.11).
    """
    try:
        from ray._private import services
        from ray._private.utils import detect_fate_sharing_support

        original = services.ConsolePopen
    except (ImportError, AttributeError):
        if sys.platform.startswith("linux"):
            warnings.warn("this Ray version has no ray._private.services.ConsolePopen: a signal to the search's "
                          "process group also stops its Ray (pip install -c constraints.txt -e .)",
                          RuntimeWarning, stacklevel=3)
        yield
        return
    if not sys.platform.startswith("linux") or not detect_fate_sharing_support():
        yield
        return

    class InAGroupOfItsOwn(original):
        def __init__(self, *args, **kwargs):
            ray_preexec = kwargs.get("preexec_fn")

            def preexec():
                os.setpgid(0, 0)
                if ray_preexec is not None:
                    ray_preexec()

            kwargs["preexec_fn"] = preexec
            super().__init__(*args, **kwargs)

    services.ConsolePopen = InAGroupOfItsOwn
    try:
        yield
    finally:
        services.ConsolePopen = original


@contextlib.contextmanager
def _search_restored_as_now_asked(concurrency: int, folder: Path):
    """A resumed search runs ``concurrency`` trials at a time, as ``--concurrency`` now says, asks its
    searcher for trials again, and puts its new trials in ``folder``, where it now is.

    Ray Tune restores the ConcurrencyLimiter it wraps the searcher in from the experiment state,
    with the limit the search started with, and offers no way to change it; so, while the search
    resumes, the limiter's restored state takes this limit (its set_state, scoped to this call).
    Likewise the SearchGenerator around them restores whether the searcher said it had finished: it says so
    when the search stops because its study cannot be written (hpsearch.searcher), and then a resumed search
    would start no trial. The searcher says again when the study holds every trial.

    The SearchGenerator also restores the experiment it makes new trials from, with the storage of the folder
    the search was saved in: Ray moves the restored trials to the folder it resumes from (TuneController.
    _restore_trials), not that. So a search folder moved (or copied) and resumed there put each new trial's
    folder and checkpoint in the old place: a moved folder's trials failed after training ("Unable to set up
    cluster storage"), a copy's best trial could have no checkpoint in the copy, and the original folder got
    trials its journal never had. The experiment's storage takes ``folder`` as Ray's does for the trials."""
    import copy

    from ray.train._internal.storage import get_fs_and_path
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.search_generator import SearchGenerator

    original, original_generator = ConcurrencyLimiter.set_state, SearchGenerator.set_state

    def set_state(self, state):
        original(self, state)
        self.max_concurrent = concurrency

    def set_generator_state(self, state):
        original_generator(self, state)
        self._finished = False
        experiment = self._experiment
        if experiment is not None and getattr(experiment, "storage", None) is not None:
            storage = copy.copy(experiment.storage)
            storage.storage_filesystem, path = get_fs_and_path(str(folder.parent))
            storage.storage_fs_path = Path(path).as_posix()
            storage.experiment_dir_name = folder.name
            experiment.storage = experiment.spec["storage"] = storage

    ConcurrencyLimiter.set_state, SearchGenerator.set_state = set_state, set_generator_state
    try:
        yield
    finally:
        ConcurrencyLimiter.set_state, SearchGenerator.set_state = original, original_generator


class _NoRayResumeHint(logging.Filter):
    """Drops Ray Tune's "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)":
    the search's summary gives the command that continues it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Experiment has been interrupted")


class _NoMissingTrialFolders(logging.Filter):
    """Drops Ray Tune's "Failed to fetch metrics for N trial(s) ... result.json and progress.csv were not
    found" as a search resumes: it names the trials a stop interrupted before Ray first copied their
    folders, which run again from their start (finished trials' folders are copied as they end)."""

    shown = False  # --verbose shows it (set for the search running in this process)

    def filter(self, record: logging.LogRecord) -> bool:
        return type(self).shown or not record.getMessage().startswith("Failed to fetch metrics")


class _StateNotSavedInOneLine(logging.Filter):
    """Ray Tune's "Saving experiment state to storage at ... failed with exception:" (its save at the end of a
    run) and the syncer's "Last sync command failed with the following error:" (a periodic save, said at the
    next one), each with a traceback, when the cause is an OSError (a disk that fills at once, before the
    search's watch stops it; a quota spent): one line, a warning, once per search and reason (the search
    stops for it). Ray saves the state again as the search goes on; a resume starts from the state saved
    last. --verbose keeps the tracebacks."""

    shown = False
    said: str | None = None  # the line said (set back as each search starts)

    def filter(self, record: logging.LogRecord) -> bool:
        if type(self).shown:
            return True
        message = record.getMessage()
        if message.startswith("Saving experiment state to storage"):
            error = record.exc_info[1] if record.exc_info else None
        elif message.startswith("Last sync command failed"):
            error = sys.exc_info()[1]  # logged in Ray's except block, the traceback in the message's text
        else:
            return True
        if not isinstance(error, OSError):
            return True
        reason = os.strerror(error.errno) if error.errno else str(error)
        text = (f"Ray Tune could not save the search's state in its folder ({reason}); a resume starts from the state "
                "saved last")
        if text == type(self).said:
            return False
        type(self).said = text
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _OneFailedTrialTraceback(logging.Filter):
    """Ray Tune's "Trial task failed for trial ...", with the trial's traceback, for every failed trial: a search
    whose trials fail for one cause (the data, a setting) printed the same long traceback once per trial. The
    first of a search is kept, and says so; the later ones are left out here, where each trial's progress line
    says it failed and why (``trials.csv``'s error column), and Ray keeps each traceback in the trial's folder
    (``error.txt``). --verbose keeps every one."""

    shown = False
    seen = False  # the search's first was let through (set back as each search starts)

    def filter(self, record: logging.LogRecord) -> bool:
        if type(self).shown or not record.getMessage().startswith("Trial task failed"):
            return True
        if type(self).seen:
            return False
        type(self).seen = True
        record.msg, record.args = (f"{record.getMessage()} (the traceback of the search's first failed trial; those of "
                                   "later ones are in error.txt in each trial's folder, and --verbose shows them "
                                   "here)"), ()
        return True


def _leave_the_resume_hint_to_the_summary(verbose: bool = False) -> None:
    _NoMissingTrialFolders.shown = _StateNotSavedInOneLine.shown = _OneFailedTrialTraceback.shown = verbose
    _StateNotSavedInOneLine.said = None
    _OneFailedTrialTraceback.seen = False
    for name, kind in (("ray.tune.tune", _NoRayResumeHint),
                       ("ray.tune.execution.tune_controller", _OneFailedTrialTraceback),
                       ("ray.tune.analysis.experiment_analysis", _NoMissingTrialFolders),
                       ("ray.tune.execution.experiment_state", _StateNotSavedInOneLine),
                       ("ray.train._internal.syncer", _StateNotSavedInOneLine)):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, kind) for existing in logger.filters):
            logger.addFilter(kind())


def _sigterm_as_ctrl_c(when_ray_is_lost=None):
    """Handle SIGTERM (``kill``, ``timeout``, batch schedulers) as Ctrl-C: Ray Tune then stops the
    trials, saves the experiment and the summary says how to continue. Without this, Ray's handler
    aborts the driver with a stack dump. Returns the handler to restore afterwards (None off the
    main thread, where signals cannot be handled).

    ``when_ray_is_lost`` (given while the search runs on a Ray it started or joined) is called
    instead, and must not return, when the same signal has stopped that Ray (:func:`_ray_lost`); if the
    signal came while the searcher was writing to the study, once that write is done.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        if _ray_lost_seen.is_set() and _when_ray_is_lost is not None:  # sent by _watch_ray: not a signal of the job
            _end_without_ray(_when_ray_is_lost)
            return
        if when_ray_is_lost is not None and _ray_lost():
            _end_without_ray(when_ray_is_lost)
            return  # deferred: the interrupted write goes on, and ends the search when it is done
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):  # Ray Tune's while it runs (a graceful stop), else Python's default
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored (a background job of a script): stop all the same
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    return signal.SIG_DFL if previous is None else previous  # None: a handler set outside Python


def _end_without_ray(end: Callable[[], None]) -> None:
    """Call ``end`` (which must not return) once the searcher is not writing to the study, with
    SIGTERM and SIGINT ignored from now on: nothing may cut the write or the end short."""
    from hpsearch.searcher import after_study_writes

    for ignored in (signal.SIGTERM, signal.SIGINT):
        signal.signal(ignored, signal.SIG_IGN)
    after_study_writes(end)


# While a search runs on a Ray it started or joined: how it ends when that Ray is lost (_run_search).
_when_ray_is_lost: Callable[[], None] | None = None
# Set by _watch_ray as it sends the search its SIGTERM: the handler then ends it as _when_ray_is_lost says.
_ray_lost_seen = threading.Event()
# How long the search's Ray must stay lost before _watch_ray ends the search: a cluster's GCS that restarts
# (GCS fault tolerance) is back within seconds; Ray's own code ends the search 60 s after it lost the GCS.
RAY_LOST_SECONDS = 10.0
_FINISHING = threading.Lock()  # held by the one thread that ends a search whose Ray is lost


@contextlib.contextmanager
def _ending_when_ray_is_lost(end: Callable[[], None] | None) -> Iterator[None]:
    """While the block runs, a trial whose worker fails because the search's own Ray is gone calls
    ``end`` (see :func:`_fail_trials_whose_worker_is_lost`), and so does a Ray found lost by a look every
    second (:func:`_watch_ray`), with no trial's worker failing (a cluster's GCS that crashed or was stopped
    alone)."""
    global _when_ray_is_lost
    before, _when_ray_is_lost = _when_ray_is_lost, end
    _ray_lost_seen.clear()
    done = threading.Event()
    if end is not None and threading.current_thread() is threading.main_thread():
        threading.Thread(target=_watch_ray, args=(done,), name="hpsearch-ray-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        _when_ray_is_lost = before


def _watch_ray(done: threading.Event, lost_for: float | None = None) -> None:
    """Every second until ``done``: once the search's Ray has been lost (:func:`_ray_lost`) for ``lost_for``
    seconds (RAY_LOST_SECONDS), send this process a SIGTERM that its handler (:func:`_sigterm_as_ctrl_c`)
    takes for that loss; if the main thread is held in Ray's code (waiting for the GCS), where no handler
    runs, end the search from here once the searcher is not writing to the study. Before, a cluster whose
    GCS alone stopped (killed, crashed, or its processes signalled but not the search's) left the search
    waiting a minute, until Ray's own code ended it (exit 1, "Failed to connect to GCS within 60 seconds")
    with no summary and no command to continue it."""
    from hpsearch.searcher import study_writes_done

    lost_for = RAY_LOST_SECONDS if lost_for is None else lost_for
    since = None
    while not done.wait(1.0):
        if not _ray_lost(wait=0.0):
            since = None
            continue
        since = time.monotonic() if since is None else since
        if time.monotonic() - since < lost_for:
            continue
        end = _when_ray_is_lost
        if end is None or done.is_set():
            return
        _ray_lost_seen.set()
        os.kill(os.getpid(), signal.SIGTERM)
        if not done.wait(5.0) and study_writes_done(timeout=10.0):
            end()  # the main thread did not end the search: it waits in Ray's code, which ends it at 60 s
        return


def _ray_lost(wait: float = 2.0) -> bool:
    """Whether the Ray this search runs on has lost its GCS, or the raylet of a Ray this process
    started, or loses it within ``wait`` seconds.

    A signal sent to every process of a job (a batch scheduler at a time limit, ``pkill -s``)
    reaches them too, and a cluster started in the same job (``ray start --head``). The GCS then
    stops serving at once (a local one's process lingers until the search exits); the raylet exits.
    Ray Tune, asked to stop, would then wait a minute for the GCS and the search would end with Ray's
    "Failed to connect to GCS" and no summary. A Ray version without these internals counts as there.
    """
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        kinds = (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET)
        processes = [info.process for kind in kinds for info in node.all_processes.get(kind, ())]
        host, port = node.gcs_address.rsplit(":", 1)
        addresses = [(host.strip("[]"), int(port))]
        if not processes and node.node_manager_port:
            # A cluster's: the raylet of this machine's node, which the search's driver talks to (`ray stop`
            # ends it before the GCS; its trials' workers then die as if they had failed).
            addresses.append((node.node_ip_address.strip("[]"), int(node.node_manager_port)))
    except Exception:  # noqa: BLE001 - no Ray node in this process, or other internals
        return False
    deadline = time.monotonic() + wait
    while True:
        if any(process.poll() is not None for process in processes):
            return True
        for address in addresses:
            try:
                socket.create_connection(address, timeout=1.0).close()
            except ConnectionRefusedError:
                return True
            except OSError:  # a slow answer is not a stopped GCS
                pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _fail_trials_whose_worker_is_lost() -> None:
    """Make a trial whose worker Ray's memory monitor kills (or Ray loses otherwise) fail alone, as a
    dead actor's trial does.

    Ray Tune's actor manager handles a dead actor (RayActorError) by failing its trial, but the
    OutOfMemoryError that Ray raises for a task killed for memory is "unexpected" to it and ends
    the whole search with a traceback; so are Ray's other system errors for one task (a worker that
    crashed, a node that died, a lost result object). Passed on as an ActorDiedError-like
    RayActorError, the trial is recorded as failed (FAIL in the study) and the search goes on.
    A worker lost because the search's Ray is gone (:func:`_ray_lost`) fails nothing: the search ends
    instead (:func:`_ending_when_ray_is_lost`). Installed once per process; the method is private
    (hpsearch/searcher.py's version check covers Ray's version).
    """
    try:
        from ray.air.execution._internal.actor_manager import RayActorManager
        from ray.exceptions import OutOfMemoryError, RayActorError, RayError, RayTaskError

        original = RayActorManager._actor_task_failed
    except (ImportError, AttributeError):  # another Ray: the search runs, without this protection
        warnings.warn("this Ray version has no RayActorManager._actor_task_failed: a trial killed for memory may "
                      "end the search (pip install -c constraints.txt -e .)", RuntimeWarning, stacklevel=2)
        return
    if getattr(original, "_fails_lost_workers", False):
        return

    def _actor_task_failed(self, tracked_actor_task, exception):
        end = _when_ray_is_lost
        if end is not None and not isinstance(exception, RayTaskError) and _ray_lost(wait=1.0):
            # The search's Ray is gone (a signal to every process of the job reached its raylet first,
            # or a crash): the trial did not fail, it was interrupted with the search, which ends now.
            # Its Optuna trial stays RUNNING, as after a kill, and runs again when the search is continued.
            _end_without_ray(end)
            return
        if isinstance(exception, OutOfMemoryError):
            exception = RayActorError(error_msg=f"the trial's worker was killed for memory: {exception}")
        elif isinstance(exception, RayError) and not isinstance(exception, (RayActorError, RayTaskError)):
            exception = RayActorError(
                error_msg=f"the trial's worker was lost ({type(exception).__name__}): {exception}")
        return original(self, tracked_actor_task, exception)

    _actor_task_failed._fails_lost_workers = True
    RayActorManager._actor_task_failed = _actor_task_failed


def _scheduler(settings: SearchSettings):
    if settings.scheduler == "none":
        return None
    from hpsearch.scheduler import ResumableASHA
    from hpsearch.trainable import SCHEDULER_TIME_KEY

    return ResumableASHA(  # ASHA, whose rungs a resumed search fills from its finished trials
        # The trial's epoch, left out of its last epoch's report (and of a report on which the
        # collapse rule stops it): a stop there would save nothing and lose the final report (outcome,
        # score, checkpoint), whether max_t or a rung falls on the last epoch.
        time_attr=SCHEDULER_TIME_KEY, metric="objective", mode="max", max_t=settings.max_epochs,
        grace_period=min(settings.asha_grace_epochs, settings.max_epochs),
        reduction_factor=settings.asha_reduction_factor,
    )


LOCK_FILE = ".lock"


@contextlib.contextmanager
def _search_lock(folder: Path):
    """Hold an exclusive lock on a search's folder (on its file ``.lock``) while this process runs it.

    A second process on the same search (a ``--resume`` while it still runs, in another terminal or
    a requeued job) is refused: two drivers would each run trials and save Ray's experiment over the
    other's, repeating trials and passing ``--trials``. The kernel releases the lock when the process
    ends, however it ends; the file stays (removing it would let two processes lock two files). A
    file, opened for writing, because NFS locks only such files. Where the file system cannot lock,
    the search runs without and says so.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    try:
        descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        print(f"note: {folder}: cannot create its lock file ({error.strerror or error}); do not run this search "
              "from two processes at once", file=sys.stderr, flush=True)
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchError(f"{folder}: another process is running this search; wait for it to end or stop it "
                              "(Ctrl-C, or kill its PID), then continue it with --resume") from None
        except OSError as error:
            print(f"note: {folder}: this file system cannot lock files ({error.strerror or error}); do not run "
                  "this search from two processes at once", file=sys.stderr, flush=True)
        yield
    finally:
        os.close(descriptor)


def _not_ours_alone(path: Path) -> bool:
    """Whether a file in a search's folder is more than this package's lock or a write cut short."""
    return path.name != LOCK_FILE and not (path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX))


def _saved_state(folder: Path) -> dict | None:
    """Ray Tune's newest saved experiment state in ``folder``, or None when there is none or it is not
    whole (Tune copies it into the folder in the background; a kill meanwhile can cut it short)."""
    states = sorted(folder.glob("experiment_state-*.json"))
    if not states:
        return None
    try:
        state = json.loads(states[-1].read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _saved_state_readable(folder: Path) -> bool:
    """Whether Ray Tune's newest saved experiment state in ``folder`` is there and whole."""
    return _saved_state(folder) is not None


def _trials_run_before(folder: Path) -> set[int]:
    """The Optuna trial numbers a search's folder shows were asked: those of its trial folders
    (``trial-<number>-<id>``) and of the trials in Ray Tune's newest saved experiment state."""
    from hpsearch.results import CONFIG_KEY

    numbers = {int(match.group(1)) for path in folder.glob("trial-*")
               if (match := re.fullmatch(r"trial-(\d+)-\w+", path.name))}
    try:
        for entry in (_saved_state(folder) or {}).get("trial_data", []):
            number = json.loads(entry[0]).get("config", {}).get(CONFIG_KEY)
            if isinstance(number, int):
                numbers.add(number)
    except (ValueError, TypeError, AttributeError, IndexError):
        pass  # a state of another layout: the trial folders still count
    return numbers


def check_journal(folder: Path) -> int:
    """Before a search is continued: its trials are recorded in its journal. One that is missing,
    unreadable, or cut short or replaced (without trials the folder shows were asked) would lose
    them, and Ray Tune, failing to restore its state against it, would wait for good:
    :class:`SearchError` instead. Returns how many of the study's trials are finished."""
    from hpsearch.results import JOURNAL_FILE, STUDY_NAME, drop_unfinished_record, load_study

    journal = folder / JOURNAL_FILE
    asked = _trials_run_before(folder)
    fix = f"put back a whole copy of {JOURNAL_FILE}, or start a new search with another --name"
    if not journal.is_file() or journal.stat().st_size == 0:
        if asked:
            raise SearchError(f"{journal} is missing or empty, but this search has run trials, whose results are "
                              f"recorded there: {fix}")
        return 0  # stopped before its first trial was asked: the search starts its study now
    try:
        dropped = drop_unfinished_record(journal)
        trials = load_study(journal, STUDY_NAME).get_trials(deepcopy=False)
    except Exception as error:  # noqa: BLE001 - whatever Optuna makes of a damaged file
        raise SearchError(f"{journal} cannot be read as this search's study ({type(error).__name__}: {error}): "
                          f"{fix}") from None
    beyond = sorted(number for number in asked if number >= len(trials))
    if beyond:
        listed = ", ".join(f"#{number}" for number in beyond[:5]) + (", ..." if len(beyond) > 5 else "")
        raise SearchError(f"{journal} holds {counted(len(trials), 'trial')}, but this search has "
                          f"also run {listed}: the journal was cut short or replaced; {fix}")
    if dropped:
        print(f"note: {journal} ended in a record cut short ({dropped} bytes, written as the search stopped: a full "
              "disk, or a kill), which Optuna never reads; it is removed", file=sys.stderr, flush=True)
    return sum(trial.state.is_finished() for trial in trials)


def run_search(
    settings: SearchSettings,
    *,
    resume: bool = False,
    address: str | None = None,
    verbose: bool = False,
    stream: TextIO | None = None,
    data=None,
) -> SearchResult:
    """Run (or continue) the search described by ``settings``; see the module docstring.

    ``settings.name`` empty means a new folder ``<method>-<time>``. ``data`` (a PreparedData) skips
    the data preparation (tests). Ray is started locally unless it is running already or
    ``address`` names a cluster; a Ray started here is shut down at the end. One process at a time
    runs a search (:func:`_search_lock`).
    """
    with contextlib.ExitStack() as held:
        # SIGTERM stops as Ctrl-C from the start: while the data are prepared (a mel cache built from a real
        # dataset can take hours), the build then keeps the tracks it finished since its last commit.
        previous_sigterm = _sigterm_as_ctrl_c()
        if previous_sigterm is not None:
            held.callback(signal.signal, signal.SIGTERM, previous_sigterm)
        return _run_search(settings, held, resume=resume, address=address, verbose=verbose, stream=stream, data=data)


def _run_search(settings: SearchSettings, held: contextlib.ExitStack, *, resume: bool, address: str | None,
                verbose: bool, stream: TextIO | None, data) -> SearchResult:
    from ray import tune

    from hpsearch.progress import (
        ProgressPrinter, ResultsWriter, drop_stale_staging, results_written_by, room_watched_by,
    )
    from hpsearch.results import JOURNAL_FILE, STUDY_NAME, finished_records, load_study
    from hpsearch.room import room_problem
    from hpsearch.searcher import journal_of_this_search
    from hpsearch.trainable import run_trial
    from musicssl.data.index import GENERATED_CORPUS_KEY
    from musicssl.models import checkpoint_bytes

    stream = stream or sys.stdout
    started = time.perf_counter()
    check_method(settings.method)
    if address:
        check_address(address)  # before the data: an unreachable cluster should fail in seconds
    check_storage(settings)  # before the data too: a folder that cannot be written fails at once
    reserved = not settings.name
    if reserved:
        settings = dataclasses.replace(settings, name=default_name(settings.method, settings.storage_dir))
    folder = _experiment_folder(settings)
    journal = folder / JOURNAL_FILE
    try:
        existing = locked = (folder / SEARCH_FILE).is_file()
        if locked:  # first: a search that is running says so, whatever else is asked of it
            held.enter_context(_search_lock(folder))
            from hpsearch.results import drop_stale_journal_lock

            drop_stale_journal_lock(journal)  # left by a driver killed as it wrote
        if existing and not resume:
            raise SearchError(f"{folder} already holds a search; continue it with --resume, or pick another --name")
        if not existing and folder.exists() and not reserved and (
            not folder.is_dir() or any(_not_ours_alone(path) for path in folder.iterdir())
        ):
            raise SearchError(f"{folder} exists and is not a search (no {SEARCH_FILE}); a new search never writes "
                              "into another folder: pick another --name or --storage-dir")
        if resume and not existing:
            raise SearchError(f"{folder}: no search to resume here (no {SEARCH_FILE}); start one without --resume")
        if existing:
            # The search's time counts its earlier runs too (as of their last write).
            started -= _seconds_so_far(folder)
            finished = check_journal(folder)
            # Nothing to run: no Ray, no data, the stored summary (unless it lacks the untrained reference,
            # which a stop while it was measured leaves out: this run measures it).
            # (A rankme search's reference is measured from 2026-12-05 on, as is the record of its tracks: one
            # finished before has neither, and is not made to need its data and Ray again for it.)
            if finished >= settings.trials and not ((settings.objective.startswith("probe_")
                                                     or settings.tracks is not None) and _untrained_missing(folder)):
                every = "its 1 trial is" if settings.trials == 1 else f"all {settings.trials} trials are"
                print(f"{settings.name}: {every} finished; nothing to run", file=stream,
                      flush=True)
                frame, summary = _summarize(settings, folder, journal, started)
                for line in _end_lines(settings, folder, summary, address):
                    print(line, file=stream, flush=True)
                return SearchResult(folder=folder, settings=settings, trials=frame, summary=summary, interrupted=False)
        if address is None:
            check_local_gpus(settings)
            note = probe_memory_note(settings)
            if note:
                print(f"note: {note}", file=sys.stderr, flush=True)
        max_batch_size, sampled = check_space(settings)
        if address is None:
            _settle_temporary_folders()
        floors = check_room(settings, folder, finished if existing else 0, checkpoint_bytes(settings.preset),
                            resume=existing, local=address is None)
        if data is None:
            data = prepare_search_data(settings, verbose=True, max_batch_size=max_batch_size if sampled else None)
        if not existing:  # recorded when the search starts: a resume continues on that corpus
            settings = dataclasses.replace(settings, corpus=data.index.extra.get(GENERATED_CORPUS_KEY))
        if settings.tracks is None:  # and on those tracks (a search from before the record: from now on)
            settings = dataclasses.replace(settings, tracks=tracks_record(data))
        # Ray before the folder: a cluster that cannot be joined leaves nothing behind.
        _ray_environment(local=address is None, verbose=verbose)
        started_ray = _init_ray(settings, address, verbose, reserved=folder if reserved else None)
    except BaseException:
        if reserved:
            with contextlib.suppress(OSError):
                folder.rmdir()  # the empty folder default_name reserved (a new search locks it later)
        raise

    def finish_without_ray(cause: str) -> None:
        # The search's Ray is gone (a signal to every process of the job, a cluster started in the job
        # included, or a crash): Ray Tune can neither stop the trials nor save through Ray. The summary
        # comes from the study, as after the trials; the experiment is left as a kill leaves it, which a
        # resume continues. os._exit: on a normal exit Ray's own shutdown would wait a minute for its GCS.
        # Once: the main thread and _watch_ray's can both come here; the second waits for the first's exit.
        if not _FINISHING.acquire(blocking=False):
            threading.Event().wait()
        def say(text: str, to: TextIO = stream) -> None:
            # The output may be gone (`| tee log`, whose tee the same signal stopped) or in the middle of
            # a write this handler interrupted: the files come first, and saying so must not fail.
            try:
                print(text, file=to, flush=True)
            except Exception:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    os.write(to.fileno(), (text + "\n").encode())

        try:
            summary = None
            if journal.is_file() and journal.stat().st_size > 0:
                _, summary = _summarize(settings, folder, journal, started)
            say(f"stopping: {cause}; the trials that were running stopped with it and run again when the search "
                "is continued")
            if summary is not None:
                for line in _end_lines(settings, folder, summary, address):
                    say(line)
            else:
                say("stopped before the first trial began")
                if (folder / SEARCH_FILE).is_file():
                    say(_continue_line(settings, address))
        except BaseException as error:  # noqa: BLE001 - exit all the same, never wait for Ray
            say(f"{PROG}: error: the summary could not be written: {error!r}; {_continue_command(settings, address)} "
                "continues the search", to=sys.stderr)
        finally:
            os._exit(130)

    if started_ray:  # else Ray ran in this process before the search: not the search's to end
        held.enter_context(_ending_when_ray_is_lost(functools.partial(
            finish_without_ray,
            "this search's Ray stopped (its raylet or GCS is gone: a signal to every process of the job, or a crash)")))
    previous_sigterm = _sigterm_as_ctrl_c(functools.partial(
        finish_without_ray, "the signal stopped this search's Ray as well (it was sent to every process of the job)")
        if started_ray else None)
    previous_sigint = signal.getsignal(signal.SIGINT)
    _leave_the_resume_hint_to_the_summary(verbose)
    told = False  # the line that says how to continue the search is printed
    stopped_for: list[tuple[str, str] | None] = [None]  # why the room watch stopped the run, if it did, and advice
    failure: Exception | None = None  # an error ending the search
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not locked:
                held.enter_context(_search_lock(folder))
                if (folder / SEARCH_FILE).is_file():  # another process started a search of this name meanwhile
                    raise SearchError(f"{folder} already holds a search, started while this one prepared; continue "
                                      "it with --resume, or pick another --name")
            settings.save(folder)
            _fail_trials_whose_worker_is_lost()
            if address:
                warn_cluster_too_small(settings)
            study_exists = journal.is_file() and journal.stat().st_size > 0
            finished = finished_records(load_study(journal, STUDY_NAME)) if study_exists else {}
            trainable = tune.with_resources(
                tune.with_parameters(run_trial, data=data, finished=finished,
                                     settings=_trial_settings(settings, own_ray=started_ray and not address)),
                {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
            )
            # Ray restores an experiment from its saved state; a search stopped before Ray first saved it
            # (tuner.pkl is written before) has none, and Tuner.restore would then run one trial and end
            # (or fail, on a state cut short). It continues as a new Tune run on the same study, which
            # knows the finished trials.
            if resume and tune.Tuner.can_restore(str(folder)) and _saved_state_readable(folder):
                print(f"resuming {folder}", file=stream, flush=True)
                drop_stale_staging(folder)  # a run on this cluster before would copy its files over newer ones
                tuner = tune.Tuner.restore(
                    str(folder), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
                )
            else:
                searcher = make_searcher(settings, journal, study_exists)
                progress = ProgressPrinter(
                    settings.trials, settings.objective, settings.max_epochs, str(journal), STUDY_NAME, stream=stream
                )
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        search_alg=searcher,
                        scheduler=_scheduler(settings),
                        num_samples=settings.trials,
                        max_concurrent_trials=settings.concurrency,
                        reuse_actors=settings.reuse_actors,
                        trial_dirname_creator=trial_folder_name,
                    ),
                    run_config=tune.RunConfig(
                        name=settings.name,
                        storage_path=str(folder.parent),
                        verbose=0,
                        callbacks=[ResultsWriter(), progress],  # files first, then the line
                        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                    ),
                )
                _print_start(settings, folder, stream)
            with _search_restored_as_now_asked(settings.concurrency, folder), journal_of_this_search(journal), \
                    results_written_by(lambda: _summarize(settings, folder, journal, started), replayed=finished), \
                    room_watched_by(lambda: room_problem(floors, folder),
                                    lambda why, advice: stopped_for.__setitem__(0, (why, advice))):
                tuner.fit()
            # Before Ray is shut down: ray.shutdown() sets SIGTERM's action back to the default, and a
            # SIGTERM then would end the search before anything is written.
            frame, summary = _summarize(settings, folder, journal, started)
        except KeyboardInterrupt:
            # A stop that Ray Tune did not take (before it ran, or a second Ctrl-C): the search saved its
            # settings, so it is continued as after any other stop.
            if (folder / SEARCH_FILE).is_file():
                print(_continue_line(settings, address), file=stream, flush=True)
                told = True
            raise
        except Exception as error:
            failure = (_disk_full_error(error, folder, settings, address)
                       or _not_writable_error(error, settings, address) or error)
            if failure is not error:
                raise failure from error
            raise
        finally:
            if started_ray:
                import ray

                try:
                    ray.shutdown()
                except KeyboardInterrupt:  # a (second) Ctrl-C while Ray shuts down: stop, and say how to continue
                    if failure is not None:
                        raise failure from None  # the error that was ending the search says more than the Ctrl-C
                    if not told and (folder / SEARCH_FILE).is_file():
                        print(_continue_line(settings, address), file=stream, flush=True)
                    raise
            # What follows stops as Ctrl-C too. Ray Tune leaves its SIGINT handler after a run that was
            # not interrupted (it would swallow the first Ctrl-C), and ray.shutdown() sets SIGTERM's
            # action back to the default in the kernel (Python's record still shows the handler).
            if previous_sigterm is not None:  # None: off the main thread, where no handler can be set
                if previous_sigint is not None:
                    signal.signal(signal.SIGINT, previous_sigint)
                _sigterm_as_ctrl_c()

        # The untrained backbone's reference (~20 s on the corpus, up to a minute beside other work): a stop here
        # (Ctrl-C, SIGTERM) leaves out the reference, not the summary. A search stopped before its last trial
        # (Ctrl-C, SIGTERM, the room watch) leaves it to the run that finishes it: a stop is to end it now.
        try:
            if summary.trials_finished >= settings.trials:
                summary.untrained_value, summary.untrained_value_initial_bn = untrained_probe(settings, data)
        except KeyboardInterrupt:
            print("interrupted: the untrained backbone's reference score "
                  + ("was not measured again; the summary keeps the one measured before"
                     if summary.untrained_value is not None else "is left out of the summary"),
                  file=stream, flush=True)
        except Exception as error:  # a reference only: the search's results are written, and the summary follows
            print(f"warning: the untrained backbone's reference score could not be measured "
                  f"({type(error).__name__}: {error}); "
                  + ("the summary keeps the one measured before" if summary.untrained_value is not None
                     else "it is left out of the summary"), file=stream, flush=True)
        summary.seconds = time.perf_counter() - started
        try:
            _write_summary(folder, summary)
        except OSError as error:  # the disk filled after the trials: a resume writes the summary
            failure = _disk_full_error(error, folder, settings, address) or _not_writable_error(error, settings,
                                                                                               address)
            if failure is None:
                raise
            raise failure from error
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    for line in _end_lines(settings, folder, summary, address):
        print(line, file=stream, flush=True)
    interrupted = summary.trials_finished < settings.trials
    return SearchResult(folder=folder, settings=settings, trials=frame, summary=summary, interrupted=interrupted,
                        **({"stopped_for": stopped_for[0][0], "stopped_advice": stopped_for[0][1]}
                           if interrupted and stopped_for[0] else {}))


def _stored_summary(folder: Path) -> dict[str, Any]:
    """The search's ``summary.json`` as its last write left it (empty when there is none, or it is unreadable)."""
    from hpsearch.results import SUMMARY_FILE

    try:
        stored = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _number(value: Any) -> float | None:
    """A stored number as a float (None for anything else, booleans included)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _seconds_so_far(folder: Path) -> float:
    """The time earlier runs of a search spent (its ``summary.json``, written after each finished trial)."""
    seconds = _number(_stored_summary(folder).get("seconds"))
    return seconds if seconds is not None and math.isfinite(seconds) and seconds > 0 else 0.0


def _untrained_missing(folder: Path) -> bool:
    """Whether the search's ``summary.json`` lacks the untrained backbone's reference score."""
    value = _number(_stored_summary(folder).get("untrained_value"))
    return value is None or not math.isfinite(value)


def _summarize(settings: SearchSettings, folder: Path, journal: Path, started: float):
    """Write ``trials.csv``, the best backbone and ``summary.json`` from the study's journal (Ray is not
    needed); returns the trials (as in ``trials.csv``) and the summary."""
    from hpsearch.results import (
        STUDY_NAME, export_best_checkpoint, load_study, summarize, write_trials_csv,
    )

    study = load_study(journal, STUDY_NAME)
    frame = write_trials_csv(study, folder)
    summary = summarize(frame, settings.method, settings.objective, settings.trials, settings.max_epochs)
    summary.seconds = time.perf_counter() - started
    summary.data = settings.data
    if summary.best_trial is not None:  # which of its parameters the sampler drew (the others: derived or fixed)
        summary.best_sampled = sorted(study.trials[summary.best_trial].params)
    # The untrained backbone's scores, measured at the end of an earlier run of this search (same
    # settings, same seed): kept until they are measured again.
    before = _stored_summary(folder)
    for key in ("untrained_value", "untrained_value_initial_bn"):
        if (value := _number(before.get(key))) is not None:
            setattr(summary, key, value)
    if summary.best_trial is not None:
        target = export_best_checkpoint(folder, summary.best_trial)
        summary.best_backbone = str(target) if target else None
    _write_summary(folder, summary)
    return frame, summary


def _write_summary(folder: Path, summary) -> None:
    from hpsearch.results import SUMMARY_FILE

    write_whole(folder / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2, default=str) + "\n")


def _continue_command(settings: SearchSettings, address: str | None = None) -> str:
    """The command that continues the search, on the cluster it ran on (``--address`` is not stored
    with the search: without it, the search would continue on a Ray of its own)."""
    on_cluster = f" {flag_text('--address', address)}" if address else ""
    return (f"{PROG} {settings.method} {flag_text('--name', settings.name)} "
            f"{flag_text('--storage-dir', str(settings.storage_dir))} --resume{on_cluster}")


def _continue_line(settings: SearchSettings, address: str | None = None) -> str:
    return f"interrupted: continue with {_continue_command(settings, address)}"


def _end_lines(settings: SearchSettings, folder: Path, summary, address: str | None = None) -> list[str]:
    """The summary, the folder and, for a search that is not finished, the command that continues it."""
    from hpsearch.results import format_summary

    lines = [format_summary(summary), f"results: {folder}"]
    if summary.trials_finished < settings.trials:
        lines.append(_continue_line(settings, address))
    return lines


def untrained_probe(settings: SearchSettings, data) -> tuple[float, float]:
    """The objective of a freshly initialised backbone (seeded like the trials): the score a trial must
    beat for its training to have helped at all. A probe objective is scored as the trials are; ``rankme``
    is the embedding's effective rank on the trials' probe segments (the collapse metrics' set: fixed
    segments of the valid tracks, of the training tracks where fewer than 2 are valid), as a trial's last
    epoch measures it.

    Returns ``(calibrated, initial)``. ``calibrated`` is the bar: the backbone's BatchNorm running
    statistics measured on the training tracks' probe segments (weights untouched), as every trained
    backbone carries statistics of real data. ``initial`` keeps the initial statistics (mean 0,
    variance 1), with which BatchNorm does not normalise in eval mode: a different network, often
    scoring higher on the corpus (README, "Evaluating embeddings the way the study did").
    """
    import torch

    from musicssl.embeddings import calibrate_batchnorm_on_tracks
    from musicssl.models import Backbone
    from musicssl.train import probe_score

    with torch.random.fork_rng(devices=[]):  # the CPU generator only: no CUDA context on every GPU
        torch.manual_seed(settings.seed)
        backbone = Backbone(preset=settings.preset)
    per_track = settings.probe_segments_per_track
    if settings.objective == "rankme":
        from musicssl.collapse import effective_rank
        from musicssl.data.views import fixed_segments
        from musicssl.train import COLLAPSE_CHUNK, collapse_probe_tracks

        probe_mels = fixed_segments(data.cache, collapse_probe_tracks(data), settings.probe_segments,
                                    seed=settings.seed)

        def score(network) -> float:
            network.eval()
            with torch.no_grad():
                embedding = torch.cat([network(chunk) for chunk in probe_mels.split(COLLAPSE_CHUNK)])
            return float(effective_rank(embedding.float(), eps=1e-7))
    else:
        def score(network) -> float:
            return float(probe_score(network, data, per_track, settings.seed)[settings.objective])
    initial = score(backbone)
    # Read a batch at a time (the same statistics as on all the segments at once, without holding them all).
    calibrate_batchnorm_on_tracks(backbone, data.cache, data.track_ids("train"), per_track, settings.batch_size)
    return score(backbone), initial


def _print_start(settings: SearchSettings, folder: Path, stream: TextIO) -> None:
    from musicssl.pretext.registry import get_method

    # The types its trials can show: a method without prototypes never shows cluster or partial collapse.
    stop_on = [kind for kind in settings.stop_on
               if kind not in PROTOTYPE_COLLAPSE or get_method(settings.method).assigns_prototypes]
    stopping = (f"collapse stop ({', '.join(stop_on) or 'diverged only'}) after {settings.patience_epochs} collapsed "
                f"epoch(s) past a grace of {settings.grace_epochs}" if settings.collapse_stop else "no collapse stop")
    print(
        f"searching {settings.method}: {counted(settings.trials, 'trial')}, {settings.concurrency} at a time "
        f"({settings.cpus_per_trial:g} CPU{', %g GPU' % settings.gpus_per_trial if settings.gpus_per_trial else ''} each), "
        f"up to {counted(settings.max_epochs, 'epoch')} x {counted(settings.steps_per_epoch, 'step')}, objective "
        f"{settings.objective}, sampler {settings.sampler}, scheduler {settings.scheduler}, {stopping}\n"
        f"folder: {folder}",
        file=stream, flush=True,
    )
    if settings.collapse_stop and settings.grace_epochs + settings.patience_epochs > settings.max_epochs:
        print(f"note: a grace of {settings.grace_epochs} and a patience of {settings.patience_epochs} epochs exceed the "
              f"trials' {counted(settings.max_epochs, 'epoch')}: collapse never stops a trial (only a divergence does)",
              file=stream, flush=True)
    if settings.scheduler == "asha" and settings.asha_grace_epochs >= settings.max_epochs:
        # ASHA's first rung would be the last epoch, on which no trial is stopped (see _scheduler).
        print(f"note: ASHA's grace of {settings.asha_grace_epochs} epochs reaches the trials' last epoch "
              f"({settings.max_epochs}): ASHA never stops a trial; use --max-epochs {settings.asha_grace_epochs + 1} "
              "or more, or --scheduler none", file=stream, flush=True)


def make_searcher(settings: SearchSettings, journal: Path, study_exists: bool):
    """The search's :class:`hpsearch.searcher.CollapseAwareOptunaSearch`, its study in ``journal`` (for a new
    Tune run; a restored one unpickles its own)."""
    from hpsearch.results import STUDY_NAME, journal_storage
    from hpsearch.searcher import CollapseAwareOptunaSearch
    from study_spaces import get_space

    return CollapseAwareOptunaSearch(
        get_space(settings.method).space,
        metric="objective",
        mode="max",
        study_name=STUDY_NAME,
        storage=journal_storage(journal),
        seed=settings.seed,
        sampler_kind=settings.sampler,
        # Points are enqueued once, into a new study; a resumed study already holds them.
        points_to_evaluate=None if study_exists else (list(settings.points_to_evaluate) or None),
        max_trials=settings.trials,
    )


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    defaults = SearchSettings(method="vicreg")
    parser = ArgumentParser(
        prog=PROG,
        description=(
            "Search a pretext method's hyperparameters with Ray Tune and Optuna (TPE by default), stopping collapsed "
            "trials early. Results go to STORAGE_DIR/NAME: Ray's trial folders, optuna.journal "
            "(optuna-dashboard reads it), trials.csv, best_backbone.pt + best_config.json, summary.json (these four "
            "rewritten after each finished trial)."
        ),
    )
    # Flags default to None so that a resume can tell a flag given on the command line (which must
    # agree with the stored search) from a default; the documented defaults are SearchSettings'.
    add = parser.add_argument
    from study_spaces import available_spaces

    add("method", help="pretext method, one with a study_spaces/<method>.py space: " + ", ".join(available_spaces()))
    add("--trials", type=int, help=f"number of trials in total, counting those of a resumed run (default {defaults.trials})")
    add("--name", help="experiment folder name under --storage-dir (default: <method>-<YYYYmmdd-HHMMSS>, "
        "never an existing one); an existing NAME is resumed")
    add("--storage-dir", help=f"where experiment folders go (default {defaults.storage_dir})")
    add("--resume", action="store_true", help="continue an interrupted search: --name, or the latest search "
        "of METHOD named by default (METHOD-<time>) in --storage-dir; its stored settings are used (the resource "
        "flags may change; --no-reuse-actors must agree)")
    add("--objective", choices=OBJECTIVES, help=f"what to maximise: probe_map / probe_auc (linear probe on the "
        f"valid split after the last epoch; needs tags) or rankme (final effective rank of the embedding, "
        f"label-free) (default {defaults.objective})")
    add("--scheduler", choices=SCHEDULERS, help=f"early stopping on the objective besides collapse stopping: "
        f"asha, or none (default {defaults.scheduler}); with asha a probe objective is measured every epoch")
    add("--max-epochs", type=int, help=f"epochs per trial (default {defaults.max_epochs})")
    add("--steps-per-epoch", type=int, help=f"optimiser steps per epoch (default {defaults.steps_per_epoch})")
    add("--batch-size", type=int, help=f"batch size, unless the space samples it (default {defaults.batch_size})")
    add("--probe-segments", type=int, help=f"validation segments the collapse metrics are computed on "
        f"(default {defaults.probe_segments})")
    add("--probe-segments-per-track", type=int, help=f"segments per track in the final linear probe "
        f"(default {defaults.probe_segments_per_track})")
    add("--data", help="'corpus' (the embedded corpus, built if missing), mtat, jamendo-*, msd (with --root), a tracks.csv or a "
        f"folder of audio with a tags file (default {defaults.data})")
    add("--root", help="a named dataset's folder (mtat, jamendo-*; msd: the split folder; corpus: where it is or "
        "is built); may change on --resume")
    add("--audio-dir", help="the audio folder of mtat, jamendo-* or msd when it is not under --root (msd: "
        "required); may change on --resume")
    add("--preset", help=f"backbone preset: cpu or paper (default {defaults.preset})")
    add("--seed", type=int, help=f"seed of the sampler and of every trial's training (default {defaults.seed})")
    add("--sampler", choices=SAMPLERS, help="how Optuna draws each trial's settings: tpe (learns from the finished "
        "trials; with collapse stopping, also to leave regions that collapse) or random (each trial drawn on its "
        "own: an unbiased sample of the space for the sensitivity report, and the same settings, trial for trial, "
        "in two uninterrupted searches with the same seed, e.g. with and without --no-collapse-stop) "
        f"(default {defaults.sampler})")
    add("--concurrency", type=int, help=f"trials running at once (default {defaults.concurrency})")
    add("--cpus-per-trial", type=float, help=f"CPUs per trial; torch uses as many threads (the whole part, at least 1) "
        f"(default {defaults.cpus_per_trial:g})")
    add("--gpus-per-trial", type=float, help=f"GPUs per trial (fractions share a GPU) (default {defaults.gpus_per_trial:g})")
    add("--address", help="run on an existing Ray cluster: 'auto' (the one this machine belongs to) or HOST:PORT "
        "(default: a local Ray for this search)")
    add("--no-collapse-stop", dest="collapse_stop", action="store_false", default=None,
        help="do not stop collapsed trials (the rule still records when it would have stopped them)")
    add("--grace-epochs", type=int, help=f"epochs whose collapse verdict is not acted on: a fresh backbone can "
        f"read 'complete' at the start (default {defaults.grace_epochs}; at the default schedule many clustering "
        "trials read 'complete' for their first two epochs, then recover: in a 64-trial clustering search, replayed, "
        "0 stops 16 trials that score like the rest)")
    add("--patience-epochs", type=int, help=f"consecutive collapsed epochs, after the grace period, that stop a "
        f"trial (default {defaults.patience_epochs}; 1 stops 20 of those 64 clustering trials, most at epoch 2, "
        "ranked 6th to last: benchmarks/README.md)")
    add("--stop-on", type=_collapse_types, help="collapse types that stop a trial, comma-separated, from "
        f"{', '.join(COLLAPSE_TYPES)} (default {','.join(defaults.stop_on)}; 'dimensional' and 'partial' (few "
        "prototypes used) are always recorded, but they flagged some of the best trials: in the default VICReg "
        "search and in 36-epoch clustering trials, see benchmarks/README.md); 'cluster' and 'partial' judge prototypes, "
        "which only clustering has; a diverged trial always stops")
    add("--threshold", action="append", default=[], metavar="NAME=VALUE",
        help="override a collapse threshold (musicssl.collapse.CollapseThresholds), e.g. "
        "dimensional_max_rank_fraction=0.05; repeatable")
    add("--no-reuse-actors", dest="reuse_actors", action="store_false", default=None,
        help="start a fresh Ray actor per trial (slower; reuse is the default)")
    add("--verbose", action="store_true",
        help="show Ray's logs, the trials' output, and the traceback of each failed trial (without it, only the first)")
    return parser


# Flags that may differ on a resume: where and how the search runs, not what it is. Given on a
# resume, the resources and the concurrency replace the stored ones (e.g. a search continued on a cluster);
# actor reuse is restored with Ray's experiment state, so --no-reuse-actors must agree.
_RUNTIME_FLAGS = {"name", "storage_dir", "concurrency", "cpus_per_trial", "gpus_per_trial", "root", "audio_dir"}
# Boolean settings whose flag turns them off.
_OFF_FLAGS = {"collapse_stop": "--no-collapse-stop", "reuse_actors": "--no-reuse-actors"}


def _value_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _flag_text(key: str, value: Any) -> str:
    """How the command line spells setting ``key`` set to ``value``."""
    if key in _OFF_FLAGS:
        return _OFF_FLAGS[key]
    if key == "thresholds":
        return " ".join(f"--threshold {part}" for part in threshold_parts(value)) or "no --threshold"
    return f"--{key.replace('_', '-')} {_value_text(value)}"


def threshold_parts(thresholds: dict[str, Any]) -> list[str]:
    """``NAME=VALUE`` for each threshold, as --threshold takes them."""
    return [f"{name}={number:g}" if isinstance(number, float) else f"{name}={number}"
            for name, number in thresholds.items()]


def _stored_text(key: str, value: Any) -> str:
    """How a conflict message shows the stored value of setting ``key``."""
    if key == "thresholds":
        return ", ".join(threshold_parts(value)) or "none"
    return ("on" if value else "off") if key in _OFF_FLAGS else _value_text(value)


def _collapse_types(text: str) -> list[str]:
    """``--stop-on``'s comma-separated list (checked by SearchSettings)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def threshold_values(pairs: Sequence[str]) -> dict[str, Any]:
    """``--threshold NAME=VALUE`` pairs as a dict (names are checked against CollapseThresholds later);
    SettingsError names a malformed pair."""
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise SettingsError(f"--threshold takes NAME=VALUE, got {pair!r}")
        name, text = name.strip(), text.strip()
        if not name:
            raise SettingsError(f"--threshold takes NAME=VALUE, got {pair!r}: no NAME")
        if name in values:  # given twice: the last would have been kept without a word
            raise SettingsError(f"--threshold {name} is given twice; give it once")
        if name == "check_projection":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SettingsError(f"--threshold {pair}: check_projection takes true or false")
            values[name] = text.lower() in ("true", "1", "yes")
            continue
        try:
            values[name] = float(text)
        except ValueError:
            raise SettingsError(f"--threshold {pair}: {text!r} is not a number (e.g. {name}=0.05)") from None
    return values


def _data_location(value: str, names_dataset: bool = True) -> str:
    """``--data``/``--root``/``--audio-dir`` as stored: a path absolute and normalised (so that the search
    resumes from any folder, and ``dir/`` is ``dir``), a dataset name as it is where it ``names_dataset``
    (``--data``; a ``--root mtat`` is the folder ``mtat``, whatever its name)."""
    from musicssl.data.loaders import dataset_name

    if (names_dataset and dataset_name(value) is not None) or not value.strip():  # an empty one is refused
        return value
    return os.path.normpath(Path(value).expanduser().absolute())


def _comparable(key: str, value: Any) -> Any:
    """A setting as a resume compares it with the stored one: a dataset in one spelling
    (``Jamendo-Top50-Split0`` is ``jamendo-top50``; a path as an absolute one), the collapse types to stop
    on as a set."""
    if key == "data":
        from musicssl.data.loaders import canonical_dataset_spec

        return canonical_dataset_spec(_data_location(value))
    if key == "stop_on":
        return frozenset(value)
    return value


def _with_data_found(stored: SearchSettings, given: str | None, search: str) -> SearchSettings:
    """``stored`` with its data path made absolute. Searches started before 2026-12-03 stored a relative
    ``--data`` as given, relative to the folder they were started from: a ``--data`` path that ends with it
    says where it is now; without one, it is looked for from here, and an error says what to give."""
    from musicssl.data.loaders import dataset_name

    if dataset_name(stored.data) is not None or Path(stored.data).expanduser().is_absolute():
        return stored
    relative = os.path.normpath(stored.data)
    # What a full path to that data ends with: the stored path without its leading ".." (../other/data).
    parts = Path(relative).parts
    while parts and parts[0] == "..":
        parts = parts[1:]
    tail = os.path.join(*parts) if parts else ""
    if given is not None:
        if tail and given.endswith(os.sep + tail):
            return dataclasses.replace(stored, data=given)
        raise SearchError(
            f"{search} was started with --data {stored.data}, a path relative to the folder it was started from, "
            f"and --data {given} is not that path; give the full path of that data (it ends with {tail or relative}), "
            "or continue it from that folder without --data"
        )
    if not Path(relative).exists():
        raise SearchError(
            f"{search} was started with --data {stored.data}, a path relative to the folder it was started from, "
            f"and there is no {relative} here; continue it from that folder, or give --data with the full path "
            "of that data"
        )
    return dataclasses.replace(stored, data=_data_location(relative))


def settings_from_args(args: argparse.Namespace) -> tuple[SearchSettings, bool]:
    """The search's settings and whether it resumes one (stored settings win; a flag given
    explicitly must agree with them)."""
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(SearchSettings)
        if field.name not in ("method", "thresholds", "points_to_evaluate") and getattr(args, field.name, None) is not None
    }
    if args.threshold:
        given["thresholds"] = threshold_values(args.threshold)
    for key in ("data", "root", "audio_dir"):
        if key in given:
            given[key] = _data_location(given[key], names_dataset=key == "data")
    # An empty one (an unset shell variable) would be the current folder, or a local search for --address.
    for flag, value, instead in (("--storage-dir", args.storage_dir, "runs"),
                                 ("--address", args.address, "a search on this machine")):
        if value is not None and not value.strip():
            raise SettingsError(f"{flag} is empty; give a value, or leave {flag} out for {instead}")
    storage_dir = given.get("storage_dir", "runs")
    name = given.get("name")
    if name is not None and name_problem(name):
        raise SettingsError(name_problem(name))
    resume = bool(args.resume)
    if resume and not name:
        name = latest_search(args.method, storage_dir)
        if name is None:
            raise SearchError(f"--resume: no search of {args.method} named by default ({args.method}-<time>) in "
                              f"{storage_dir}; give a search's --name, or start one without --resume")
    if name and (Path(storage_dir).expanduser() / name / SEARCH_FILE).is_file():
        stored = SearchSettings.load(Path(storage_dir).expanduser() / name, root=given.get("root"))
        if stored.method != args.method:
            raise SearchError(f"{storage_dir}/{name} is a search of {stored.method}, not {args.method}")
        stored = _with_data_found(stored, given.get("data"), f"{storage_dir}/{name}")
        conflicts = [
            f"{_flag_text(key, value)} (stored: {_stored_text(key, getattr(stored, key))})"
            for key, value in given.items()
            if key not in _RUNTIME_FLAGS and _comparable(key, value) != _comparable(key, getattr(stored, key))
        ]
        if conflicts:
            raise SearchError(
                f"{storage_dir}/{name} was started with other settings: {', '.join(conflicts)}; "
                "drop those flags to continue it, or start a new search with another --name"
            )
        runtime = {key: value for key, value in given.items() if key in _RUNTIME_FLAGS}
        return dataclasses.replace(stored, **{**runtime, "name": name, "storage_dir": storage_dir}), True
    if resume:
        raise SearchError(f"--resume: no search named {name!r} in {storage_dir}")
    settings = SearchSettings(method=args.method, **{**given, "name": name or ""})
    if "stop_on" in given:
        _check_stop_on(settings)
    return settings, False


# The collapse types only a method with prototypes (its collapse outputs hold assignments) can show.
PROTOTYPE_COLLAPSE = ("cluster", "partial")


def _check_stop_on(settings: SearchSettings) -> None:
    """A ``--stop-on`` given for a method without prototypes: SettingsError where none of its types can
    ever stop a trial (a search that would stop nothing while the user believes it guarded), a note where
    some cannot."""
    from musicssl.pretext.registry import get_method

    if get_method(settings.method).assigns_prototypes:
        return
    never = [kind for kind in settings.stop_on if kind in PROTOTYPE_COLLAPSE]
    if not never:
        return
    can = [kind for kind in settings.stop_on if kind not in PROTOTYPE_COLLAPSE]
    reason = (f"{settings.method} has no prototypes, so its trials never show {' or '.join(repr(k) for k in never)} "
              "collapse (only clustering's do)")
    if not can and settings.collapse_stop:
        raise SettingsError(f"--stop-on {','.join(settings.stop_on)}: {reason}, and no collapsed trial would ever be "
                            "stopped (a diverged one still is); give complete or dimensional, or --no-collapse-stop to "
                            "stop none")
    would = "" if settings.collapse_stop else " would"
    print(f"note: --stop-on {','.join(settings.stop_on)}: {reason}; its trials{would} stop on "
          f"{','.join(can) if can else 'no collapse'}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    import optuna

    parser = build_parser()
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    try:  # Ray Tune loads here (seconds): a Ctrl-C meanwhile is one line, as one while the command loads
        from hpsearch.progress import closed_output_stops_the_search
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    with closed_output_stops_the_search():
        return _search(args)


def _search(args: argparse.Namespace) -> int:
    from hpsearch.progress import OUTPUT_CLOSED

    try:
        check_method(args.method)
        settings, resume = settings_from_args(args)
        result = run_search(settings, resume=resume, address=args.address, verbose=args.verbose)
    except (SearchError, SettingsError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if result.stopped_for:
        closed = result.stopped_for == OUTPUT_CLOSED  # no error of the search's: as a command ended by SIGPIPE
        print(f"{PROG}: {'' if closed else 'error: '}stopped: {result.stopped_for}; {result.stopped_advice}, and "
              f"continue the search with {_continue_command(result.settings, args.address)}", file=sys.stderr)
        return 128 + 13 if closed else 2
    if result.interrupted:
        return 130
    failed = _every_trial_failed(result)
    if failed:
        print(f"{PROG}: error: {failed}", file=sys.stderr)
        return 1
    return 0


def _every_trial_failed(result: SearchResult) -> str | None:
    """What to say of a search whose every finished trial failed (none complete, collapsed, diverged or
    stopped: the data or the settings are at fault, not the hyperparameters), or None."""
    frame = result.trials
    if frame is None or not len(frame) or "outcome" not in frame:
        return None
    finished = frame[~frame["outcome"].isin(("running", "waiting"))]
    if not len(finished) or (finished["outcome"] != "failed").any():
        return None
    errors = [str(error).strip() for error in (finished["error"] if "error" in finished else []) if isinstance(error, str)]
    first = errors[0].splitlines()[-1] if errors and errors[0] else "no error recorded"
    failed = "the only finished trial failed" if len(finished) == 1 else f"all {len(finished)} finished trials failed"
    return (f"{failed}, the first with: {first}; "
            f"{result.folder / 'trials.csv'}'s error column holds each one's")


def _exit(code: int) -> NoReturn:
    """End the command with ``code``. Once Ray has run in this process, without the interpreter's exit:
    Ray's C++ core can crash in its exit-time destructors (SIGSEGV, exit code -11 after the command's
    last line) when its start was followed closely by its shutdown, as after a SIGTERM while Ray starts
    (5 of 20 runs of that test, before). The search has shut Ray down by then (the Ray it started, or
    its connection to a cluster); the output and the logs are flushed first."""
    if "ray" not in sys.modules:
        sys.exit(code)
    import ray

    with contextlib.suppress(Exception):
        if ray.is_initialized():  # (a search always shuts down the Ray it started or joined)
            ray.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
