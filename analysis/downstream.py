"""The study's downstream protocol on frozen embeddings: probes, bootstrap, limited data, baselines.

    python -m analysis.downstream runs/vicreg-a runs/contrastive-b --dataset corpus
    python -m analysis.downstream runs/search/ --dataset mtat --root ~/data/mtat
    python -m analysis.downstream backbone.pt --preset paper --dataset jamendo-mood --root ~/mtg-jamendo-dataset \\
        --audio-dir ~/jamendo-audio

Each positional argument is a method to evaluate: a training run folder (``config.json`` +
``backbone.pt``), a search folder (``best_config.json`` + ``best_backbone.pt``), a ``.pt`` state_dict
(``--preset`` names its architecture), or a baseline: ``random`` (a randomly initialised backbone of
the preset, seeded), ``random-bn`` (the same weights, with BatchNorm statistics measured on the
training data, see below) or ``melstats`` (per-band mean and standard deviation of the log-mel). All
three are added unless ``--no-baselines``. ``LABEL=PATH`` names a method in the tables. Without
``--dataset``, the data the runs given were trained on (:func:`dataset_of_runs`), else the corpus.

Why two random baselines*: an untrained backbone's BatchNorm layers hold their initial running
statistics (mean 0, variance 1), so in eval mode they pass activations through unnormalised, while
any trained checkpoint carries statistics of real data. ``random-bn`` keeps the random weights and
sets every BatchNorm's running mean and variance to the average of its batch statistics over a
seeded sample of ``bn_calibration_segments`` (2048) training segments, in shuffled batches of about
``batch_size`` (torch.optim.swa_utils.update_bn). It is the random backbone in the state training
leaves BatchNorm in, which can read lower than ``random`` (on the embedded corpus it does).

Protocol (the study's, as its paper and public code describe it; choices of ours are marked *):

* Embeddings. The backbone is frozen (eval mode). Audio is cut into back-to-back 4 s segments of
  the cached log-mel (starts 4 s apart; a segment's 126 frames end with the frame centred on its end,
  which is also the next segment's first). A training track contributes up to 25 segments, evenly spread* over its
  non-silent ones; a segment is silent* when its loudest mel bin is more than ``silence_db`` (40) dB
  below the track's loudest (the study's rule was segment RMS against track RMS, which also drops
  quiet passages). A validation or test track is the mean of the embeddings of ALL its segments
  (the whole track, as in the study's test loop).
* Classifiers*. ``linear`` (one linear layer with bias) and ``mlp`` (one hidden ReLU layer of 512
  units, dropout 0.25), both trained in torch with sigmoid + binary cross-entropy, Adam (lr 1e-3),
  mini-batches of 256, on inputs standardised by the training segments' mean and std. They train on
  SEGMENTS (each labelled with its track's tags) and are scored on TRACKS (mean embedding): the
  study's setting. The metrics rank the probes' logits*, which order the tracks as the
  probabilities do but never tie in a saturated sigmoid. Early stopping: every
  ``max(1 epoch, 25 steps)`` the valid tracks (mean embeddings, as test) are scored by macro mAP;
  training stops after 10 checks without improvement and the best check's weights are kept (valid
  BCE is used when no valid tag has both classes).
  Seeded: the same inputs and seed give the same result.
* Metrics. Macro ROC-AUC and macro mAP over the tags with both classes among the test tracks
  (musicssl.probe); the others are skipped and reported. Also per tag and per tag group. A tag with
  positive test tracks but no positive training track is scored too, though no probe can learn it: a
  warning and ``summary.json`` name it, and ``tags_without_train_positive`` counts such tags per fit;
  so for a tag that every training track carries, in ``tags_without_train_negative``.
  Such a tag's scores are set to a constant (in each fit, also the limited-data ones), so it scores
  exactly chance (ROC-AUC 0.5, AP its test prevalence) rather than however a probe trained on one
  class alone happens to rank the tracks.
* Bootstrap. 50 resamples of 50 % of the test tracks, drawn without replacement
  (musicssl.probe.bootstrap), the same resamples for every method: mean and 95 % percentile interval,
  and for every two methods of a probe the paired differences (:func:`paired_differences`). That the
  fraction can resample the test labels (at least 2 tracks, a tag with both classes) is checked
  before anything is embedded (:func:`check_bootstrap`).
* Limited data. 1, 5, 10, 20, 25 and 100 % of the training tracks, each drawn 4 times. Within a
  draw the subsets are nested prefixes of one ordering*: first, rarest tag first, a seeded random
  track for every tag that no earlier pick carries (so every subset at least that large has a
  positive for every tag that has one in the training split, and smaller subsets have the rarest
  tags), then the remaining tracks in a seeded random order. Subset size: ``round(f * N)``, at least
  one track. The valid and test sets are always complete. The headline table is the 100 % fit of
  draw 0; the other draws of 100 % differ only by the classifier's seed.

Held out. A checkpoint trained on a generated corpus records which one (generator version, seed,
tracks: ``training_corpus`` in its configuration; one written before that record and trained on
``corpus`` was trained on version 1's default corpus). Evaluated on a generated corpus of the same
seed, the test tracks that were its training tracks are counted (:func:`seen_test_tracks`): a
warning, ``test_tracks_trained_on`` in ``results.csv`` and ``summary.json``, and a note under the
table. Version 1 cut its splits by corpus size, so its corpora of two sizes, and a version-1 and a
version-2 corpus of one seed, put the same songs in different splits. A checkpoint trained on a folder
or tags file of the user's has its training split read again from the data its run names
(:func:`trained_audio`), and the test tracks whose audio files were in it are counted the same way:
splits are drawn from track ids, and a tags file's ``track_id`` column can name the tracks otherwise
than their paths, which a folder trained on without one gives as ids. A checkpoint trained on a named
dataset is checked where the evaluation may hold its training tracks: evaluated on another MTG-Jamendo
subset or split (one audio collection, each subset and split drawn its own way; compared by track id, so
the .low.mp3 copies count too) or on data of the user's (by audio file); not on its own official splits,
nor on another collection (MagnaTagATune, MSD).

What is cached: per method (hash of the backbone's weights, or the baseline's definition), dataset
(its usable tracks, paths and splits), audio (each track's entry in the mel cache, which changes when
its file does: :func:`audio_digest`), front-end (mel settings), segment protocol and device type (a GPU's
convolutions round otherwise), one ``.npz``
under ``$MUSICSSL_CACHE/embeddings/`` holding every track's mean embedding and the training
tracks' segment embeddings (memory-mapped when read back, and by the probe processes: the fits share the file's
pages instead of holding copies). Next to it, per probe, the limited-data scores and the headline fit's
test predictions, keyed on everything the fits depend on (labels, splits, probe settings, fractions,
draws, seed, device, torch version). A second run skips the backbone, and the probes of unchanged
methods (the baselines, typically): re-evaluating costs seconds. ``--no-cache`` recomputes both.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C meanwhile is one line
    from musicssl.cli import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting("python -m analysis.downstream")

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from musicssl.cli import ArgumentParser, counted, int_in, listed, parse_mixed
from musicssl.corpus.splits import VERSION_1_DEFAULT_CORPUS, corpus_identity, describe_corpus, seen_test_tracks
from musicssl.interrupts import SpawnPool, exit_code, held_signals, sigterm_interrupts
from musicssl.machine import usable_cpus
from musicssl.models import PRESETS, Backbone  # here, not where first used: the command's arguments are read by then
from musicssl.paths import FolderTaken, cache_hint, claim_folder, make_writable_folder, whole

__all__ = [
    "BASELINES",
    "CLASSIFIERS",
    "ClassifierConfig",
    "DownstreamConfig",
    "DownstreamError",
    "DownstreamResult",
    "Embeddings",
    "FittedClassifier",
    "MethodSpec",
    "TagScores",
    "build_backbone",
    "calibrate_batchnorm",
    "calibration_segments",
    "check_bootstrap",
    "compute_embeddings",
    "fit_classifier",
    "limited_data_subsets",
    "load_embeddings",
    "load_state_dict",
    "main",
    "melstats_features",
    "paired_differences",
    "paired_markdown",
    "resolve_method",
    "result_tables",
    "run_downstream",
    "score_tags",
    "subset_size",
    "write_outputs",
]

BASELINES = ("random", "random-bn", "melstats")
CLASSIFIERS = ("linear", "mlp")
DEFAULT_FRACTIONS = (0.01, 0.05, 0.10, 0.20, 0.25, 1.0)
CACHE_FORMAT = 1
PROBE_FORMAT = 5  # raise when the probes' training or scoring changes, so cached probe results are not reused
# Weight files looked for in a folder, in this order: a search's best trial, then a single run.
RUN_FOLDER_FILES = (("best_backbone.pt", "best_config.json"), ("backbone.pt", "config.json"))
_SUBSET_STREAM = 0x5355425345  # "SUBSE": keeps the subsets' random stream apart from the classifiers'
_CALIBRATION_STREAM = 0x424E43414C  # "BNCAL": the random-bn baseline's sample of training segments
# Seeds are in numpy's and torch's common range; the probes add up to 1000 per draw to the seed.
MAX_SEED = 2**32 - 1
# Bootstrap fractions suggested, smallest first, when the one given cannot resample the test tracks.
_BOOTSTRAP_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


class DownstreamError(ValueError):
    """Bad input for the evaluation (checkpoint, dataset, options); the message says how to fix it."""


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ClassifierConfig:
    """How the probes are trained (the same for every method, so only the embedding differs)."""

    hidden_dim: int = 512
    dropout: float = 0.25
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    # Early stopping: the valid score is checked every max(one epoch, check_every_steps) steps; training
    # stops after `patience` checks without improvement or after `max_checks` checks.
    check_every_steps: int = 25
    patience: int = 10
    max_checks: int = 200
    # Torch threads while a probe trains on the CPU. One: its matrices are small, and on a busy machine
    # extra threads wait for each other (fits of 0.1 s took 5-20 s with 2 threads on the shared 2-core
    # development machine). Embedding extraction keeps every CPU the process may use.
    cpu_threads: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_dim < 1:
            problems.append(f"hidden_dim must be >= 1, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            problems.append(f"need learning_rate > 0 and weight_decay >= 0, got {self.learning_rate}, {self.weight_decay}")
        for name in ("batch_size", "check_every_steps", "patience", "max_checks", "cpu_threads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise DownstreamError("invalid ClassifierConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class DownstreamConfig:
    """One evaluation: the dataset, the protocol's sizes and seeds, and where to compute and cache."""

    dataset: str = "corpus"
    root: str | None = None
    audio_dir: str | None = None
    classifiers: tuple[str, ...] = CLASSIFIERS
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    draws: int = 4
    bootstrap_resamples: int = 50
    bootstrap_fraction: float = 0.5
    segment_seconds: float = 4.0
    max_train_segments: int = 25
    silence_db: float | None = 40.0
    seed: int = 0
    device: str = "auto"
    batch_size: int = 256
    workers: int | None = None
    # Processes fitting the limited-data probes side by side on the CPU (each fit is one thread and
    # independent of the others; results do not depend on this). None: one per CPU this process may use, 0: in this process.
    # They are spawned, so a script that calls run_downstream needs the usual
    # ``if __name__ == "__main__":`` guard (or probe_workers=0).
    probe_workers: int | None = None
    # The random-bn baseline: training segments its BatchNorm statistics are measured on.
    bn_calibration_segments: int = 2048
    cache_dir: str | None = None
    use_cache: bool = True
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self) -> None:
        problems = []
        unknown = [name for name in self.classifiers if name not in CLASSIFIERS]
        if unknown or not self.classifiers:
            problems.append(f"classifiers must be some of {list(CLASSIFIERS)}, got {list(self.classifiers)}")
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            problems.append(f"training fractions must be in (0, 1] (percent in (0, 100]), got {list(self.fractions)}")
        if self.draws < 1:
            problems.append(f"draws must be >= 1, got {self.draws}")
        if self.bootstrap_resamples < 2:
            problems.append(f"bootstrap resamples must be >= 2, got {self.bootstrap_resamples}")
        if not 0.0 < self.bootstrap_fraction <= 1.0:
            problems.append(f"bootstrap fraction must be in (0, 1], got {self.bootstrap_fraction}")
        if self.max_train_segments < 1:
            problems.append(f"max_train_segments must be >= 1, got {self.max_train_segments}")
        if self.silence_db is not None and not (math.isfinite(self.silence_db) and self.silence_db > 0):
            problems.append(f"silence_db must be a finite number of dB > 0 (or None to keep silent segments), "
                            f"got {self.silence_db}")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be in 0-{MAX_SEED}, got {self.seed}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.bn_calibration_segments < 2:
            problems.append(f"bn_calibration_segments must be >= 2, got {self.bn_calibration_segments}")
        if self.probe_workers is not None and self.probe_workers < 0:
            problems.append(f"probe_workers must be >= 0, got {self.probe_workers}")
        if self.device != "auto" and _device_type(self.device) not in ("cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if problems:
            raise DownstreamError("; ".join(problems))
        # The headline table is the 100 % fit, so 100 % is always evaluated.
        fractions = tuple(sorted(set(float(f) for f in self.fractions) | {1.0}))
        object.__setattr__(self, "fractions", fractions)
        object.__setattr__(self, "classifiers", tuple(dict.fromkeys(self.classifiers)))

    def protocol(self) -> dict[str, Any]:
        """The settings that decide the embeddings (what the embedding cache is keyed on)."""
        return {
            "format": CACHE_FORMAT,
            "segment_seconds": float(self.segment_seconds),
            "max_train_segments": int(self.max_train_segments),
            "silence_db": None if self.silence_db is None else float(self.silence_db),
            "eval_segments": "all",
        }


def _starts_as_a_pickle(path: str | Path) -> bool:
    """Whether the file starts as a pickle of protocol 2 or later does (torch.save's format before its zip one)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(1) == b"\x80"
    except OSError:
        return False


def _device_type(name: str) -> str | None:
    """The type of torch device ``name`` names (``cuda`` for ``cuda:1``), None if torch refuses it."""
    try:
        return torch.device(name).type
    except (RuntimeError, ValueError, TypeError):
        return None


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DownstreamError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DownstreamError(f"device {name!r} requested but torch sees {count} CUDA GPU(s), cuda:0 to "
                              f"cuda:{count - 1}; use one of those, or --device cpu")
    return device


# --------------------------------------------------------------------------------------------------
# Methods: checkpoints and baselines


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a checkpoint or a baseline, with the architecture to load it into.

    ``kind`` is ``checkpoint``, ``random``, ``random-bn`` or ``melstats``. ``preset`` is the backbone preset
    (``None`` for ``melstats``, which uses the mel bands of ``n_mels``). ``path`` is the weights file
    and ``config_path`` the run's configuration, when there is one.
    """

    label: str
    kind: Literal["checkpoint", "random", "random-bn", "melstats"]
    preset: str | None
    n_mels: int
    path: Path | None = None
    config_path: Path | None = None
    method: str | None = None
    seed: int = 0
    search_trial: int | None = None  # a search's best backbone: the trial it is (set as its weights are loaded)

    def describe(self) -> str:
        if self.kind == "checkpoint":
            trial = f"search trial #{self.search_trial}, " if self.search_trial is not None else ""
            return f"{self.label}: {self.path} ({trial}preset {self.preset})"
        if self.kind == "random":
            return f"{self.label}: randomly initialised {self.preset} backbone (seed {self.seed})"
        if self.kind == "random-bn":
            return (f"{self.label}: randomly initialised {self.preset} backbone (seed {self.seed}), BatchNorm "
                    "statistics from training segments")
        return f"{self.label}: mean and std of each of the {self.n_mels} log-mel bands"


def _preset_mels(preset: str) -> int:
    if preset not in PRESETS:
        raise DownstreamError(f"unknown backbone preset {preset!r}; available presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset].n_mels


def _find_key(document: Any, key: str) -> Any:
    """``document[key]``, else the first ``key`` found in nested dicts (breadth first), else None."""
    queue = [document]
    while queue:
        current = queue.pop(0)
        if isinstance(current, dict):
            if key in current and not isinstance(current[key], dict):
                return current[key]
            queue.extend(value for value in current.values() if isinstance(value, dict))
    return None


def training_corpus(spec: "MethodSpec") -> dict | None:
    """The generated corpus checkpoint ``spec`` was trained on (as :func:`musicssl.corpus.splits.corpus_identity`
    gives it), from its run configuration; None for a baseline, a checkpoint without a configuration, or
    one trained on other data."""
    document = _run_document(spec)
    if document is None:
        return None
    if "training_corpus" in document:
        recorded = document["training_corpus"]
        return recorded if isinstance(recorded, dict) else None
    # Written before the record (2026-12-05), so on a corpus of version 1: the data it names, as it was given.
    data, root, _ = training_data(spec) or (None, None, None)
    if data is None:
        return None
    from musicssl.data.loaders import dataset_name

    if data.strip().lower() == "corpus" and not root:
        return dict(VERSION_1_DEFAULT_CORPUS)
    if data.strip().lower() == "corpus":
        folder = Path(str(root)).expanduser()
    elif dataset_name(data) is not None:  # mtat, jamendo-*, msd: their own splits
        return None
    else:
        folder = _folder_of(data)
    identity = corpus_identity(folder)
    # A folder that holds another version's corpus by now was rebuilt since: what it held is not known.
    return identity if identity is not None and identity["generator_version"] == 1 else None


def _folder_of(data: str) -> Path:
    """The folder a ``--data`` path names: itself, or the folder of a file (a ``tracks.csv``, a tags file)."""
    folder = Path(data).expanduser()
    return folder if folder.is_dir() else folder.parent


def _run_configuration(spec: "MethodSpec") -> Path | None:
    """The configuration file of checkpoint ``spec``'s run (a bare .pt's: the one beside it), or None."""
    config_path = spec.config_path
    if config_path is None and spec.path is not None:  # a bare .pt whose preset --preset gave: its run's config
        config_path = next((spec.path.parent / config for weights, config in RUN_FOLDER_FILES
                            if spec.path.name == weights), spec.path.parent / "config.json")
    return None if config_path is None else Path(config_path)


def _run_document(spec: "MethodSpec") -> dict | None:
    config_path = _run_configuration(spec)
    return _read_json_object(config_path) if config_path is not None else None


def training_data(spec: "MethodSpec") -> tuple[str, str | None, str | None] | None:
    """The data checkpoint ``spec`` trained on as its run was given it: ``--data``, ``--root`` and
    ``--audio-dir`` (a search's, from its ``search.json``: its trials' configurations name no
    folders); None for a baseline or a checkpoint without a configuration."""
    document = _run_document(spec)
    if document is None:
        return None
    data, root, audio = _find_key(document, "data"), _find_key(document, "data_root"), _find_key(document, "audio_dir")
    config_path = _run_configuration(spec)
    search = _read_json_object(config_path.parent / "search.json") if config_path.name == "best_config.json" else None
    if search is not None:
        data, root, audio = search.get("data", data), search.get("root"), search.get("audio_dir")
    if not isinstance(data, str) or not data.strip():
        return None
    return data, (str(root) if root else None), (str(audio) if audio else None)


def dataset_of_runs(methods: Sequence["MethodSpec"]) -> tuple[tuple[str, str | None, str | None], list[str]] | None:
    """The data the checkpoints among ``methods`` were trained on, as their runs recorded it (``--data``,
    ``--root``, ``--audio-dir``: :func:`training_data`), and the labels of those that recorded it; None where
    none did (baselines, bare checkpoints). Raises :class:`DownstreamError` where they name different data, or
    where the data was read without tags (the probes need them): ``--dataset`` must say what to evaluate on
    (recorded relative paths: :func:`check_recorded_paths`)."""
    recorded: dict[tuple[str, str | None, str | None], tuple[tuple[str, str | None, str | None], list[str]]] = {}
    for spec in methods:
        found = training_data(spec) if spec.kind == "checkpoint" else None
        if found is not None:  # the first run's spelling of the same data: `/x` and `/x/tracks.csv`, `MTAT` and `mtat`
            recorded.setdefault(_data_identity(found), (found, []))[1].append(spec.label)
    if not recorded:
        return None
    if len(recorded) > 1:
        groups = "; ".join(f"{', '.join(labels)}: {_data_text(data)}" for data, labels in recorded.values())
        raise DownstreamError(f"the checkpoints were trained on different data ({groups}); give --dataset to evaluate "
                              "them all on one")
    (data, labels), = recorded.values()
    unlabeled = [spec.label for spec in methods if spec.label in labels
                 and (_run_document(spec) or {}).get("training_data_unlabeled")]
    if unlabeled:
        raise DownstreamError(f"{unlabeled[0]} was trained on {_data_text(data)}, read without tags (audio alone); the "
                              "probes need tagged tracks: give --dataset, tagged data (a tags file or tracks.csv, or "
                              "a named dataset)")
    return data, labels


def _data_identity(data: tuple[str, str | None, str | None]) -> tuple[str, str | None, str | None]:
    """Recorded training data (:func:`training_data`) as one spelling of what was read: a named dataset by its
    canonical name; absolute paths by their real paths; a folder by the table it reads, where it holds one (its
    ``tracks.csv``, or its tags file: ``/x`` and ``/x/tracks.csv`` are the same data). A relative path stays as it
    was given (:func:`check_recorded_paths` refuses it)."""
    from musicssl.data.loaders import DatasetError, canonical_dataset_spec, dataset_name, folder_table

    def real(path: str | None) -> str | None:
        absolute = path is not None and Path(path).expanduser().is_absolute()
        return os.path.realpath(Path(path).expanduser()) if absolute else path

    name, root, audio = data
    if dataset_name(name) is not None:
        return canonical_dataset_spec(name), real(root), real(audio)
    folder = Path(name).expanduser()
    if folder.is_absolute() and folder.is_dir():
        try:
            table = folder_table(folder)
        except (DatasetError, OSError, UnicodeError):  # several tables, unreadable: the folder as it is
            table = None
        name = str(table or folder)
    return real(name), real(root), real(audio)


def check_recorded_paths(data: tuple[str, str | None, str | None], label: str) -> None:
    """DownstreamError where recorded training data (``--data``, ``--root``, ``--audio-dir``, after those given to
    the evaluation took their place) holds a relative path: recorded before 2026-12-03, as given, it would be read
    against the folder the evaluation runs in, which could hold other data."""
    from musicssl.data.loaders import dataset_name

    relative = [f"{flag}{path}" for flag, path in (("", data[0] if dataset_name(data[0]) is None else None),
                                                 ("--root ", data[1]), ("--audio-dir ", data[2]))
                if path and not Path(path).expanduser().is_absolute()]
    if relative:
        raise DownstreamError(f"{label} was trained on {_data_text(data)}, whose {relative[0]} is a path relative to "
                              "where it was trained: give --dataset (with --root and --audio-dir where it needs them)")


def _data_text(data: tuple[str, str | None, str | None]) -> str:
    """``mtat --root ~/mtat``: recorded training data as the flags that name it."""
    name, root, audio = data
    return name + (f" --root {root}" if root else "") + (f" --audio-dir {audio}" if audio else "")


def dataset_family(spec: str) -> str | None:
    """The named dataset whose audio ``spec`` names: ``jamendo`` for every MTG-Jamendo subset, split and
    quality (one audio collection, one track id per track), ``mtat``, ``msd``, ``corpus``; None for a path."""
    from musicssl.data.loaders import dataset_name

    name = dataset_name(spec)
    return None if name is None else name.split("-")[0]


def _official_splits(spec: str) -> str:
    """A named dataset's splits: the same for its .low.mp3 copies (``jamendo-top50-low``)."""
    from musicssl.data.loaders import canonical_dataset_spec

    return canonical_dataset_spec(spec).removesuffix("-low")


def trained_audio(recorded: tuple[str, str | None, str | None] | None, unlabeled: bool | None,
                  grouped: bool = False, evaluated: str | None = None) -> tuple[set[str] | None, str]:
    """What a checkpoint's training split held, read again from the data its run names (``recorded``:
    :func:`training_data`), as the run read it (``unlabeled``: its ``training_data_unlabeled``; a folder's
    audio alone, where it recorded so, even if a tags file has been added since): the real paths of its audio
    files and, for a named dataset, ``FAMILY:TRACK_ID`` keys (:func:`dataset_family`; the .low.mp3 copies of
    MTG-Jamendo have other paths but the same ids). A named dataset is read again only where the evaluation
    (``evaluated``: its dataset, named, or None for data of the user's) may share its tracks under other
    splits: another MTG-Jamendo subset or split, or data of the user's; not on its own official splits, nor on
    another named collection's audio. (None, why) where it cannot say or need not: a baseline, a generated
    corpus (:func:`training_corpus` tells its tracks by song), a named dataset that needs no check or whose run
    recorded no ``--root``, a relative path, data no longer readable, or a folder that holds a tags file now,
    trained on by a run that did not record whether it read it. ``grouped`` is its ``training_split_groups``:
    whether a tags file's ``split_group`` column drew its splits (False for runs before 2026-12-07, which did not
    read that column), so that a column added since does not change them."""
    import logging

    from musicssl.data.loaders import DatasetError, load_folder, open_dataset, open_dataset_option, split_by_groups

    if recorded is None:
        return None, "no record of its training data"
    data, root, audio = recorded
    family = dataset_family(data)
    if family == "corpus":  # its record (training_corpus) said which corpus, where that is known
        return None, f"its generated corpus ({root or 'the default one'}) is not the one it trained on any more"
    if family is not None:
        if evaluated is not None and (_official_splits(data) == _official_splits(evaluated)
                                      or dataset_family(evaluated) != family):
            return None, f"trained on {data}"
        if not root or not Path(root).expanduser().is_absolute():
            return None, (f"its run recorded no --root for {data}" if not root else
                          f"its --root {root} is a path relative to where it was trained")
        try:
            index = open_dataset(data, root, check_audio=False, **({"audio_dir": audio} if audio else {}))
        except (DatasetError, OSError, ValueError) as error:
            return None, f"its training data {data} cannot be read now ({error})"
        train = index.split("train")
        return ({os.path.realpath(path) for path in train.paths}
                | {f"{family}:{track_id}" for track_id in train.track_ids}), ""
    path = Path(data).expanduser()
    if not path.is_absolute():  # runs before 2026-12-03 recorded --data as given
        return None, f"its training data {data} is a path relative to where it was trained"
    loaders = logging.getLogger("musicssl.data.loaders")
    level = loaders.level
    loaders.setLevel(logging.ERROR)  # its notes on that data (tracks left out, empty splits) are not this evaluation's
    try:
        if unlabeled is True and path.is_dir():
            index = load_folder(path, unlabeled=True)
        else:
            index = open_dataset_option(data, root, audio, allow_unlabeled=True, split_groups=grouped)
    except (DatasetError, OSError, ValueError) as error:
        return None, f"its training data {data} cannot be read now ({error})"
    finally:
        loaders.setLevel(level)
    if grouped and not split_by_groups(index):  # (its groups edited since cannot be told)
        return None, (f"its run drew its splits by the split_group column of {data}, which it no longer has")
    if unlabeled is None and path.is_dir() and not index.extra.get("unlabeled"):
        return None, (f"its run did not record whether it read {data}'s audio alone or the tags file that folder "
                      "holds now (runs before 2026-12-06 do not); its splits differ if it read the audio alone")
    return {os.path.realpath(path) for path in index.split("train").paths}, ""


def corpus_training_audio(spec: "MethodSpec", trained_on: dict) -> tuple[set[str] | None, str]:
    """The real paths of the training tracks' audio of the generated corpus checkpoint ``spec`` trained on
    (``trained_on``: :func:`training_corpus`), read from that corpus's folder as its run named it (``--root``,
    the default folder, or ``--data`` FOLDER); for an evaluation on data that is not that corpus as generated
    (a copy of its ``tracks.csv`` with tracks moved between splits, say), whose tracks are told by audio file.
    The training tracks are the generator's (:func:`musicssl.corpus.splits.splits_of`). (None, why) where the
    folder is not known or no longer holds that corpus."""
    from musicssl.corpus.build import default_corpus_dir
    from musicssl.corpus.splits import splits_of, track_number
    from musicssl.data.index import TrackIndex, TrackIndexError

    data, root, _ = training_data(spec) or (None, None, None)
    if data is None:
        return None, "no record of its training data"
    if dataset_family(data) == "corpus":
        if root is None and trained_on.get("tracks") is None:
            return None, f"its generated corpus ({describe_corpus(trained_on)}) is not known by its size"
        folder = (Path(root).expanduser() if root else
                  default_corpus_dir(int(trained_on["tracks"]), float(trained_on["seconds"]), int(trained_on["seed"]),
                                     int(trained_on["generator_version"])))
    else:
        folder = _folder_of(data)
    if not folder.is_absolute():
        return None, f"its training data {data} is a path relative to where it was trained"
    identity = corpus_identity(folder)
    if identity is None or any(identity.get(key) != trained_on.get(key) for key in trained_on):
        return None, f"its generated corpus ({describe_corpus(trained_on)}) is no longer in {folder}"
    try:
        index = TrackIndex.from_csv(folder / "tracks.csv")
    except (TrackIndexError, OSError, ValueError) as error:
        return None, f"its generated corpus in {folder} cannot be read now ({error})"
    generated = splits_of(trained_on)
    numbers = [track_number(str(track_id)) for track_id in index.track_ids]
    return {os.path.realpath(path) for path, number in zip(index.paths, numbers)
            if number is not None and number < len(generated) and generated[number] == "train"}, ""


def _read_json_object(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def search_trial_of(spec: MethodSpec) -> int | None:
    """The trial of the search whose best backbone ``spec`` is (``best_config.json``'s ``trial``), or None."""
    if spec.kind != "checkpoint" or spec.config_path is None or spec.config_path.name != "best_config.json":
        return None
    trial = (_read_json_object(spec.config_path) or {}).get("trial")
    return trial if isinstance(trial, int) and not isinstance(trial, bool) else None


def _search_unfinished(spec: MethodSpec) -> tuple[int, int] | None:
    """For a search's best backbone, ``(finished, requested)`` trials where its ``summary.json`` counts fewer
    finished than requested (a search still running, or stopped: its best may change); else None."""
    if spec.search_trial is None or spec.config_path is None:
        return None
    summary = _read_json_object(spec.config_path.parent / "summary.json") or {}
    finished, requested = summary.get("trials_finished"), summary.get("trials_requested")
    if isinstance(finished, int) and isinstance(requested, int) and finished < requested:
        return finished, requested
    return None


def _read_run_config(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DownstreamError(f"{path}: cannot read the run's configuration as JSON ({error})") from None
    if not isinstance(document, dict):
        raise DownstreamError(f"{path}: expected a JSON object with the run's settings (preset, method)")
    return document


def resolve_method(argument: str, preset: str = "cpu", preset_given: bool = False, seed: int = 0) -> MethodSpec:
    """Turn a command-line argument into a :class:`MethodSpec` (see the module docstring for the forms).

    ``preset`` is the architecture for ``random`` and for a bare ``.pt`` file; ``preset_given`` says the
    user chose it, which then wins over the run's configuration lying next to a bare ``.pt`` file
    (``config.json``, or ``best_config.json`` beside a search's ``best_backbone.pt``). A run or
    search folder always uses the preset of its own configuration.
    """
    label = None
    target = argument
    if "=" in argument and not Path(argument).exists():
        label, target = (part.strip() for part in argument.split("=", 1))
        if not label or not target:
            raise DownstreamError(f"{argument!r}: write LABEL=PATH with both parts non-empty")
        if label in BASELINES and target not in BASELINES:
            raise DownstreamError(f"{argument!r}: {label!r} is the name of a baseline, whose row it would take; "
                                  "give the checkpoint another label")
    if target in BASELINES:
        if target in ("random", "random-bn"):
            return MethodSpec(label or target, target, preset, _preset_mels(preset), seed=seed)
        return MethodSpec(label or "melstats", "melstats", None, _preset_mels(preset), seed=seed)

    path = Path(target).expanduser()
    if path.is_dir():
        for weights_name, config_name in RUN_FOLDER_FILES:
            weights, config_path = path / weights_name, path / config_name
            if weights.is_file():
                if not config_path.is_file():
                    raise DownstreamError(
                        f"{path}: has {weights_name} but no {config_name} to say its architecture; add it, or pass "
                        f"{weights} itself with --preset"
                    )
                document = _read_run_config(config_path)
                run_preset = _find_key(document, "preset")
                if run_preset is None:
                    raise DownstreamError(f"{config_path}: has no 'preset' entry; pass {weights} itself with --preset")
                method = _find_key(document, "method")
                default_label = str(method) if method else path.name
                return MethodSpec(
                    label or default_label, "checkpoint", str(run_preset), _preset_mels(str(run_preset)),
                    path=weights.resolve(), config_path=config_path.resolve(),
                    method=str(method) if method else None, seed=seed,
                )
        if (path / "search.json").is_file():  # a search writes its best backbone once a trial completes with a score
            raise DownstreamError(
                f"{path}: a search with no best_backbone.pt yet: none of its trials has completed with a score "
                "(collapsed, diverged and failed trials leave none); wait for one to complete, or evaluate another run"
            )
        run_summary = _read_json_object(path / "summary.json") if (path / "config.json").is_file() else None
        if run_summary is not None and run_summary.get("backbone_epoch") == 0:  # musicssl.train keeps none then
            why = (f"that diverged in its first epoch (at step {run_summary['diverged_step']})"
                   if run_summary.get("diverged_step") is not None else "whose weights were not finite after any epoch")
            raise DownstreamError(f"{path}: a training run {why} keeps no backbone.pt; train it again with a lower "
                                  "learning rate, or evaluate another run")
        raise DownstreamError(
            f"{path}: no backbone weights here; expected a training run folder (config.json + backbone.pt) or a "
            "search folder (best_config.json + best_backbone.pt), or pass a .pt state_dict"
        )
    if path.is_file():
        chosen = preset
        method = None
        config_path = None
        # its run's configuration: a search's best_backbone.pt has best_config.json beside it
        sibling = next((path.parent / config for weights, config in RUN_FOLDER_FILES if path.name == weights),
                       path.parent / "config.json")
        if not preset_given and sibling.is_file():
            document = _read_run_config(sibling)
            if _find_key(document, "preset"):
                chosen = str(_find_key(document, "preset"))
                config_path = sibling.resolve()
            method = _find_key(document, "method")
        generic = path.stem in ("backbone", "best_backbone", "model", "checkpoint")
        default_label = str(method) if method else (path.parent.name if generic else path.stem)
        return MethodSpec(
            label or default_label, "checkpoint", chosen, _preset_mels(chosen),
            path=path.resolve(), config_path=config_path, method=str(method) if method else None, seed=seed,
        )
    raise DownstreamError(
        f"{target!r}: no such checkpoint file or run folder, and not a baseline ({', '.join(BASELINES)})"
    )


_BACKBONE_ROOTS = ("trunk.", "attention_pool.")
_TEACHER_WORDS = ("teacher", "target", "momentum", "ema")


def load_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    """The backbone's tensors from ``path`` and the key prefix that was stripped (``""`` for a plain one).

    Accepts a plain ``Backbone.state_dict()`` (what the trainer writes), a dict with a ``state_dict``
    entry (a Lightning checkpoint) and whole-model state dicts whose backbone keys carry a prefix
    (``method.backbone.trunk...``): the student's backbone is taken, never a teacher/EMA copy. Loaded with
    ``weights_only=True``, so a checkpoint cannot run code.
    """
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        if isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower():
            # torch's own message advises weights_only=False, which would let the file run code.
            objects = "unsupported global" in str(error).lower() or zipfile.is_zipfile(path)
            cause = ("holds Python objects other than tensors, which are not loaded (loading them could run code)"
                     if objects else "is not a PyTorch checkpoint")
        elif not zipfile.is_zipfile(path) and not _starts_as_a_pickle(path):  # e.g. a text file: "KeyError: 101"
            cause = "is not a PyTorch checkpoint (torch.save writes a zip archive)"
        else:
            cause = f"cannot be read as a PyTorch state_dict ({type(error).__name__}: {str(error)[:200]})"
        raise DownstreamError(f"{path}: {cause}; pass the backbone.pt a training run wrote") from None
    if isinstance(document, dict) and isinstance(document.get("state_dict"), dict):
        document = document["state_dict"]
    if not isinstance(document, dict) or not document or not all(isinstance(v, Tensor) for v in document.values()):
        raise DownstreamError(f"{path}: holds a {type(document).__name__}, not a state_dict of tensors")
    prefixes = sorted(
        {key[: key.index(root)] for key in document for root in _BACKBONE_ROOTS if root in key
         and (key.index(root) == 0 or key[key.index(root) - 1] == ".")},
        key=lambda prefix: (any(word in prefix.lower() for word in _TEACHER_WORDS), len(prefix)),
    )
    if not prefixes:
        raise DownstreamError(
            f"{path}: no backbone weights in it (no keys with 'trunk.' or 'attention_pool.'); "
            f"its first keys are {list(document)[:4]}"
        )
    prefix = prefixes[0]
    state = {key[len(prefix):]: value for key, value in document.items() if key.startswith(prefix)
             and key[len(prefix):].startswith(_BACKBONE_ROOTS)}
    return state, prefix


def _shape_mismatch(expected: dict[str, Tensor], state: dict[str, Tensor]) -> str:
    """'' when ``state`` fits ``expected`` exactly, else a short description of the first differences."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and tuple(expected[key].shape) != tuple(state[key].shape)]
    parts = []
    if wrong:
        key = wrong[0]
        parts.append(
            f"{len(wrong)} tensor(s) of another shape, e.g. {key}: checkpoint {tuple(state[key].shape)} vs "
            f"{tuple(expected[key].shape)}"
        )
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return "; ".join(parts)


def build_backbone(spec: MethodSpec) -> nn.Module:
    """The frozen backbone of a ``checkpoint``, ``random`` or ``random-bn`` spec, in eval mode, on the CPU.

    ``random-bn`` gives the same initial weights as ``random``; :func:`calibrate_batchnorm` then sets
    its BatchNorm statistics (which needs the dataset, so it happens later, in :func:`run_downstream`).

    A checkpoint whose tensors do not fit the preset raises :class:`DownstreamError` naming the
    preset and, when one fits, the preset to use instead.
    """

    if spec.kind in ("random", "random-bn"):
        # A private RNG stream: the baseline is the same whatever ran before, and global state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            backbone = Backbone(preset=spec.preset)
        return backbone.eval().requires_grad_(False)
    if spec.kind != "checkpoint" or spec.path is None:
        raise DownstreamError(f"{spec.label}: {spec.kind} has no backbone")
    state, _ = load_state_dict(spec.path)
    backbone = Backbone(preset=spec.preset)
    mismatch = _shape_mismatch(backbone.state_dict(), state)
    if mismatch:
        fitting = [name for name in PRESETS if name != spec.preset
                   and not _shape_mismatch(Backbone(preset=name).state_dict(), state)]
        source = f"the preset in {spec.config_path}" if spec.config_path else "--preset"
        # A run folder's preset is its config's, whatever --preset says: point at what does change it.
        change = (f"set \"preset\": \"{fitting[0]}\" in {spec.config_path}, or pass {spec.path} with --preset "
                  f"{fitting[0]}" if spec.config_path and fitting else f"pass --preset {fitting[0]}" if fitting else "")
        hint = (f"it fits preset {fitting[0]!r}: {change}" if fitting
                else f"it fits none of the presets {sorted(PRESETS)}")
        raise DownstreamError(
            f"{spec.path}: the checkpoint does not match backbone preset {spec.preset!r} ({source}): {mismatch}; {hint}"
        )
    backbone.load_state_dict(state)
    return backbone.eval().requires_grad_(False)


def weights_digest(backbone: nn.Module) -> str:
    """SHA-256 of the backbone's tensors (names, dtypes, shapes and bytes): identifies the weights
    whatever file they came from, and also identifies the seeded random baseline."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def melstats_features(segments: Tensor) -> Tensor:
    """The ``melstats`` baseline: per mel band, the mean and the (population) standard deviation over
    the frames of each segment, ``(B, n_mels, frames)`` -> ``(B, 2 * n_mels)`` [means, stds]."""
    return torch.cat([segments.mean(dim=-1), segments.std(dim=-1, unbiased=False)], dim=1)


def calibration_segments(cache, track_ids: Sequence[str], config: DownstreamConfig, seed: int) -> Tensor:
    """The random-bn baseline's data: a seeded sample of ``config.bn_calibration_segments`` training segments.

    ``track_ids`` are the training tracks. Segments are the protocol's (``max_train_segments`` per track,
    silent ones dropped). Tracks are visited in a seeded random order and each gives the same number
    of randomly chosen segments (its share, ``ceil(count / tracks)``, or all it has), so the sample
    spreads over many tracks; it is returned shuffled. Fewer segments than asked when tracks hold
    fewer than their share (a short track's shortfall is not made up by the others); the caller
    logs the number used.
    """
    if not len(track_ids):
        raise DownstreamError("the random-bn baseline needs training tracks to measure BatchNorm statistics on")
    wanted = config.bn_calibration_segments
    rng = np.random.default_rng([seed, _CALIBRATION_STREAM])
    per_track = max(1, math.ceil(wanted / len(track_ids)))
    parts: list[Tensor] = []
    gathered = 0
    for position in rng.permutation(len(track_ids)):
        segments = _protocol_segments(cache, track_ids[position], config, train=True)
        if len(segments) == 0:
            continue
        chosen = rng.choice(len(segments), size=min(per_track, len(segments), wanted - gathered), replace=False)
        parts.append(segments[torch.from_numpy(np.sort(chosen))])
        gathered += len(chosen)
        if gathered >= wanted:
            break
    if not parts:
        raise DownstreamError("the training tracks have no 4 s segment to measure BatchNorm statistics on")
    sample = torch.cat(parts)
    return sample[torch.from_numpy(rng.permutation(len(sample)))]


def calibrate_batchnorm(backbone: nn.Module, segments: Tensor, batch_size: int, device: torch.device | None = None) -> int:
    """:func:`musicssl.embeddings.calibrate_batchnorm` (running statistics from ``segments``, weights
    untouched; returns the number of batches), with a :class:`DownstreamError` for too few segments."""
    from musicssl.embeddings import calibrate_batchnorm as calibrate

    try:
        return calibrate(backbone, segments, batch_size, device)
    except ValueError as error:
        raise DownstreamError(str(error)) from None


# --------------------------------------------------------------------------------------------------
# Embeddings


@dataclass
class Embeddings:
    """Frozen embeddings of one method on one dataset.

    ``track_means[i]``: the mean embedding of track ``track_ids[i]`` (over all its segments for
    valid/test tracks, over its training segments for train tracks). ``segments`` holds the training
    segments' embeddings, track after track, ``segment_counts[i]`` of them for track ``i`` (0 for
    valid/test tracks).
    """

    track_ids: list[str]
    splits: np.ndarray
    track_means: np.ndarray
    segment_counts: np.ndarray
    segments: np.ndarray
    seconds: float = 0.0
    from_cache: bool = False
    path: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.track_means.shape[1])

    def training_segments(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment embeddings of the tracks at ``positions`` and, per segment, its track's position.

        When the tracks are every track with segments, in order, the embeddings are ``segments`` itself
        (not a copy: memory-mapped, copy-on-write, when read from the cache)."""
        rows, owners = segment_rows(self.segment_counts, positions)
        return _take_rows(self.segments, rows), owners

    def segments_file(self) -> "MappedArray | None":
        """Where ``segments`` lies in the cache file when it is memory-mapped from there, else None."""
        return getattr(self.segments, "mapped_from", None)


def segment_rows(segment_counts: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the segments of the tracks at ``positions`` (track after track) in embeddings holding
    ``segment_counts[i]`` segments of track ``i``, and per row its track's position."""
    positions = np.asarray(positions, dtype=np.int64)
    counts = np.asarray(segment_counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = (np.concatenate([np.arange(starts[p], starts[p + 1]) for p in positions]) if len(positions)
            else np.zeros(0, dtype=np.int64))
    return rows.astype(np.int64, copy=False), np.repeat(positions, counts[positions])


def _take_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``, or ``array`` itself when ``rows`` are all its rows in order (no copy)."""
    if len(rows) == len(array) and (len(rows) == 0 or (rows[0] == 0 and bool((np.diff(rows) == 1).all()))):
        return array
    return np.asarray(array[rows])


def _all_finite(array: np.ndarray, rows: int = 65536) -> bool:
    """``np.isfinite(array).all()`` a block of rows at a time (no mask of the whole array in memory)."""
    return all(bool(np.isfinite(array[start : start + rows]).all()) for start in range(0, len(array), rows))


class CacheFileChanged(OSError):
    """The cache file a :class:`MappedArray` was found in is gone, or is another file now."""


def _file_identity(status: os.stat_result) -> tuple[int, int, int, int]:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


@dataclass(frozen=True)
class MappedArray:
    """Where an array lies in a file (an uncompressed ``.npy`` member of an ``.npz``), for any process to
    map it from there instead of being sent a copy; ``identity`` (device, inode, size, modification time)
    tells whether the file at ``path`` is still the one it was found in."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    fortran_order: bool
    identity: tuple[int, int, int, int]

    def unchanged(self) -> bool:
        """Whether ``path`` still names the file the array was found in."""
        try:
            return _file_identity(os.stat(self.path)) == self.identity
        except OSError:
            return False

    def open(self, stream: Any = None) -> np.ndarray:
        """The array, memory-mapped copy-on-write from ``stream`` (an open file, the one it was found in) or
        from ``path``: its pages are the file's, which the kernel shares between processes and takes back under
        memory pressure; a write would go to a private copy of its page, never to the file.
        :class:`CacheFileChanged` when ``path`` is gone or names another file now."""
        try:
            with contextlib.ExitStack() as stack:
                if stream is None:
                    stream = stack.enter_context(open(self.path, "rb"))
                if _file_identity(os.fstat(stream.fileno())) != self.identity:
                    raise CacheFileChanged(f"{self.path} is another file now")
                array = np.memmap(stream, dtype=np.dtype(self.dtype), mode="c", offset=self.offset, shape=self.shape,
                                  order="F" if self.fortran_order else "C")
        except FileNotFoundError as error:
            raise CacheFileChanged(f"{self.path} is gone") from error
        array.mapped_from = self  # type: ignore[attr-defined]  (how Embeddings.segments_file finds it)
        return array


def _npz_member(stream: Any, name: str) -> MappedArray | None:
    """Where the array ``name`` of the ``.npz`` open as ``stream`` (a file opened for reading) lies, when it can
    be mapped: stored uncompressed and unencrypted (as ``np.savez`` writes), not empty, of plain values.
    None otherwise (then it is read as usual)."""
    import struct

    with zipfile.ZipFile(stream) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed, or encrypted
        return None
    stream.seek(info.header_offset)
    header = stream.read(30)  # a zip local file header: its name's and extra field's lengths at 26 and 28
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    if stream.read(name_length) != info.filename.encode():
        return None
    start = info.header_offset + 30 + name_length + extra_length
    stream.seek(start)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    offset = stream.tell()
    values = math.prod(shape)
    if dtype.hasobject or values == 0 or offset + values * dtype.itemsize > start + info.file_size:
        return None
    return MappedArray(getattr(stream, "name", ""), offset, tuple(int(n) for n in shape), dtype.str,
                       bool(fortran_order), _file_identity(os.fstat(stream.fileno())))


def _protocol_segments(cache, track_id: str, config: DownstreamConfig, train: bool) -> Tensor:
    """A track's segments under the protocol: up to ``max_train_segments`` non-silent ones, evenly spread,
    for a training track; every segment of a valid or test track."""
    from musicssl.data.views import track_segments

    if train:
        return track_segments(
            cache, track_id, hop_seconds=config.segment_seconds, segment_seconds=config.segment_seconds,
            max_segments=config.max_train_segments, silence_db=config.silence_db,
        )
    return track_segments(cache, track_id, hop_seconds=config.segment_seconds, segment_seconds=config.segment_seconds)


def _segment_stream(
    cache, track_ids: Sequence[str], is_train: np.ndarray, config: DownstreamConfig
) -> Iterator[tuple[int, Tensor]]:
    for position, track_id in enumerate(track_ids):
        yield position, _protocol_segments(cache, track_id, config, bool(is_train[position]))


def compute_embeddings(
    embed: Callable[[Tensor], Tensor],
    cache,
    track_ids: Sequence[str],
    splits: Sequence[str],
    config: DownstreamConfig,
    progress: bool = False,
    label: str = "",
) -> Embeddings:
    """Embed every track's segments with ``embed`` (a batch ``(B, n_mels, frames)`` -> ``(B, D)``).

    Segments of consecutive tracks are packed into batches of exactly ``config.batch_size`` (the last
    may be smaller), so the cost does not depend on track lengths; valid/test tracks are reduced to
    their mean as soon as their segments are embedded, so memory holds only the training segments.
    """
    embeddings, parts = _embedded_in_parts(embed, cache, track_ids, splits, config, progress, label)
    return dataclasses.replace(embeddings, segments=_joined(parts, embeddings.dim))


def _embedded_in_parts(embed, cache, track_ids, splits, config: DownstreamConfig, progress: bool = False,
                       label: str = "") -> tuple[Embeddings, list[np.ndarray]]:
    """:func:`compute_embeddings`, with the training segments' embeddings left in the parts they were computed
    in (a batch's each, in order; ``segments`` empty): written to the cache from there, they are never joined in
    memory (which held them twice)."""
    from musicssl.progress import progress_bar

    started = time.perf_counter()
    if not len(track_ids) or len(track_ids) != len(splits):
        raise DownstreamError(f"need one split per track and at least one track, got {len(track_ids)} and {len(splits)}")
    is_train = np.asarray([split == "train" for split in splits])
    n_tracks = len(track_ids)
    sums: np.ndarray | None = None
    counts = np.zeros(n_tracks, dtype=np.int64)
    train_parts: list[np.ndarray] = []
    queue: list[Tensor] = []
    queue_owners: list[np.ndarray] = []
    queued = 0

    def run(batch: Tensor, owners: np.ndarray) -> None:
        nonlocal sums
        outputs = embed(batch).detach().float().cpu().numpy()
        if sums is None:
            sums = np.zeros((n_tracks, outputs.shape[1]), dtype=np.float64)
        np.add.at(sums, owners, outputs)
        np.add.at(counts, owners, 1)
        train_rows = is_train[owners]
        if train_rows.any():
            train_parts.append(outputs[train_rows].astype(np.float32, copy=False))

    bar = progress_bar(total=n_tracks, desc=f"embed {label}".strip(), unit="track", disable=not progress,
                       mininterval=0.5)
    segment_counts = np.zeros(n_tracks, dtype=np.int64)
    try:
        for position, segments in _segment_stream(cache, track_ids, is_train, config):
            if len(segments) == 0:
                raise DownstreamError(
                    f"track {track_ids[position]!r} is shorter than one {config.segment_seconds:g} s segment"
                )
            if is_train[position]:
                segment_counts[position] = len(segments)
            queue.append(segments)
            queue_owners.append(np.full(len(segments), position, dtype=np.int64))
            queued += len(segments)
            if queued >= config.batch_size:
                batch, owners = torch.cat(queue), np.concatenate(queue_owners)
                full = (queued // config.batch_size) * config.batch_size
                for start in range(0, full, config.batch_size):
                    run(batch[start : start + config.batch_size], owners[start : start + config.batch_size])
                queue, queue_owners, queued = [batch[full:]], [owners[full:]], queued - full
            bar.update(1)
        if queued:
            run(torch.cat(queue), np.concatenate(queue_owners))
    finally:
        bar.close()
    assert sums is not None and np.array_equal(counts[is_train], segment_counts[is_train])
    means = (sums / counts[:, None]).astype(np.float32)
    embeddings = Embeddings(
        track_ids=list(track_ids),
        splits=np.asarray(splits),
        track_means=means,
        segment_counts=segment_counts,
        segments=np.zeros((0, means.shape[1]), np.float32),  # (the parts, joined or written, are the caller's)
        seconds=time.perf_counter() - started,
    )
    return embeddings, train_parts


def _joined(parts: Sequence[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if len(parts) else np.zeros((0, dim), np.float32)


def dataset_digest(track_ids: Sequence[str], splits: Sequence[str], paths: Sequence[str]) -> str:
    """Identifies the usable tracks of a dataset: ids, splits and audio paths, in order."""
    digest = hashlib.sha256()
    for track_id, split, path in zip(track_ids, splits, paths):
        digest.update(f"{track_id}\t{split}\t{path}\n".encode())
    return digest.hexdigest()[:16]


def audio_digest(cache, track_ids: Sequence[str]) -> str:
    """Identifies the audio of ``track_ids`` as the mel cache ``cache`` holds it: per track, where its
    log-mel lies (shard, offset, frames, samples) and the size and modification time of the file it was
    decoded from. The mel cache decodes a changed file (size or modification time) again into a new
    shard, so audio replaced under the same name changes the digest; an unchanged cache keeps it."""
    digest = hashlib.sha256()
    for track_id in track_ids:
        fields = (track_id, *cache.audio_record(track_id))
        digest.update(("\t".join(str(value) for value in fields) + "\n").encode())
    return digest.hexdigest()[:12]


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "dataset"


def embeddings_path(cache_dir: Path, dataset_name: str, dataset_key: str, method_key: str, front_end_key: str,
                    protocol: dict, audio_key: str, device_type: str = "cpu") -> Path:
    """The embedding cache file of a method (``method_key``) on a dataset's tracks (``dataset_key``) with
    their audio as the mel cache holds it (``audio_key``, :func:`audio_digest`), a front-end and a
    segment protocol, computed on a device of type ``device_type`` (a GPU's convolutions round otherwise:
    TF32); the probes' files are named after it."""
    protocol_key = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:10]
    on = "" if device_type == "cpu" else f"-{_safe_name(device_type)}"  # (the CPU's files as they were named before)
    return (cache_dir / f"{_safe_name(dataset_name)}-{dataset_key}"
            / f"{method_key}-{front_end_key}-{protocol_key}-audio{audio_key}{on}.npz")


def _cache_or_say(save: Callable[[], None], what: str, folder: Path) -> bool:
    """Save a cache file (True); one that cannot be written (a full disk) is said, and the evaluation goes on
    without it (False): its results do not depend on the cache."""
    try:
        save()
    except OSError as error:
        print(f"warning: {what} could not be cached in {folder} ({error.strerror or error}){cache_hint(error)}; the "
              "evaluation goes on, and a later one computes them again", file=sys.stderr, flush=True)
        return False
    return True


def save_embeddings(path: Path, embeddings: Embeddings, meta: dict,
                    segment_parts: Sequence[np.ndarray] | None = None) -> None:
    """Write atomically (:func:`musicssl.paths.whole`), so a crash never leaves a half cache file: an ``.npz``
    as ``np.savez`` writes it (every member stored uncompressed). ``segment_parts``: the training segments'
    embeddings in parts (written one after the other as ``segments``, never joined in memory) instead of
    ``embeddings.segments``. A good cache file of these tracks that another evaluation wrote at ``path``
    meanwhile is kept, the same file: its probe processes map it by its name (before, the second of two
    evaluations of one checkpoint replaced it, and the first stopped: "changed or went away")."""
    parts = [embeddings.segments] if segment_parts is None else list(segment_parts)
    dtype = np.result_type(*parts) if parts else np.dtype(np.float32)
    rows = sum(len(part) for part in parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with whole(path, keep=lambda: load_embeddings(path, embeddings.track_ids) is not None) as partial, \
            open(partial, "wb") as stream, \
            zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        def member(name: str):  # (as np.savez opens them)
            return archive.open(f"{name}.npy", "w", force_zip64=True)

        for name, value in (("track_ids", np.asarray(embeddings.track_ids, dtype=str)),
                            ("splits", np.asarray(embeddings.splits, dtype=str)),
                            ("track_means", np.asarray(embeddings.track_means)),
                            ("segment_counts", np.asarray(embeddings.segment_counts))):
            with member(name) as file:
                np.lib.format.write_array(file, value, allow_pickle=False)
        with member("segments") as file:
            np.lib.format.write_array_header_1_0(file, {
                "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": (rows, embeddings.track_means.shape[1])})
            for part in parts:  # the bytes of each part, as they are (no copy of a C-ordered part of that type)
                if len(part):
                    file.write(memoryview(np.ascontiguousarray(part, dtype=dtype).reshape(-1)).cast("B"))
        with member("meta") as file:
            np.lib.format.write_array(file, np.asarray(json.dumps(meta, sort_keys=True)), allow_pickle=False)


# What np.load raises on a cache file cut short or damaged (an empty file: EOFError; a truncated .npz:
# zipfile.BadZipFile; a damaged member: ValueError, KeyError): the file is then recomputed.
_DAMAGED_CACHE_FILE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def load_embeddings(path: Path, track_ids: Sequence[str] | None = None) -> Embeddings | None:
    """The cached embeddings at ``path``, or None when absent, unreadable or for other tracks.

    The training segments' embeddings (most of the file) are memory-mapped (copy-on-write), not read: the
    probe fits read them from the file's pages, which their processes share."""
    if not path.is_file():
        return None
    try:
        # One handle for every member, the mapped one too: the file cannot be swapped for another between them.
        with open(path, "rb") as stream, np.load(stream, allow_pickle=False) as stored:
            mapped = _npz_member(stream, "segments")
            embeddings = Embeddings(
                track_ids=stored["track_ids"].tolist(),
                splits=stored["splits"],
                track_means=stored["track_means"],
                segment_counts=stored["segment_counts"],
                segments=mapped.open(stream) if mapped is not None else stored["segments"],
                from_cache=True,
                path=path,
            )
    except _DAMAGED_CACHE_FILE:
        return None  # a damaged file is recomputed and overwritten
    shape = embeddings.segments.shape
    if (len(shape) != 2 or shape[0] != int(embeddings.segment_counts.sum()) or shape[1] != embeddings.dim
            or len(embeddings.track_means) != len(embeddings.track_ids)):
        return None  # damaged too
    if track_ids is not None and embeddings.track_ids != list(track_ids):
        return None
    return embeddings


# --------------------------------------------------------------------------------------------------
# Limited-data subsets


def subset_size(fraction: float, num_tracks: int) -> int:
    """``round(fraction * num_tracks)`` (halves up), at least 1 and at most ``num_tracks``.

    The product is rounded to 6 decimals first, so that a half stays a half: ``--fractions 0.7`` is
    0.006999999999999999 in binary, and 0.7 % of 500 tracks, 3.5, is 4, not 3."""
    return int(min(num_tracks, max(1, math.floor(round(fraction * num_tracks, 6) + 0.5))))


def subset_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An ordering of the training tracks whose prefixes are the limited-data subsets.

    First, for each tag from the rarest (fewest positives; ties by column) to the most common that no
    track picked so far carries, the first track of a seeded permutation that has it; then every other
    track in that permutation's order.
    """
    labels = np.asarray(labels).astype(bool)
    permutation = rng.permutation(len(labels))
    positives = labels.sum(axis=0)
    covered = np.zeros(labels.shape[1], dtype=bool)
    chosen: list[int] = []
    permuted_labels = labels[permutation]
    for tag in np.argsort(positives, kind="stable"):
        if positives[tag] == 0 or covered[tag]:
            continue
        track = int(permutation[np.flatnonzero(permuted_labels[:, tag])[0]])
        chosen.append(track)
        covered |= labels[track]
    picked = set(chosen)
    return np.asarray(chosen + [int(t) for t in permutation if int(t) not in picked], dtype=np.int64)


def limited_data_subsets(
    labels: np.ndarray, fractions: Sequence[float], draws: int, seed: int = 0
) -> dict[tuple[float, int], np.ndarray]:
    """``{(fraction, draw): sorted positions of the training tracks used}``.

    Subsets of one draw are nested (prefixes of :func:`subset_order`); draw ``d`` uses the random
    stream ``(seed, d)``, so the result depends only on the labels, the seed and the draw.
    """
    subsets = {}
    for draw in range(draws):
        order = subset_order(labels, np.random.default_rng([seed, draw, _SUBSET_STREAM]))
        for fraction in fractions:
            subsets[(float(fraction), draw)] = np.sort(order[: subset_size(fraction, len(order))])
    return subsets


# --------------------------------------------------------------------------------------------------
# Classifiers


@dataclass
class FittedClassifier:
    """A trained probe with its input standardisation and what early stopping saw."""

    kind: str
    model: nn.Module = field(repr=False)
    mean: Tensor = field(repr=False)
    scale: Tensor = field(repr=False)
    device: torch.device
    criterion: str  # "valid_map" or "valid_bce"
    best_valid: float
    best_step: int
    steps: int
    seconds: float

    @torch.no_grad()
    def logits(self, features: np.ndarray) -> np.ndarray:
        """Tag logits ``(N, tags)`` for features ``(N, D)``: the scores the metrics rank. They order the
        examples as the probabilities do, without the ties of a saturated sigmoid (exactly 1 above a logit
        of about 17 in float32, 37 in float64)."""
        self.model.eval()
        inputs = (torch.as_tensor(features, dtype=torch.float32, device=self.device) - self.mean) / self.scale
        return self.model(inputs).double().cpu().numpy()

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Tag probabilities ``(N, tags)`` for features ``(N, D)`` (the sigmoid of :meth:`logits`, in float64)."""
        from scipy.special import expit

        return expit(self.logits(features))


def _build_probe(kind: str, in_dim: int, n_tags: int, config: ClassifierConfig) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, n_tags)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, n_tags),
        )
    raise DownstreamError(f"unknown classifier {kind!r}; use one of {list(CLASSIFIERS)}")


def fit_classifier(
    kind: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    config: ClassifierConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FittedClassifier:
    """Train a ``linear`` or ``mlp`` probe with sigmoid + BCE and early stopping on the valid set.

    ``train_x`` rows are examples (segments), ``valid_x`` rows are what the probe is selected on
    (track means). Inputs are standardised by the training rows' mean and std (a constant feature
    keeps scale 1). Every ``max(one epoch, check_every_steps)`` optimiser steps the valid macro mAP
    over the tags with both classes in ``valid_y`` is computed on the logits (valid BCE when there is
    no such tag); the best check's weights are kept. Deterministic for a given ``seed`` on a given device.
    """
    config = config or ClassifierConfig()
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(config.cpu_threads)
    try:
        return _fit_classifier(kind, train_x, train_y, valid_x, valid_y, config, seed, device)
    finally:
        torch.set_num_threads(threads)


def _fit_classifier(kind, train_x, train_y, valid_x, valid_y, config: ClassifierConfig, seed: int,
                    device: torch.device) -> FittedClassifier:
    from musicssl.probe import macro_average_precision, scorable_tags

    started = time.perf_counter()
    train_x = np.asarray(train_x, dtype=np.float32)
    valid_x = np.asarray(valid_x, dtype=np.float32)
    train_y = np.asarray(train_y, dtype=np.float32)
    valid_y = np.asarray(valid_y, dtype=np.float32)
    if train_x.ndim != 2 or len(train_x) != len(train_y) or len(train_x) == 0:
        raise DownstreamError(f"training features {train_x.shape} and labels {train_y.shape} do not match")
    if valid_x.ndim != 2 or len(valid_x) != len(valid_y) or len(valid_x) == 0:
        raise DownstreamError(f"valid features {valid_x.shape} and labels {valid_y.shape} do not match")
    for name, values in (("training", train_x), ("valid", valid_x)):
        if not _all_finite(values):
            raise DownstreamError(f"the {name} embeddings contain NaN or inf (a diverged checkpoint?)")

    x = torch.from_numpy(train_x).to(device)
    y = torch.from_numpy(train_y).to(device)
    mean = x.mean(dim=0)
    scale = x.std(dim=0, unbiased=False)
    scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
    # Standardised a batch at a time (the same values as standardising them all first), so that no
    # standardised copy of the training rows is held.
    valid = (torch.from_numpy(valid_x).to(device) - mean) / scale
    valid_targets = torch.from_numpy(valid_y).to(device)
    valid_tags = np.flatnonzero(scorable_tags(valid_y))
    criterion = "valid_map" if len(valid_tags) else "valid_bce"

    n_rows = len(x)
    steps_per_epoch = math.ceil(n_rows / config.batch_size)
    check_every = max(steps_per_epoch, config.check_every_steps)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = _build_probe(kind, x.shape[1], y.shape[1], config).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        loss_function = nn.BCEWithLogitsLoss()
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n_rows, generator=generator)
        cursor = 0
        best_score, best_state, best_step, stale, step = -math.inf, None, 0, 0, 0
        for _ in range(config.max_checks):
            model.train()
            for _ in range(check_every):
                if cursor >= n_rows:
                    order, cursor = torch.randperm(n_rows, generator=generator), 0
                rows = order[cursor : cursor + config.batch_size].to(device)
                cursor += config.batch_size
                loss = loss_function(model((x[rows] - mean) / scale), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
            model.eval()
            with torch.no_grad():
                logits = model(valid)
            if not bool(torch.isfinite(logits).all()):  # before scoring: the metric refuses non-finite scores
                raise DownstreamError(f"the {kind} probe diverged (non-finite valid logits); lower the learning rate")
            if criterion == "valid_map":  # on the logits: a saturated sigmoid would tie the valid tracks
                ranked = logits.double().cpu().numpy()
                score = macro_average_precision(valid_y[:, valid_tags], ranked[:, valid_tags]).value
            else:
                score = -float(loss_function(logits, valid_targets))
            if not math.isfinite(score):
                raise DownstreamError(f"the {kind} probe diverged (valid score {score}); lower the learning rate")
            if score > best_score:
                best_score, best_step, stale = score, step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return FittedClassifier(
        kind=kind, model=model, mean=mean, scale=scale, device=device, criterion=criterion,
        best_valid=float(best_score if criterion == "valid_map" else -best_score), best_step=best_step, steps=step,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------------
# Metrics


@dataclass(frozen=True)
class TagScores:
    """Macro, per-tag and per-group ROC-AUC and average precision on one test set.

    ``per_tag_*`` are NaN for the ``skipped`` tags (one class only among the test tracks); group
    values are the means over the group's scored tags (NaN for a group with none).
    """

    roc_auc: float
    average_precision: float
    per_tag_roc_auc: np.ndarray
    per_tag_average_precision: np.ndarray
    per_group: dict[str, dict[str, float]]
    skipped: list[str]


def score_tags(y_true: np.ndarray, y_score: np.ndarray, tag_names: Sequence[str]) -> TagScores:
    """Scores of ``y_score`` against ``y_true`` (tracks x tags) with musicssl.probe's metrics."""
    from musicssl.data.index import tag_group
    from musicssl.probe import macro_average_precision, macro_roc_auc

    roc_auc = macro_roc_auc(y_true, y_score)
    average_precision = macro_average_precision(y_true, y_score)
    groups: dict[str, list[int]] = {}
    for position, tag in enumerate(tag_names):
        groups.setdefault(tag_group(tag), []).append(position)
    per_group = {}
    for group, positions in groups.items():
        scored = [p for p in positions if not np.isnan(roc_auc.per_tag[p])]
        per_group[group] = {
            "tags": len(positions),
            "scored_tags": len(scored),
            "roc_auc": float(np.mean(roc_auc.per_tag[scored])) if scored else math.nan,
            "average_precision": float(np.mean(average_precision.per_tag[scored])) if scored else math.nan,
        }
    return TagScores(
        roc_auc=roc_auc.value,
        average_precision=average_precision.value,
        per_tag_roc_auc=roc_auc.per_tag,
        per_tag_average_precision=average_precision.per_tag,
        per_group=per_group,
        skipped=[tag_names[p] for p in roc_auc.skipped],
    )


def _bootstrap_size_problem(fraction: float, test_tracks: int) -> str | None:
    """Why ``fraction`` of ``test_tracks`` cannot be bootstrapped (a resample needs 2 tracks), or None."""
    size = int(round(fraction * test_tracks))
    if size >= 2:
        return None
    return (f"resamples of round({fraction:g} x {test_tracks} test tracks) = {size} track(s); musicssl.probe.bootstrap "
            "needs at least 2")


def check_bootstrap(test_labels: np.ndarray, config: DownstreamConfig) -> str:
    """Check, before any probe is fitted, that the bootstrap can resample these test labels; returns
    how it will run (``"redraw"``, or ``"skip_tag"`` when rare tags make redraws hopeless, see
    :func:`_bootstrap`). Raises :class:`DownstreamError` naming ``--bootstrap-fraction`` and a value
    that works.

    Whether a resample can be scored depends on the labels only (a draw is rejected, or a tag
    skipped, when it lacks a class), and the draws on the seed and the sizes, so running
    musicssl.probe.bootstrap here on the labels with a metric that only checks them meets every
    failure the real one would, at no cost."""
    fraction, tracks = config.bootstrap_fraction, len(test_labels)
    problem = _bootstrap_size_problem(fraction, tracks)
    if problem is None:
        mode = _bootstrap_mode(test_labels, fraction, config)
        if mode is not None:
            return mode
        problem = (f"a resample of {int(round(fraction * tracks))} of the {tracks} test tracks can leave no tag with "
                   f"both positive and negative tracks (the rarest scorable tag has {_rarest_positives(test_labels)} "
                   "positive test tracks), so it cannot be scored")
    _refuse_bootstrap_fraction(problem, test_labels, config)


def _refuse_bootstrap_fraction(problem: str, test_labels: np.ndarray, config: DownstreamConfig) -> NoReturn:
    """Raise the error for a ``--bootstrap-fraction`` these test labels cannot be resampled with."""
    raise DownstreamError(f"--bootstrap-fraction {config.bootstrap_fraction:g}: {problem}; "
                          f"{_usable_fraction_hint(test_labels, config)}")


def _usable_fraction_hint(test_labels: np.ndarray, config: DownstreamConfig) -> str:
    """The smallest of a few bootstrap fractions above the given one that can resample these labels."""
    tracks = len(test_labels)
    smallest = next((f / 100 for f in range(1, 101) if _bootstrap_size_problem(f / 100, tracks) is None), None)
    candidates = sorted({f for f in (smallest, *_BOOTSTRAP_FRACTIONS) if f is not None and f > config.bootstrap_fraction
                         and _bootstrap_size_problem(f, tracks) is None})
    usable = next((f for f in candidates if _bootstrap_mode(test_labels, f, config) is not None), None)
    if usable is None:
        return "no fraction can: the bootstrap needs at least 2 test tracks and a tag with both classes among them"
    return f"--bootstrap-fraction {usable:g} works here (the study's is 0.5)"


def _rarest_positives(labels: np.ndarray) -> int:
    positives = np.asarray(labels).sum(axis=0)
    scorable = (positives > 0) & (positives < len(labels))
    return int(positives[scorable].min()) if scorable.any() else 0


def _bootstrap_mode(test_labels: np.ndarray, fraction: float, config: DownstreamConfig) -> str | None:
    """How musicssl.probe.bootstrap will run on these labels at ``fraction``, or None if it cannot."""
    from musicssl.probe import bootstrap, scorable_tags

    def labels_only(y_true: np.ndarray, y_score: np.ndarray) -> float:
        # What the built-in metrics refuse: a resample in which no tag has both classes.
        if not scorable_tags(y_true).any():
            raise ValueError("no tag has both classes in this resample")
        return 0.0

    labels = np.asarray(test_labels)
    scores = np.zeros(labels.shape, dtype=np.float64)
    arguments = dict(n_resamples=config.bootstrap_resamples, fraction=fraction, seed=config.seed)
    for mode in ("redraw", "skip_tag"):
        try:
            bootstrap(labels, scores, labels_only, on_missing_class=mode, **arguments)
            return mode
        except ValueError:
            continue
    return None


def _bootstrap(y_true: np.ndarray, y_score: np.ndarray, metric: str, config: DownstreamConfig, log):
    """The study's bootstrap; falls back to per-draw tag skipping when rare tags make redraws hopeless."""
    from musicssl.probe import bootstrap

    arguments = dict(n_resamples=config.bootstrap_resamples, fraction=config.bootstrap_fraction, seed=config.seed)
    try:
        return bootstrap(y_true, y_score, metric, **arguments), "redraw"
    except ValueError as error:
        # The arguments are valid and some tag is scorable, so the one failure left is too many
        # redraws: a tag so rare that most half-size subsets lose all its positives.
        log(f"  bootstrap ({metric}): {str(error).split(';')[0]}; each resample is scored on its own scorable tags")
        return bootstrap(y_true, y_score, metric, on_missing_class="skip_tag", **arguments), "skip_tag"


# --------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class DownstreamResult:
    """Everything one evaluation produced, as tables (one row per method x classifier x ...)."""

    results: pd.DataFrame
    per_tag: pd.DataFrame
    per_group: pd.DataFrame
    limited: pd.DataFrame
    bootstrap: pd.DataFrame
    summary: dict[str, Any]

    @functools.cached_property
    def paired(self) -> pd.DataFrame:
        """:func:`paired_differences` of the bootstrap (``paired.csv``), computed once for the files and the console."""
        return paired_differences(self.bootstrap)


class _Console:
    """Progress lines with the time since the start, to stdout."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", flush=True)


def open_index(config: DownstreamConfig):
    """The dataset's :class:`TrackIndex` (``corpus`` is built on first use in the cache; a ``--root``
    given for it must hold one already: a mistyped folder would otherwise get a new corpus, and the
    backbones be scored on data they were never meant for)."""
    from musicssl.data.loaders import DatasetError, dataset_name, open_dataset_option

    if dataset_name(config.dataset) == "corpus" and config.root is not None and str(config.root).strip():
        folder = Path(config.root).expanduser()
        if not (folder / "tracks.csv").is_file():
            what = "no corpus there (no tracks.csv)" if folder.is_dir() else "no such folder"
            raise DatasetError(
                f"--root {config.root}: {what}; give the folder that holds the corpus, leave --root out for the "
                f"corpus in the cache, or build one there first: python -m musicssl.corpus --out {config.root}")
    return open_dataset_option(config.dataset, config.root, config.audio_dir)


def _embedder(
    spec: MethodSpec, device: torch.device, config: DownstreamConfig
) -> tuple[Callable[[Tensor], Tensor], str, Callable[..., int] | None]:
    """The batch -> embedding function of a method, the key its cache files are named by, and (for
    ``random-bn``) the step that must run before it: ``calibrate(cache, train_ids)`` -> segments used."""
    if spec.kind == "melstats":
        return melstats_features, "melstats", None
    backbone = build_backbone(spec)
    key = f"{spec.kind}-{spec.preset}-{weights_digest(backbone)[:16]}"
    backbone = backbone.to(device)
    calibrate = None
    if spec.kind == "random-bn":
        # The initial weights' digest, plus what the statistics are measured on (the dataset and the
        # segment protocol are in the cache file's name already).
        key += f"-bn{config.bn_calibration_segments}x{config.batch_size}s{spec.seed}"

        def calibrate(cache, train_ids: Sequence[str]) -> int:
            segments = calibration_segments(cache, train_ids, config, spec.seed)
            calibrate_batchnorm(backbone, segments, config.batch_size, device)
            return len(segments)

    @torch.inference_mode()
    def embed(batch: Tensor) -> Tensor:
        return backbone(batch.to(device, non_blocking=True))

    return embed, key, calibrate


def run_downstream(
    methods: Sequence[MethodSpec],
    config: DownstreamConfig,
    progress: bool = True,
    index=None,
) -> DownstreamResult:
    """Evaluate ``methods`` on ``config.dataset`` with the full protocol (see the module docstring).

    ``index`` overrides the dataset (a ready :class:`TrackIndex`). A method whose embeddings cannot be
    used (NaN from a diverged checkpoint) is skipped and reported, the others go on.
    """
    from musicssl.data.cache import LogMelConfig
    from musicssl.data.index import EDITED_CORPUS_KEY, GENERATED_CORPUS_KEY
    from musicssl.data.loaders import canonical_dataset_spec, split_groups_line
    from musicssl.data.loaders import dataset_name as dataset_name_of
    from musicssl.data.pipeline import prepare_data
    from musicssl.paths import cache_root
    from musicssl.probe import scorable_tags

    log = _Console(progress)
    started = time.perf_counter()
    if not methods:
        raise DownstreamError("nothing to evaluate: give a checkpoint or keep the baselines")
    labels_seen = [spec.label for spec in methods]
    repeated = sorted({label for label in labels_seen if labels_seen.count(label) > 1})
    if repeated:
        raise DownstreamError(f"methods {repeated} appear twice; name them apart with LABEL=PATH")
    device = resolve_device(config.device)
    # Load every checkpoint first: a wrong architecture fails now, not after the dataset is prepared.
    embedders, methods = {}, list(methods)
    for number, spec in enumerate(methods):
        # A running search rewrites its best backbone (best_config.json, which names the trial, is removed first
        # and written last): the trial is the one named before and after the weights were read.
        for _ in range(5):
            before = search_trial_of(spec)
            embedders[spec.label] = _embedder(spec, device, config)
            if before == search_trial_of(spec):
                break
        methods[number] = dataclasses.replace(spec, search_trial=before)

    index = index if index is not None else open_index(config)
    dataset_name = canonical_dataset_spec(config.dataset) if dataset_name_of(config.dataset) else index.name
    # Before the mel cache is built (hours on a large dataset): what no decoded track can change.
    if not index.tag_names:
        raise DownstreamError(f"dataset {dataset_name!r} has no tags; the probes need tagged tracks")
    # The bootstrap cannot resample more test tracks than are listed.
    listed = np.flatnonzero(index.tracks["split"].to_numpy() == "test")
    problem = _bootstrap_size_problem(config.bootstrap_fraction, len(listed)) if len(listed) >= 2 else None
    if problem:
        _refuse_bootstrap_fraction(problem, index.labels()[listed], config)
    missing = index.extra.get("missing", [])
    groups = split_groups_line(index)
    log(f"dataset {dataset_name}: {len(index)} tracks, {len(index.tag_names)} tags" + (f"; {groups}" if groups else ""))
    if missing:
        log(f"  skipped {len(missing)} track(s) whose audio file is missing or empty, e.g. {missing[0]['path']}")
    listed_splits = set(index.tracks["split"])
    for name in ("train", "valid", "test"):
        if name not in listed_splits:
            raise DownstreamError(
                f"the {name} split of {dataset_name!r} has no track; the protocol needs train, valid and test: "
                "list tracks in each (a tags file's split column; without one, splits are drawn 70/10/20)"
            )

    # One mel cache per front-end (presets differ in mel bands); compare on the tracks usable in all.
    prepared = {}
    for n_mels in dict.fromkeys(spec.n_mels for spec in methods):
        prepared[n_mels] = prepare_data(index, LogMelConfig(n_mels=n_mels), workers=config.workers, verbose=progress)
    usable = [t for t in index.track_ids if all(t in data.cache for data in prepared.values())]
    undecodable = len(index) - len(usable)
    if undecodable:
        log(f"  skipped {undecodable} track(s) the mel cache could not use (see skipped.csv in the cache folder)")
    position = {track_id: row for row, track_id in enumerate(index.track_ids)}
    rows = np.asarray([position[t] for t in usable], dtype=np.int64)
    splits = index.tracks["split"].to_numpy()[rows]
    paths = np.asarray(index.paths)[rows]
    labels = index.labels()[rows]
    tag_names = list(index.tag_names)
    split_positions = {name: np.flatnonzero(splits == name) for name in ("train", "valid", "test")}
    for name, positions in split_positions.items():
        if len(positions) == 0:
            raise DownstreamError(
                f"the {name} split of {dataset_name!r} has no usable track (its files were skipped: see skipped.csv "
                "in the mel cache's folder); the protocol needs train, valid and test"
            )
    train_pos, valid_pos, test_pos = (split_positions[n] for n in ("train", "valid", "test"))
    test_labels = labels[test_pos]
    test_positive = test_labels.sum(axis=0)
    unscorable = [tag for tag, count in zip(tag_names, test_positive) if count == 0 or count == len(test_pos)]
    if len(unscorable) == len(tag_names):
        raise DownstreamError(
            f"no tag has both positive and negative tracks among the {len(test_pos)} test tracks; nothing to score"
        )
    if unscorable:
        log(f"  skipped {len(unscorable)} tag(s) with no positive (or no negative) test track: {unscorable[:8]}"
            f"{' ...' if len(unscorable) > 8 else ''}")
    # Scored like the others (the protocol scores every tag with both classes among the test tracks), but
    # no probe can learn them: they score chance whatever the embedding (_fit_probes).
    train_positive = labels[train_pos].sum(axis=0)
    unlearnable = [tag for tag, count, scored in zip(tag_names, train_positive, scorable_tags(test_labels))
                   if count == 0 and scored]
    if unlearnable:
        log(f"  warning: {len(unlearnable)} scored tag(s) have no positive training track, so no probe can learn "
            f"them: {unlearnable[:8]}{' ...' if len(unlearnable) > 8 else ''}; they count in the macro averages "
            "at chance (ROC-AUC 0.5, AP the tag's test prevalence)")
    universal = [tag for tag, count, scored in zip(tag_names, train_positive, scorable_tags(test_labels))
                 if count == len(train_pos) and scored]
    if universal:
        log(f"  warning: {len(universal)} scored tag(s) are on every training track, so no probe can learn them: "
            f"{universal[:8]}{' ...' if len(universal) > 8 else ''}; they count in the macro averages at chance "
            "(ROC-AUC 0.5, AP the tag's test prevalence)")
    log(f"  usable tracks: {len(train_pos)} train / {len(valid_pos)} valid / {len(test_pos)} test")
    check_bootstrap(test_labels, config)  # before the embeddings and the probe fits, not after them

    subsets = limited_data_subsets(labels[train_pos], config.fractions, config.draws, config.seed)
    by_size: dict[int, list[float]] = {}
    for fraction in config.fractions:
        by_size.setdefault(subset_size(fraction, len(train_pos)), []).append(fraction)
    for size, fractions in by_size.items():
        if len(fractions) > 1:  # the same subsets: their columns repeat one another
            log(f"  note: the fractions {', '.join(f'{100 * f:g} %' for f in fractions)} all train on {size} of the "
                f"{len(train_pos)} training track(s) here, the same subsets; their limited-data columns are the same")

    def probe_key(classifier: str) -> str:
        """What a probe's results depend on besides the embeddings (which name the file)."""
        digest = hashlib.sha256()
        digest.update(json.dumps({
            "format": PROBE_FORMAT, "classifier": classifier, "settings": dataclasses.asdict(config.classifier),
            "fractions": list(config.fractions), "draws": config.draws, "seed": config.seed,
            "device": device.type, "torch": torch.__version__, "tags": tag_names,
        }, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
        for name in ("train", "valid", "test"):
            digest.update(split_positions[name].astype(np.int64).tobytes())
        return digest.hexdigest()[:12]
    dataset_key = dataset_digest(usable, splits.tolist(), paths.tolist())
    embedding_root = Path(config.cache_dir) if config.cache_dir else cache_root() / "embeddings"

    # Test tracks a checkpoint trained on: a generated corpus of another generator version or size, or a
    # folder or tags file of the user's whose splits differ from this dataset's (e.g. trained on a folder of
    # audio, whose ids are its paths, evaluated with a tags file whose track_id column gives other ids, and
    # so other splits).
    corpus_of = {spec.label: training_corpus(spec) for spec in methods}
    trained_on_test: dict[str, int] = {}
    read_again: dict[tuple, tuple[set[str] | None, str]] = {}
    evaluated_named = config.dataset if dataset_name_of(config.dataset) else None
    family_here = dataset_family(config.dataset)
    evaluated_on = index.extra.get(GENERATED_CORPUS_KEY)
    edited_corpus = index.extra.get(EDITED_CORPUS_KEY)
    for spec in methods:
        trained_on = corpus_of[spec.label]
        if evaluated_on is not None and trained_on is not None:
            seen = seen_test_tracks(trained_on, evaluated_on, [usable[p] for p in test_pos])
            trained_on_test[spec.label] = len(seen)
            if seen:
                log(f"  warning: {spec.label}: {len(seen)} of the {len(test_pos)} test tracks were training tracks of "
                    f"the corpus it was trained on ({describe_corpus(trained_on)}; this one: "
                    f"{describe_corpus(evaluated_on)}), e.g. {seen[0]}: its test scores are not held out. Evaluate it "
                    "on the corpus it was trained on (--dataset FOLDER), or on one of another seed")
            continue
        if spec.kind != "checkpoint" or (trained_on is not None and family_here not in (None, "corpus")):
            continue  # a named collection of other audio than the corpus's
        recorded = training_data(spec)
        if recorded is None:
            continue
        if trained_on is not None and edited_corpus is not None:
            # A generated corpus's tracks.csv edited (tracks moved between splits), its corpus.json beside it (a copy
            # made with cp -r has its own audio files): its songs are told by track number, as the corpus check does.
            seen = seen_test_tracks(trained_on, edited_corpus, [usable[p] for p in test_pos])
        else:
            if trained_on is not None:  # the corpus, on data that is not that corpus as generated: by audio file
                how = (recorded, json.dumps(trained_on, sort_keys=True))
                if how not in read_again:
                    read_again[how] = corpus_training_audio(spec, trained_on)
            else:
                document = _run_document(spec) or {}
                how = (recorded, document.get("training_data_unlabeled"), bool(document.get("training_split_groups")))
                if how not in read_again:  # several checkpoints trained on one folder: it is read once
                    read_again[how] = trained_audio(*how, evaluated=evaluated_named)
            audio, why = read_again[how]
            if audio is None:
                if why.startswith("its "):  # data that could not be checked (not: a named dataset that needs no check)
                    log(f"  note: {spec.label}: could not check which test tracks it trained on: {why}")
                continue
            seen = [usable[p] for p in test_pos
                    if os.path.realpath(paths[p]) in audio or (family_here and f"{family_here}:{usable[p]}" in audio)]
        trained_on_test[spec.label] = len(seen)
        if seen:
            why_splits = (
                "This dataset's splits are not the generated corpus's own (a tracks.csv edited or copied with tracks "
                "moved between splits); evaluate it on the corpus as generated, or on data it did not train on"
                if trained_on is not None else
                f"{recorded[0]}'s training split and this dataset's test split share tracks (each MTG-Jamendo subset "
                "and split draws its own); evaluate it on the splits it trained on, or on data it did not train on"
                if dataset_family(recorded[0]) is not None and family_here is not None else
                "Its splits differ from this dataset's: splits are drawn from track ids (or from a tags file's "
                "split_group column, where the run read one), and ids from a track_id column differ from those of the "
                "audio paths; train on this dataset's tags file (its splits), or evaluate on data it did not train on")
            log(f"  warning: {spec.label}: {len(seen)} of the {len(test_pos)} test tracks were training tracks of the "
                f"data it was trained on ({'the generated corpus, ' + describe_corpus(trained_on) if trained_on else recorded[0]}), e.g. "
                f"{seen[0]}: its test scores are not held out. {why_splits}")

    result_rows, tag_rows, group_rows, limited_rows, bootstrap_rows = [], [], [], [], []
    method_summaries = []
    # The probe fits' processes: started by the first fit that needs them, shared by the others until
    # a method is embedded.
    processes = _probe_processes(config, device, len(subsets))
    try:
        for spec in methods:
            method_started = time.perf_counter()
            data = prepared[spec.n_mels]
            log(f"method {spec.describe()}")
            if (unfinished := _search_unfinished(spec)) is not None:
                log(f"  note: {spec.label}: its search has finished {unfinished[0]} of its {unfinished[1]} trials (it "
                    f"runs still, or was stopped): trial #{spec.search_trial} is its best so far, and may not stay so")
            embed, method_key, calibrate = embedders[spec.label]
            audio_key = audio_digest(data.cache, usable)
            path = embeddings_path(
                embedding_root, dataset_name, dataset_key, method_key, data.cache.settings.cache_key(),
                config.protocol(), audio_key,
                "cpu" if spec.kind == "melstats" else device.type,  # (melstats is computed on the CPU on any device)
            )
            embeddings = load_embeddings(path, usable) if config.use_cache else None
            if embeddings is None:
                if processes is not None:  # idle through the embedding, the processes would only hold memory
                    processes.end()
                if calibrate is not None:
                    calibrate_started = time.perf_counter()
                    used = calibrate(data.cache, [usable[p] for p in train_pos])
                    log(f"  BatchNorm statistics from {used} training segments in "
                        f"{time.perf_counter() - calibrate_started:.1f} s")
                embeddings, parts = _embedded_in_parts(embed, data.cache, usable, splits.tolist(), config, progress,
                                                       spec.label)
                mapped = None
                if config.use_cache:
                    meta = {"method": spec.describe(), "dataset": dataset_name, "protocol": config.protocol(),
                            "audio": audio_key}
                    if _cache_or_say(lambda: save_embeddings(path, embeddings, meta, parts),
                                     f"{spec.label}'s embeddings", path.parent):
                        # From the file, memory-mapped (as a cached one is), instead of held: the probe processes
                        # map the same pages instead of being sent copies.
                        mapped = load_embeddings(path, usable)
                embeddings = (dataclasses.replace(mapped, seconds=embeddings.seconds, from_cache=False)
                              if mapped is not None else dataclasses.replace(embeddings,
                                                                             segments=_joined(parts, embeddings.dim)))
                del parts
                n_segments = int(embeddings.segment_counts.sum())
                log(f"  embedded {len(usable)} tracks ({n_segments} training segments + whole valid/test tracks) in "
                    f"{embeddings.seconds:.1f} s: {len(usable) / embeddings.seconds:.1f} tracks/s on {device}")
            else:
                log(f"  embeddings from cache {path}")
            if not (_all_finite(embeddings.track_means) and _all_finite(embeddings.segments)):
                log(f"  SKIPPED {spec.label}: its embeddings contain NaN or inf (a diverged checkpoint?)")
                method_summaries.append({**_spec_summary(spec), "skipped": "embeddings contain NaN or inf"})
                continue

            fit_seconds = 0.0
            probes_cached = []
            for classifier in config.classifiers:
                probe_path = path.with_name(f"{path.stem}-probe-{classifier}-{probe_key(classifier)}.npz")
                cached = _load_probe_results(probe_path) if config.use_cache else None
                if cached is None:
                    fit_rows, main_scores = _fit_probes(
                        classifier, embeddings, labels, split_positions, subsets, config, device, processes,
                        progress=progress, label=spec.label)
                    if config.use_cache:
                        _cache_or_say(lambda: _save_probe_results(probe_path, fit_rows, main_scores),
                                      f"{spec.label}'s {classifier} probe fits", probe_path.parent)
                else:
                    fit_rows, main_scores = cached
                    probes_cached.append(classifier)
                fit_seconds += sum(row["fit_seconds"] for row in fit_rows)
                limited_rows.extend({"dataset": dataset_name, "method": spec.label, "classifier": classifier, **row}
                                    for row in fit_rows)
                main_fit = next(row for row in fit_rows if row["fraction"] == 1.0 and row["draw"] == 0)
                tag_scores = score_tags(test_labels, main_scores, tag_names)
                full = _main_results(spec, classifier, dataset_name, tag_scores, test_labels, main_scores, config, log,
                                     bootstrap_rows, main_fit)
                if spec.label in trained_on_test:
                    full["test_tracks_trained_on"] = trained_on_test[spec.label]
                result_rows.append(full)
                for p, tag in enumerate(tag_names):
                    tag_rows.append({
                        "dataset": dataset_name, "method": spec.label, "classifier": classifier, "tag": tag,
                        "group": _group(tag), "test_positives": int(test_positive[p]),
                        "train_positives": int(labels[train_pos, p].sum()),
                        "roc_auc": tag_scores.per_tag_roc_auc[p],
                        "average_precision": tag_scores.per_tag_average_precision[p],
                    })
                for group, values in tag_scores.per_group.items():
                    group_rows.append({"dataset": dataset_name, "method": spec.label, "classifier": classifier,
                                       "group": group, **values})
                how = "results from cache" if cached is not None else f"{sum(r['fit_seconds'] for r in fit_rows):.1f} s"
                log(f"  {classifier:6s}: ROC-AUC {full['roc_auc']:.4f} [{full['roc_auc_low']:.4f}, "
                    f"{full['roc_auc_high']:.4f}], mAP {full['average_precision']:.4f} "
                    f"[{full['average_precision_low']:.4f}, {full['average_precision_high']:.4f}] "
                    f"({counted(len(fit_rows), 'fit')}, {how})")
            method_summaries.append({
                **_spec_summary(spec), "embedding_key": method_key, "embedding_cache": str(path),
                "embeddings_from_cache": embeddings.from_cache, "embedding_seconds": embeddings.seconds,
                "tracks_per_second": (len(usable) / embeddings.seconds) if embeddings.seconds else None,
                "embedding_dim": embeddings.dim, "training_segments": int(embeddings.segment_counts.sum()),
                "fit_seconds": fit_seconds, "probes_from_cache": probes_cached,
                "training_corpus": corpus_of[spec.label], "test_tracks_trained_on": trained_on_test.get(spec.label),
                "seconds": time.perf_counter() - method_started,
            })
    except BaseException:
        if processes is not None:
            processes.end(now=True)
        raise
    if processes is not None:
        processes.end()

    if not result_rows:
        raise DownstreamError("every method was skipped; see the messages above")
    summary = {
        "dataset": dataset_name,
        "dataset_index_name": index.name,
        "tracks": {"train": len(train_pos), "valid": len(valid_pos), "test": len(test_pos)},
        "tags": len(tag_names),
        "tag_groups": sorted({_group(tag) for tag in tag_names}),
        "skipped_tags": unscorable,
        "tags_without_train_positive": unlearnable,
        "tags_without_train_negative": universal,
        "missing_audio": len(missing),
        "missing_audio_examples": [entry["path"] for entry in missing[:20]],
        "undecodable_tracks": undecodable,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "config": _jsonable(dataclasses.asdict(config)),
        "methods": method_summaries,
        "seconds": time.perf_counter() - started,
    }
    return DownstreamResult(
        results=pd.DataFrame(result_rows),
        per_tag=pd.DataFrame(tag_rows),
        per_group=pd.DataFrame(group_rows),
        limited=pd.DataFrame(limited_rows),
        bootstrap=pd.DataFrame(bootstrap_rows),
        summary=summary,
    )


def _group(tag: str) -> str:
    from musicssl.data.index import tag_group

    return tag_group(tag)


def _spec_summary(spec: MethodSpec) -> dict[str, Any]:
    return {
        "label": spec.label, "kind": spec.kind, "preset": spec.preset, "n_mels": spec.n_mels,
        "path": str(spec.path) if spec.path else None,
        "config_path": str(spec.config_path) if spec.config_path else None,
        "method": spec.method, "seed": spec.seed, "search_trial": spec.search_trial,
    }


def _fit_probes(
    classifier: str,
    embeddings: Embeddings,
    labels: np.ndarray,
    split_positions: dict[str, np.ndarray],
    subsets: dict[tuple[float, int], np.ndarray],
    config: DownstreamConfig,
    device: torch.device,
    processes: _ProbeProcesses | None = None,
    progress: bool = False,
    label: str = "",
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Every limited-data fit of one probe: a row per (fraction, draw), and the test scores (logits) of
    the 100 % fit of draw 0 (the headline cell, which gets the bootstrap and the per-tag scores).
    ``progress``: a progress bar of the fits (``fit LABEL CLASSIFIER``), on stderr as the embeddings' is.

    With ``processes`` (on the CPU: ``config.probe_workers`` of them, default one per CPU it may use) the fits
    run there; each is seeded on its own, so the results are those of fitting them one after the
    other here, which is what happens without."""
    from musicssl.probe import scorable_tags

    train_pos, valid_pos, test_pos = (split_positions[n] for n in ("train", "valid", "test"))
    valid_x, valid_y = embeddings.track_means[valid_pos], labels[valid_pos]
    test_x, test_labels = embeddings.track_means[test_pos], labels[test_pos]
    scored = scorable_tags(test_labels)

    mapped = embeddings.segments_file() if processes is not None else None

    def job(fraction: float, draw: int, subset: np.ndarray) -> tuple:
        chosen = train_pos[subset]
        seed = config.seed + 1000 * draw + CLASSIFIERS.index(classifier)
        # The probe process maps the cache file and takes its rows from there, while the file is the one this
        # process mapped (else, removed or replaced by another evaluation meanwhile, it is sent the rows).
        if mapped is not None and mapped.unchanged():
            training: Any = _MappedTraining(mapped, embeddings.segment_counts, chosen, labels[chosen])
        else:
            train_x, owners = embeddings.training_segments(chosen)
            training = (train_x, labels[owners])
        return (classifier, training, valid_x, valid_y, test_x, config.classifier, seed, device)

    from musicssl.progress import progress_bar

    keys = list(subsets)
    bar = progress_bar(total=len(keys), desc=" ".join(part for part in ("fit", label, classifier) if part),
                       unit="fit", disable=not progress, mininterval=0.5)
    try:
        if processes is None:
            outcomes = []
            for fraction, draw in keys:
                outcomes.append(_fit_and_predict(*job(fraction, draw, subsets[fraction, draw])))
                bar.update(1)
        else:
            outcomes = _fit_in_processes([lambda key=key: job(*key, subsets[key]) for key in keys], processes,
                                         done=lambda: bar.update(1))
    finally:
        bar.close()

    rows, main_scores = [], None
    for (fraction, draw), (scores, fitted) in zip(keys, outcomes):
        chosen = train_pos[subsets[fraction, draw]]
        # A tag that no training track of this fit carries, or that all of them carry: the probe, trained on one
        # class only, ranks the test tracks arbitrarily (ROC-AUC anywhere from 0 to 1 on a small test set, by
        # seed). It knows nothing of the tag, so it says nothing: a constant, which scores exactly chance (ROC-AUC
        # 0.5, AP the tag's prevalence). Before, a tag that every training track carried kept the probe's ranking.
        positives = labels[chosen].sum(axis=0)
        unseen = (positives == 0) | (positives == len(chosen))
        if unseen.any():
            scores = np.array(scores, copy=True)
            scores[:, unseen] = 0.0
        tag_scores = score_tags(test_labels, scores, [str(i) for i in range(labels.shape[1])])
        rows.append({
            "fraction": fraction, "draw": draw, "train_tracks": len(chosen), "train_segments": fitted["segments"],
            # scored tags that no training track of this fit carries (the probe cannot learn them)
            "tags_without_train_positive": int(((positives == 0) & scored).sum()),
            # and scored tags that every training track of this fit carries (no negative to learn from)
            "tags_without_train_negative": int(((positives == len(chosen)) & scored).sum()),
            "roc_auc": tag_scores.roc_auc, "average_precision": tag_scores.average_precision,
            "valid_score": fitted["best_valid"], "criterion": fitted["criterion"], "steps": fitted["steps"],
            "best_step": fitted["best_step"], "fit_seconds": fitted["seconds"],
        })
        if fraction == 1.0 and draw == 0:
            main_scores = scores
    assert main_scores is not None  # DownstreamConfig always includes the 100 % fraction
    return rows, main_scores


@dataclass(frozen=True)
class _MappedTraining:
    """A fit's training rows as a probe process gets them: the segments of the tracks at ``positions``,
    taken from the memory-mapped embedding cache there, and those tracks' ``labels`` (one row each)."""

    segments: MappedArray
    segment_counts: np.ndarray
    positions: np.ndarray
    labels: np.ndarray

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows and their labels: what ``Embeddings.training_segments`` and the labels give in the
        evaluation's process."""
        rows, _ = segment_rows(self.segment_counts, self.positions)
        track_of_row = np.repeat(np.arange(len(self.positions)), np.asarray(self.segment_counts)[self.positions])
        try:
            segments = self.segments.open()
        except (OSError, ValueError) as error:  # removed, replaced or cut short since the evaluation checked it
            raise DownstreamError(f"the embedding cache file {self.segments.path} changed or went away during the "
                                  f"evaluation ({getattr(error, 'strerror', None) or error}); run the evaluation "
                                  "again") from None
        return _take_rows(segments, rows), self.labels[track_of_row]


def _fit_and_predict(kind, training, valid_x, valid_y, test_x, classifier_config, seed, device):
    """One probe fit and its test scores (logits), as plain values (what a worker process sends back).
    ``training``: the rows and their labels, or a :class:`_MappedTraining` to take them from."""
    train_x, train_y = training.arrays() if isinstance(training, _MappedTraining) else training
    fitted = fit_classifier(kind, train_x, train_y, valid_x, valid_y, classifier_config, seed, device)
    # The test scores with the fit's threads too: with the process's own, they differed in the last bit between a
    # probe process and this one when the two ran other thread counts (an MLP's matrix products split otherwise).
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(classifier_config.cpu_threads)
    try:
        scores = fitted.logits(test_x)
    finally:
        torch.set_num_threads(threads)
    return scores, {
        "segments": len(train_x), "best_valid": fitted.best_valid, "criterion": fitted.criterion,
        "steps": fitted.steps, "best_step": fitted.best_step, "seconds": fitted.seconds,
    }


class _ProbeProcesses:
    """The processes that fit an evaluation's probes: spawned for the first fit that needs them and
    kept for the next ones, until the evaluation ends or :meth:`end` is called (before a method is
    embedded, so that idle processes, a few hundred MB each, do not hold memory meanwhile); a later
    fit starts them again. (Each process imports torch, which takes seconds: with a pool per method
    and probe, a small evaluation spent most of its time starting them.) The processes ignore Ctrl-C;
    :meth:`end` with ``now=True`` ends them at once, with the fits they run."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: SpawnPool | None = None

    def pool(self) -> SpawnPool:
        if self._pool is None:
            self._pool = SpawnPool(self.workers)  # spawn, not fork: fork would copy torch's thread pools
        return self._pool

    def end(self, now: bool = False) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate() if now else pool.shutdown()


def _probe_processes(config: DownstreamConfig, device: torch.device, fits: int) -> _ProbeProcesses | None:
    """Processes for ``fits`` probe fits at a time, or None to fit them in this process (one worker
    would only add its start; a GPU's fits share the one device)."""
    workers = config.probe_workers if config.probe_workers is not None else usable_cpus()
    workers = min(workers, fits) if device.type == "cpu" else 0
    return _ProbeProcesses(workers) if workers > 1 else None


def _fit_in_processes(jobs: list, processes: _ProbeProcesses, done: Callable[[], Any] | None = None) -> list:
    """Run ``_fit_and_predict(*job())`` for each job in ``processes``, in order; ``done()`` after each fit.

    At most two jobs per worker are in flight, so only a few training sets are held in memory (or
    in the pipes) at a time however many fits there are. On an error or an interrupt (Ctrl-C, which
    the processes ignore) the processes are ended at once, with the fits they were running."""
    from concurrent.futures import FIRST_COMPLETED, wait

    results: list = [None] * len(jobs)
    pending: dict = {}
    next_job = 0
    try:
        pool = processes.pool()
        while next_job < len(jobs) or pending:
            while next_job < len(jobs) and len(pending) < 2 * processes.workers:
                pending[pool.submit(_fit_and_predict, *jobs[next_job]())] = next_job
                next_job += 1
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                results[pending.pop(future)] = future.result()
                if done is not None:
                    done()
    except BaseException:
        processes.end(now=True)
        raise
    return results


def _save_probe_results(path: Path, rows: list[dict[str, Any]], main_scores: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with whole(path) as partial, open(partial, "wb") as stream:
        np.savez(stream, rows=np.asarray(json.dumps(_jsonable(rows))), main_scores=main_scores)


def _load_probe_results(path: Path) -> tuple[list[dict[str, Any]], np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return json.loads(str(stored["rows"])), stored["main_scores"]
    except _DAMAGED_CACHE_FILE:
        return None


def _main_results(spec, classifier, dataset_name, tag_scores, test_labels, scores, config, log,
                  bootstrap_rows, fit: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"dataset": dataset_name, "method": spec.label, "classifier": classifier}
    for metric in ("roc_auc", "average_precision"):
        result, rule = _bootstrap(test_labels, scores, metric, config, log)
        row[metric] = result.mean
        row[f"{metric}_low"] = result.low
        row[f"{metric}_high"] = result.high
        row[f"{metric}_std"] = result.std
        row[f"{metric}_full_test"] = full = getattr(tag_scores, metric)
        # A 95 % interval for the score on the whole test set: the resamples' spread around their mean, scaled
        # to the whole set's and moved onto it (BootstrapResult.around). The bootstrap mean's interval is the
        # study's, and for mAP it can miss the full-test score (a subset's AP reads high). None where each
        # resample scored its own tags (skip_tag): their mean is not of one quantity with the full-test score.
        row[f"{metric}_full_test_low"], row[f"{metric}_full_test_high"] = (
            result.around(full, len(test_labels)) if rule == "redraw" else (math.nan, math.nan))
        row[f"{metric}_bootstrap_rule"] = rule
        bootstrap_rows.extend(
            {"dataset": dataset_name, "method": spec.label, "classifier": classifier, "metric": metric,
             "resample": number, "value": float(value)}
            for number, value in enumerate(result.values)
        )
    row.update({
        "scored_tags": int(len(tag_scores.per_tag_roc_auc) - len(tag_scores.skipped)),
        "tags_without_train_positive": fit["tags_without_train_positive"],
        "tags_without_train_negative": fit["tags_without_train_negative"],
        "train_tracks": fit["train_tracks"], "train_segments": fit["train_segments"], "test_tracks": len(test_labels),
        "valid_score": fit["valid_score"], "criterion": fit["criterion"], "steps": fit["steps"],
    })
    return row


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------
# Output


CLASSIFIER_NAMES = {"linear": "linear", "mlp": "MLP"}


def results_markdown(results: pd.DataFrame) -> str:
    """The headline table: bootstrap mean [95 % interval] of macro ROC-AUC and mAP per method, and
    each on the whole test set [its interval: the resamples' spread moved onto it]. A ``*`` marks a
    bootstrap that scored each resample on its own scorable tags (``skip_tag``; see
    :func:`results_notes`), whose full-test score has no interval."""
    lines = [
        "| method | probe | ROC-AUC | mAP | ROC-AUC, full test | mAP, full test | train tracks | test tracks |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row in results.itertuples(index=False):
        cells = []
        for metric in ("roc_auc", "average_precision"):
            mark = "*" if getattr(row, f"{metric}_bootstrap_rule", "redraw") == "skip_tag" else ""
            cells.append(f"{getattr(row, metric):.4f}{mark} [{getattr(row, f'{metric}_low'):.4f}, "
                         f"{getattr(row, f'{metric}_high'):.4f}]")
        for metric in ("roc_auc", "average_precision"):
            low, high = (getattr(row, f"{metric}_full_test_{end}", math.nan) for end in ("low", "high"))
            cells.append(f"{getattr(row, f'{metric}_full_test'):.4f}"
                         + (f" [{low:.4f}, {high:.4f}]" if math.isfinite(low) and math.isfinite(high) else ""))
        lines.append(
            f"| {_markdown_cell(row.method)} | {CLASSIFIER_NAMES.get(row.classifier, row.classifier)} | "
            + " | ".join(cells) + f" | {row.train_tracks} | {row.test_tracks} |"
        )
    return "\n".join(lines)


def results_notes(results: pd.DataFrame, bootstrap_fraction: float = 0.5) -> str:
    """How to read :func:`results_markdown`'s table (its bootstrap drew ``bootstrap_fraction`` of the test tracks)."""
    if bootstrap_fraction >= 1.0:  # every resample is the whole test set: no interval, no subset effect
        notes = [
            "Bootstrap mean [95 % interval] over resamples of all the test tracks (--bootstrap-fraction 1, drawn "
            "without replacement: each is the whole test set, so the interval has no width; the study's protocol "
            "resamples half), and the score on the whole test set; probes trained on all training tracks."
        ]
    else:
        share = "half" if bootstrap_fraction == 0.5 else f"{100 * bootstrap_fraction:g} % of"
        protocol = " (the study's protocol)" if bootstrap_fraction == 0.5 else " (the study's protocol resamples half)"
        notes = [
            f"Bootstrap mean [95 % interval] over resamples of {share} the test tracks{protocol}, and the "
            "score on the whole test set [95 % interval: the resamples' 2.5th and 97.5th percentiles less their "
            "mean, scaled to the whole set's spread and added to it]; probes trained on all training tracks. Average precision measured on a "
            "subset reads higher than on the whole set (fewer negatives can outrank each positive), so the mAP "
            "bootstrap mean tends to sit above the full-test mAP, most on small test sets, and its interval can "
            "leave the full-test mAP out: it is the study's figure, for comparing methods within a column; the "
            "full-test score's interval is the one to give with the full-test score."
        ]
    skipped = [f"{row.method} ({CLASSIFIER_NAMES.get(row.classifier, row.classifier)})"
               for row in results.itertuples(index=False)
               if "skip_tag" in (getattr(row, "roc_auc_bootstrap_rule", "redraw"),
                                 getattr(row, "average_precision_bootstrap_rule", "redraw"))]
    if skipped:
        notes.append(
            "* Some tags have so few positive test tracks that most resamples lose them all: each resample was "
            "scored on the tags it could score, so its mean averages different, easier subsets of tags and can "
            f"read far above the full-test value ({', '.join(skipped)}). Read the full-test columns, or evaluate "
            "on a larger test set.")
    unlearnable = max((getattr(row, "tags_without_train_positive", 0) for row in results.itertuples(index=False)),
                      default=0)
    if unlearnable:
        notes.append(
            f"{unlearnable} of the scored tags have no positive training track: no probe can learn them, and they "
            "count in every macro average at chance, ROC-AUC 0.5 and AP their test prevalence (per_tag.csv: "
            "train_positives 0).")
    universal = max((getattr(row, "tags_without_train_negative", 0) for row in results.itertuples(index=False)),
                    default=0)
    if universal:
        notes.append(
            f"{universal} of the scored tags are on every training track: no probe can learn them either, and they "
            "count at chance too (per_tag.csv: train_positives equal to the training tracks).")
    trained_on = [f"{row.method}: {int(row.test_tracks_trained_on)}" for row in results.itertuples(index=False)
                  if getattr(row, "test_tracks_trained_on", 0) > 0]
    if trained_on:
        notes.append(
            f"NOT HELD OUT: some test tracks were training tracks of the checkpoint ({', '.join(dict.fromkeys(trained_on))} "
            "tracks): it was trained on these tracks split otherwise, a generated corpus of the same seed but another "
            "size or generator version (or a copy of its tracks.csv with tracks moved between splits), another "
            "MTG-Jamendo subset or split, or a folder or tags file whose tracks "
            "drew other splits (the warnings above say which). Its scores are not comparable with the others'; "
            "evaluate it on the corpus or the splits it was trained on, or train it on the tags file this evaluation "
            "reads.")
    return "\n\n".join(notes)


def limited_markdown(limited: pd.DataFrame, metric: str = "average_precision") -> str:
    """Limited-data table: mean +- std over the draws of ``metric`` per training fraction."""
    fractions = sorted(limited["fraction"].unique())
    name = {"average_precision": "mAP", "roc_auc": "ROC-AUC"}[metric]
    header = "| method | probe | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |"
    lines = [f"{name} on the whole test set by fraction of training tracks (mean ± std over draws). At 100 % the "
             "draws differ only by the probe's seed: their mean, which differs from the table above's full-test "
             "score (the first draw's) by that seed's effect, and is not its bootstrap mean either.", "", header,
             "|---|---|" + "---:|" * len(fractions)]
    grouped = limited.groupby(["method", "classifier"], sort=False)
    for (method, classifier), frame in grouped:
        cells = []
        for fraction in fractions:
            values = frame.loc[frame["fraction"] == fraction, metric]
            # one draw has no spread to show (a "± 0.0000" would claim one)
            cells.append(f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values.mean():.4f}")
        lines.append(f"| {_markdown_cell(method)} | {CLASSIFIER_NAMES.get(classifier, classifier)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(bootstrap: pd.DataFrame) -> pd.DataFrame:
    """Every two methods evaluated with the same probe, per metric, compared over the resamples of the
    test tracks they share (the bootstrap draws the same tracks for every method: a paired comparison,
    which separates methods whose own intervals overlap).

    ``bootstrap`` is :class:`DownstreamResult`'s (``bootstrap.csv``). One row per pair, ``method`` the
    one with the higher bootstrap mean (the first listed on a tie): ``difference`` is the mean over the
    resamples of its value less ``other``'s (the difference of the two bootstrap means), ``low`` and
    ``high`` the 2.5th and 97.5th percentiles of those differences, ``higher_in`` the resamples in which
    ``method`` scores above ``other`` and ``resamples`` their number. An interval that holds 0 means
    this test set does not tell the two apart."""
    columns = ["dataset", "classifier", "metric", "method", "other", "difference", "low", "high", "higher_in",
               "resamples"]
    rows = []
    if bootstrap.empty:
        return pd.DataFrame(columns=columns)
    for (dataset, classifier, metric), frame in bootstrap.groupby(["dataset", "classifier", "metric"], sort=False):
        values = frame.pivot(index="resample", columns="method", values="value")
        methods = list(dict.fromkeys(frame["method"]))  # as evaluated
        means = values.mean()
        ranked = sorted(methods, key=lambda method: -means[method])  # stable: ties keep their order
        for first, method in enumerate(ranked):
            for other in ranked[first + 1:]:
                difference = (values[method] - values[other]).to_numpy()
                low, high = np.percentile(difference, [2.5, 97.5])
                rows.append({"dataset": dataset, "classifier": classifier, "metric": metric, "method": method,
                             "other": other, "difference": float(difference.mean()), "low": float(low),
                             "high": float(high), "higher_in": int((difference > 0).sum()),
                             "resamples": len(difference)})
    return pd.DataFrame(rows, columns=columns)


def paired_markdown(paired: pd.DataFrame, results: pd.DataFrame) -> str:
    """Each method against the best of its probe in each metric, from :func:`paired_differences`: the
    best's lead [95 % interval] and the resamples in which it leads. '' when no probe has two methods."""
    if paired.empty:
        return ""
    metrics = ("roc_auc", "average_precision")
    # The best of a probe and metric: the first of its pairs (paired_differences ranks them, the higher first).
    best = {key: pairs["method"].iloc[0] for key, pairs in paired.groupby(["classifier", "metric"], sort=False)}
    lead = {(row.classifier, row.metric, row.other): row for row in paired.itertuples(index=False)
            if row.method == best[row.classifier, row.metric]}
    resamples = int(paired["resamples"].max())
    lines = [
        f"Paired over the same {resamples} resamples of the test tracks: each method against the best of its probe "
        "in each metric (by bootstrap mean), the best's lead (its score less the method's: mean [2.5th, 97.5th "
        "percentile] over the resamples) and the resamples in which it leads. A lead whose interval holds 0 is not "
        "resolved by this test set. paired.csv compares every two methods of a probe.", "",
        "| method | probe | ROC-AUC: the best's lead | leads in | mAP: the best's lead | leads in |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in results.itertuples(index=False):
        if (row.classifier, "roc_auc") not in best:  # the probe's only method
            continue
        cells = []
        for metric in metrics:
            if best[row.classifier, metric] == row.method:
                cells += ["best", ""]
                continue
            pair = lead[row.classifier, metric, row.method]
            cells += [f"{pair.difference:.4f} [{pair.low:.4f}, {pair.high:.4f}]",
                      f"{pair.higher_in} of {pair.resamples}"]
        lines.append(f"| {_markdown_cell(row.method)} | {CLASSIFIER_NAMES.get(row.classifier, row.classifier)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def result_tables(result: "DownstreamResult") -> list[str]:
    """The Markdown of ``results.md`` and of the console, block by block: the headline table, its notes,
    the paired comparison (where a probe has two methods) and the limited-data table."""
    config = result.summary["config"]
    blocks = [results_markdown(result.results), results_notes(result.results, config["bootstrap_fraction"]),
              paired_markdown(result.paired, result.results), limited_markdown(result.limited)]
    return [block for block in blocks if block]


def _markdown_cell(text: str) -> str:
    """``text`` as a Markdown table cell: a ``|`` in a method's label would end the cell."""
    return str(text).replace("|", "\\|")


OUTPUT_FILES = {
    "results_csv": "results.csv",
    "results_md": "results.md",
    "per_tag": "per_tag.csv",
    "per_group": "per_group.csv",
    "limited_data": "limited_data.csv",
    "bootstrap": "bootstrap.csv",
    "paired": "paired.csv",
    "report": "report.html",
    "summary": "summary.json",
}


def write_outputs(result: DownstreamResult, out_dir: Path) -> dict[str, Path]:
    """Write the tables (CSV + markdown), the HTML figures and ``summary.json`` into ``out_dir``."""
    from analysis.figures import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {key: out_dir / name for key, name in OUTPUT_FILES.items()}
    result.results.to_csv(files["results_csv"], index=False)
    result.per_tag.to_csv(files["per_tag"], index=False)
    result.per_group.to_csv(files["per_group"], index=False)
    result.limited.to_csv(files["limited_data"], index=False)
    result.bootstrap.to_csv(files["bootstrap"], index=False)
    result.paired.to_csv(files["paired"], index=False)
    tables = result_tables(result)
    files["results_md"].write_text(f"# Downstream evaluation on {result.summary['dataset']}\n\n"
                                   + "\n\n".join(tables) + "\n")
    write_report(files["report"], result.results, result.bootstrap, result.limited, result.per_group,
                 title=f"Downstream evaluation: {result.summary['dataset']}", tables_markdown=tables)
    files["summary"].write_text(json.dumps(_jsonable(result.summary), indent=2, default=str))
    return files


# --------------------------------------------------------------------------------------------------
# Command line


def _percentages(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages like 1,5,10,100, got {text!r}") from None
    if not values or any(not 0 < value <= 100 for value in values):
        raise argparse.ArgumentTypeError(f"percentages must be in (0, 100], got {text!r}")
    return tuple(value / 100.0 for value in values)


def _classifier_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not names or any(name not in CLASSIFIERS for name in names):
        raise argparse.ArgumentTypeError(f"classifiers are {','.join(CLASSIFIERS)} (comma-separated), got {text!r}")
    return names


_positive_int = int_in(1)


def _cache_dir_problem(text: str) -> str | None:
    """Why ``--cache-dir`` cannot hold the embedding cache, or None (then it exists: it is made if missing)."""
    if not text.strip():
        return "empty; give a folder, or leave the flag out for $MUSICSSL_CACHE/embeddings"
    path = Path(text).expanduser().absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as error:  # e.g. a folder above it that cannot be read
        return f"cannot look there ({error.strerror or error}); give a folder you can write in"
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        return f"not a folder{where}; give a folder (it is made if missing)"
    try:
        make_writable_folder(path)
    except OSError as error:
        return f"cannot make it or write in it ({error.strerror or error}); give a folder you can write in"
    return None


def _share(text: str) -> float:
    """An argparse type: a share of the test tracks, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:  # NaN included
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], e.g. 0.5, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = DownstreamConfig()
    parser = ArgumentParser(
        prog="python -m analysis.downstream",
        description="Evaluate frozen backbones with the study's downstream protocol: linear and MLP probes on "
        "segment embeddings, bootstrap intervals, limited-data curves and the random-backbone / mel-statistics "
        "baselines.",
    )
    parser.add_argument(
        "methods", nargs="*", metavar="RUN_DIR_OR_CHECKPOINT",
        help="training run folder (config.json + backbone.pt), search folder (best_config.json + best_backbone.pt), "
        ".pt state_dict, or a baseline: random, random-bn (random weights, BatchNorm statistics from the "
        "training data), melstats; LABEL=PATH names it. With none, the baselines alone are evaluated",
    )
    parser.add_argument("--dataset", default=None,
                        help="corpus, mtat, jamendo-top50, jamendo-instrument, jamendo-mood, jamendo-genre "
                        "(MTG-Jamendo's split 0; jamendo-top50-split3 and the like: its others), msd, or a "
                        "folder with a tags file / tracks.csv (default: the data the run folders given were trained "
                        "on, with their --root and --audio-dir; else corpus)")
    parser.add_argument("--root", default=None, help="the dataset's folder (mtat, jamendo-*, msd; corpus: the folder that holds it, "
                        "default the cache's corpus, built on first use); without --dataset, in place of the runs' own")
    parser.add_argument("--audio-dir", default=None, help="audio folder when it is not under --root (mtat, jamendo, "
                        "msd); without --dataset, in place of the runs' own")
    parser.add_argument("--preset", default=None,
                        help="backbone preset of bare .pt checkpoints and of the baselines (default: cpu; the "
                        "baselines follow the first checkpoint); run folders always use the preset in their config")
    parser.add_argument("--no-baselines", action="store_true", help="do not add the random, random-bn and melstats baselines")
    parser.add_argument("--classifiers", type=_classifier_list, default=defaults.classifiers,
                        help="probes, comma-separated (default: linear,mlp)")
    parser.add_argument("--fractions", type=_percentages, default=defaults.fractions,
                        help="percent of training tracks for the limited-data curves (default: 1,5,10,20,25,100; "
                        "100 is always added)")
    parser.add_argument("--draws", type=_positive_int, default=defaults.draws,
                        help="random draws per fraction (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int_in(2), default=defaults.bootstrap_resamples,
                        help="bootstrap resamples of the test tracks (at least 2; default: %(default)s); one that "
                        "leaves a scored tag without a positive or a negative track is drawn again")
    parser.add_argument("--bootstrap-fraction", type=_share, default=defaults.bootstrap_fraction,
                        help="share of the test tracks per resample, in (0, 1]; a resample needs at least 2 tracks "
                        "(default: %(default)s)")
    parser.add_argument("--max-train-segments", type=_positive_int, default=defaults.max_train_segments,
                        help="4 s segments per training track (default: %(default)s)")
    parser.add_argument("--silence-db", type=float, default=defaults.silence_db,
                        help="a training segment is silent, and left out, when its loudest bin is this many dB below "
                        "the track's (default: %(default)s; 0 keeps every segment; must be >= 0)")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=defaults.seed,
                        help=f"seed of subsets, probes, bootstrap, random baselines (0-{MAX_SEED}; default: %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="auto (GPU if present), cpu or cuda[:N]")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: one per CPU it may use)")
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                        help="segments per embedding batch; also the batches the random-bn baseline averages its "
                             "BatchNorm statistics over, so it changes that baseline's scores (default: %(default)s)")
    parser.add_argument("--bn-segments", type=int_in(2), default=defaults.bn_calibration_segments,
                        help="training segments the random-bn baseline measures its BatchNorm statistics on "
                        "(at least 2; default: %(default)s)")
    parser.add_argument("--workers", type=int_in(0), default=None, help="mel-cache decoding processes (default: one per CPU it may use; "
                        "0: in this process)")
    parser.add_argument("--probe-workers", type=int_in(0), default=None, help="processes fitting the probes side by side "
                        "on the CPU (default: one per CPU it may use; 0: in this process); results do not depend on it")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: $MUSICSSL_CACHE/embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the embeddings and do not store them")
    parser.add_argument("--out", default=None, help="output folder, made if missing (default: "
                        "runs/downstream/<dataset>-<time>)")
    parser.add_argument("--quiet", action="store_true", help="no progress output, only the final table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exits 2 with a one-line error on bad input (no traceback)."""
    parser = build_parser()
    arguments = sys.argv[1:] if argv is None else list(argv)
    # METHODs before, between or after the options; after "--" (a path named like an option), as they come
    args = parse_mixed(parser, arguments, "methods")
    if args.out is not None and not args.out.strip():  # an unset shell variable: not the default folder
        parser.error("--out is empty; give the output folder, or leave --out out for runs/downstream/<dataset>-<time>")
    if not args.methods and args.no_baselines:
        parser.error("nothing to evaluate: give a checkpoint or run folder, or drop --no-baselines")
    if args.no_cache and args.cache_dir:
        parser.error("--no-cache and --cache-dir contradict each other (--no-cache neither reads nor writes a "
                     "cache): give one of them")
    if not (math.isfinite(args.silence_db) and args.silence_db >= 0):
        parser.error(f"--silence-db must be a number of dB >= 0 (0 keeps every segment), got {args.silence_db}")
    if args.cache_dir is not None and (problem := _cache_dir_problem(args.cache_dir)):
        parser.error(f"--cache-dir {args.cache_dir!r}: {problem}")  # now, not after the embeddings are computed
    try:
        methods = _methods_from_args(args)
        # A --root or --audio-dir given here is read from here (a relative one included), whatever a run recorded.
        root, audio_dir = (value if value is None or not value.strip() else str(Path(value).expanduser().absolute())
                           for value in (args.root, args.audio_dir))  # (an empty one is refused as before)
        dataset = args.dataset
        trained_on = dataset_of_runs(methods) if dataset is None else None
        if trained_on is not None:
            recorded, labels = trained_on
            dataset = recorded[0]
            root = root if root is not None else recorded[1]
            audio_dir = audio_dir if audio_dir is not None else recorded[2]
            check_recorded_paths((dataset, root, audio_dir), labels[0])
            if recorded != ("corpus", None, None):  # (the default corpus: what it was before, nothing to say)
                print(f"{parser.prog}: note: evaluating on {_data_text((dataset, root, audio_dir))}, the data "
                      f"{listed(labels)} {'was' if len(labels) == 1 else 'were'} trained on (--dataset "
                      "evaluates on other data)", file=sys.stderr)
        dataset = "corpus" if dataset is None else dataset
        config = DownstreamConfig(
            dataset=dataset, root=root, audio_dir=audio_dir, classifiers=args.classifiers,
            fractions=args.fractions, draws=args.draws, bootstrap_resamples=args.bootstrap,
            bootstrap_fraction=args.bootstrap_fraction, max_train_segments=args.max_train_segments,
            silence_db=args.silence_db if args.silence_db > 0 else None, seed=args.seed,
            device=args.device, batch_size=args.batch_size, workers=args.workers,
            probe_workers=args.probe_workers, bn_calibration_segments=args.bn_segments, cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
        )
    except DownstreamError as error:
        parser.error(str(error))
    note = mixed_front_end_note(methods)
    if note:
        print(f"{parser.prog}: note: {note}", file=sys.stderr)
    # Every CPU it may use by default: embedding extraction is the heavy part and it is one big batched forward.
    torch.set_num_threads(args.threads or usable_cpus())
    out_dir = Path(args.out) if args.out else (
        Path("runs") / "downstream" / f"{_safe_name(Path(dataset).name or dataset)}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    try:  # now, not after the whole evaluation; locked until the results are written: two never share a folder
        claim = claim_folder(out_dir, _out_dir_problem, numbered=not args.out)
    except FolderTaken as taken:
        parser.error(f"--out {out_dir}: {taken}")
    except OSError as error:
        parser.error(f"--out {out_dir}: cannot write there ({error.strerror or error}); give a folder you can write in")
    out_dir = claim.path  # the default name with a suffix, if an evaluation started in the same second holds it
    try:  # the claim's lock goes with any ending, an unexpected error's too
        written = False
        try:
            with sigterm_interrupts():
                result = run_downstream(methods, config, progress=not args.quiet)
                with held_signals():  # all of the results or none: a Ctrl-C or SIGTERM here takes effect once written
                    files = write_outputs(result, out_dir)
                    written = True
        except (*_input_errors(), OSError) as error:
            claim.release(remove_if_unused=True)  # the results folder made above
            hint = cache_hint(error) if isinstance(error, OSError) else ""  # e.g. a MUSICSSL_CACHE that is a file
            print(f"{parser.prog}: error: {error}{hint}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: one line, no traceback; what is finished stays cached
            claim.release(remove_if_unused=True)
            if written:
                print(f"\n{parser.prog}: interrupted as the results were written; they are complete in {out_dir}",
                      file=sys.stderr)
            else:
                kept = ("; each method's embeddings and each probe's fits once all are done are cached, so running the "
                        "command again continues from what was finished" if config.use_cache else "")
                print(f"\n{parser.prog}: interrupted, no results written{kept}", file=sys.stderr)
            return exit_code(stop)  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
        for block in result_tables(result):
            print()
            print(block)
    finally:
        claim.release(remove_if_unused=True)  # also an unexpected error's empty folder
    print(f"\nwrote {out_dir} (report: {files['report']}) in {result.summary['seconds']:.1f} s")
    return 0


def _out_dir_problem(out_dir: Path) -> str | None:
    """Why the results cannot go to folder ``out_dir`` (a file there or above it, or the folder of a
    training run or a search, whose files the results would replace), or None."""
    run = (out_dir / "backbone.pt").is_file() or ((out_dir / "config.json").is_file() and (out_dir / "metrics.csv").is_file())
    if run or (out_dir / "search.json").is_file():  # a run that kept no backbone.pt still has its config and metrics
        kind = "a search" if (out_dir / "search.json").is_file() else "a training run"
        return f"is the folder of {kind}, whose summary.json the results would replace; give another folder"
    earlier = [name for name in OUTPUT_FILES.values() if (out_dir / name).exists()]
    if earlier:
        return (f"holds an earlier evaluation ({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}), "
                "which the results would replace; give another folder")
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                return ("is a file; give a folder for the results" if path == out_dir
                        else f"{path} is a file, so the folder cannot be made there")
            if not os.access(path, os.W_OK | os.X_OK):
                return f"{path} is not writable"
            return None
    return None


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (reported in one line, exit 2); anything else is a bug and keeps its traceback."""
    from musicssl.corpus import CorpusError
    from musicssl.data.cache import MelCacheError
    from musicssl.data.index import TrackIndexError
    from musicssl.data.loaders import DatasetError

    return (DownstreamError, DatasetError, TrackIndexError, CorpusError, MelCacheError)


def _is_baseline(argument: str) -> bool:
    return argument.split("=", 1)[-1].strip() in BASELINES and not Path(argument).exists()


def _methods_from_args(args: argparse.Namespace) -> list[MethodSpec]:
    preset_given = args.preset is not None
    if preset_given:  # refused whatever uses it (before: only where a bare .pt or a baseline did)
        _preset_mels(args.preset)
    checkpoints = {argument: resolve_method(argument, args.preset or "cpu", preset_given, args.seed)
                   for argument in args.methods if not _is_baseline(argument)}
    # Baselines use the architecture and front-end of the compared checkpoints (the first one's),
    # unless --preset says otherwise.
    baseline_preset = args.preset or next((m.preset for m in checkpoints.values()), None) or "cpu"
    methods = [checkpoints[argument] if argument in checkpoints
               else resolve_method(argument, baseline_preset, True, args.seed) for argument in args.methods]
    if not args.no_baselines:
        present = {m.kind for m in methods}
        labels = {m.label for m in methods}
        for baseline in BASELINES:
            if baseline not in present and baseline not in labels:
                methods.append(resolve_method(baseline, baseline_preset, True, args.seed))
    return methods


def mixed_front_end_note(methods: Sequence[MethodSpec]) -> str | None:
    """A note when the evaluated methods differ in backbone preset or mel bands (e.g. ``--preset paper``
    with a run folder of the CPU preset: the folder keeps its own, the baselines take the flag's)."""
    presets = {m.preset for m in methods if m.kind != "melstats"}
    if len(presets) <= 1 and len({m.n_mels for m in methods}) <= 1:
        return None
    listed = ", ".join(f"{m.label}: {m.preset + ', ' if m.kind != 'melstats' else ''}{m.n_mels} mels" for m in methods)
    return (f"the methods differ in backbone preset or mel bands ({listed}), so their scores also compare "
            "architectures and front-ends; run folders keep the preset of their config, --preset sets that of "
            "bare checkpoints and of the baselines")


if __name__ == "__main__":
    sys.exit(main())
