"""The settings of one search, saved as ``search.json`` in its folder so that a resume repeats them."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musicssl.corpus.splits import VERSION_1_DEFAULT_CORPUS, corpus_identity
from musicssl.paths import write_whole

__all__ = [
    "COLLAPSE_TYPES",
    "COLLAPSE_TYPES_VERSION",
    "COLLAPSE_TYPES_VERSIONS",
    "collapse_thresholds",
    "collapse_types",
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULERS",
    "DEFAULT_STOP_ON",
    "SEARCH_FILE",
    "SearchSettings",
    "STOP_ON_BEFORE_SETTING",
    "SettingsError",
    "TrialSettings",
]

SEARCH_FILE = "search.json"
# The settings every search.json holds, from the first (2026-11-30): one without them was not written by a search.
# Those added since (sampler, stop_on, root, corpus, ...) take, when missing, the value that older searches ran with.
FIRST_SETTINGS = frozenset({
    "method", "trials", "name", "storage_dir", "objective", "scheduler", "max_epochs", "steps_per_epoch", "batch_size",
    "probe_segments", "probe_segments_per_track", "preset", "data", "seed", "concurrency", "cpus_per_trial",
    "gpus_per_trial", "collapse_stop", "grace_epochs", "patience_epochs", "thresholds", "asha_grace_epochs",
    "asha_reduction_factor", "reuse_actors", "points_to_evaluate",
})
# A search folder's name: file systems allow 255 bytes, and Ray Tune derives longer names from it.
MAX_NAME_BYTES = 150


def flag_text(flag: str, value: str) -> str:
    """``--flag value`` as a shell takes it; ``--flag=value`` for a value that starts with ``-`` (which
    argparse would read as a flag: ``--name -x`` fails, ``--name=-x`` works)."""
    return f"{flag}={shlex.quote(value)}" if value.startswith("-") else f"{flag} {shlex.quote(value)}"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a search's folder (``--name``), or None."""
    if not name.strip():
        return f"--name must not be empty or blank, got {name!r} (leave --name out for <method>-<time>)"
    if Path(name).name != name or name in (".", ".."):
        return f"--name must be a plain folder name (no '/'), got {name!r}"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"--name must be at most {MAX_NAME_BYTES} bytes (a folder name; Ray adds to it), got {len(name.encode())}"
    return None
# What a trial can be scored by; every one is maximised.
OBJECTIVES = ("probe_map", "probe_auc", "rankme")
SCHEDULERS = ("asha", "none")
# Optuna samplers a search can draw its trials with (hpsearch.searcher.make_sampler): TPE learns from
# the finished trials (and from collapse, an infeasible outcome); random draws every trial
# independently, so two searches with the same seed draw the same settings whatever happens to them.
SAMPLERS = ("tpe", "random")
# Ray's smallest fractional share of a resource (its resource quantities have 4 decimal places).
RAY_SMALLEST_SHARE = 1e-4
# The collapse verdicts a stopping rule can act on ("diverged" always stops), and those it acts on
# by default: "dimensional" and "partial" are recorded, not acted on (see hpsearch.stopping).
COLLAPSE_TYPES = ("complete", "dimensional", "cluster", "partial")
DEFAULT_STOP_ON = ("complete", "cluster")
# The verdicts a search's rule can judge by, and the newest (musicssl.collapse.VERDICT_VERSIONS, which
# says what each changed; written out, not imported, so that this module does not import torch; a test
# checks they agree). A search keeps the version it was stored with (1 where its search.json has no
# collapse_types_version).
COLLAPSE_TYPES_VERSIONS = (1, 2, 3)
COLLAPSE_TYPES_VERSION = COLLAPSE_TYPES_VERSIONS[-1]
COLLAPSE_TYPES_BEFORE_PARTIAL = ("complete", "dimensional", "cluster")
# What a search stored before it had ``stop_on`` stopped on: a resumed old search keeps its rule.
STOP_ON_BEFORE_SETTING = COLLAPSE_TYPES_BEFORE_PARTIAL


def collapse_types(version: int = COLLAPSE_TYPES_VERSION) -> tuple[str, ...]:
    """The collapse types a stopping rule judging by the verdict's ``version`` can act on."""
    return COLLAPSE_TYPES_BEFORE_PARTIAL if version == 1 else COLLAPSE_TYPES


class SettingsError(ValueError):
    """A search setting is out of range or contradicts the stored search; the message says which."""


def collapse_thresholds(overrides: dict[str, Any]):
    """:class:`musicssl.collapse.CollapseThresholds` with ``overrides`` (``--threshold`` NAME: value) over
    the defaults. SettingsError names an unknown name; CollapseThresholds' ValueError a value out of range."""
    from musicssl.collapse import CollapseThresholds

    known = {f.name for f in dataclasses.fields(CollapseThresholds)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SettingsError(f"unknown collapse threshold(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return CollapseThresholds(**overrides)


def _version_1_corpus_of(root: str | None) -> dict[str, Any] | None:
    """The corpus a search on `corpus` started before 2026-12-05 trained on: version 1's default one, or
    the one in ``root`` (``--root``) while that folder still holds a version-1 corpus; where it holds
    another by now, or nothing, only its version is known. None for a corpus written by hand (a
    ``tracks.csv`` without ``corpus.json``), which no version built."""
    if root is None:
        return dict(VERSION_1_DEFAULT_CORPUS)
    folder = Path(root).expanduser()
    identity = corpus_identity(folder)
    if identity is not None and identity["generator_version"] == 1:
        return identity
    if identity is None and (folder / "tracks.csv").is_file():  # a corpus written by hand: no version to keep
        return None
    return {"generator_version": 1, "seed": None, "tracks": None, "seconds": None}


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a search shares: the trainer settings the space does not sample, and the
    collapse-stopping rule. Handed to the trainable with the prepared data."""

    method: str
    preset: str = "cpu"
    data: str = "corpus"
    objective: str = "probe_map"
    max_epochs: int = 6
    steps_per_epoch: int = 15
    batch_size: int = 32
    probe_segments: int = 256
    probe_segments_per_track: int = 2
    probe_every_epoch: bool = False
    seed: int = 0
    num_threads: int = 1
    accelerator: str = "cpu"
    collapse_stop: bool = True
    grace_epochs: int = 1
    patience_epochs: int = 2
    thresholds: dict[str, Any] = field(default_factory=dict)
    # The collapse types that stop a trial; "diverged" always does.
    stop_on: tuple[str, ...] = DEFAULT_STOP_ON
    # The verdict the rule judges by (an earlier one for a search started before it).
    collapse_types_version: int = COLLAPSE_TYPES_VERSION
    # Where a complete trial stages its checkpoint: the folder whose disk the search watches
    # (hpsearch.room.trial_temp_dir), or None for the trial's own temporary folder (on a cluster's nodes).
    staging_dir: str | None = None

    def collapse_rule(self):
        """The :class:`hpsearch.stopping.CollapseStopRule` every trial of the search applies."""
        from hpsearch.stopping import CollapseStopRule
        from musicssl.collapse import CollapseThresholds

        return CollapseStopRule(self.grace_epochs, self.patience_epochs, CollapseThresholds(**self.thresholds),
                                self.stop_on, self.collapse_types_version)


_TRIAL = TrialSettings(method="")


@dataclass
class SearchSettings:
    """One search: what to search, how long each trial trains, how trials run, where results go.

    The defaults are sized for the 15-minute budget of a 64-trial VICReg search on two CPU cores
    with the embedded corpus (see benchmarks/bench_search.py): batch 32, 6 epochs of 15 steps,
    two trials at a time on one core each, the collapse metrics on 256 validation segments and a
    final linear probe on 2 segments per track.
    """

    method: str
    trials: int = 64
    name: str = ""
    storage_dir: str = "runs"
    # What a trial trains with: the defaults are TrialSettings' (one place to change them).
    objective: str = _TRIAL.objective
    scheduler: str = "none"
    max_epochs: int = _TRIAL.max_epochs
    steps_per_epoch: int = _TRIAL.steps_per_epoch
    batch_size: int = _TRIAL.batch_size
    probe_segments: int = _TRIAL.probe_segments
    probe_segments_per_track: int = _TRIAL.probe_segments_per_track
    preset: str = _TRIAL.preset
    data: str = _TRIAL.data
    # A named dataset's folder and audio folder (--root, --audio-dir); where the data lies, so a
    # resumed search may give other ones.
    root: str | None = None
    audio_dir: str | None = None
    seed: int = _TRIAL.seed
    sampler: str = "tpe"
    concurrency: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    collapse_stop: bool = _TRIAL.collapse_stop
    grace_epochs: int = _TRIAL.grace_epochs
    patience_epochs: int = _TRIAL.patience_epochs
    thresholds: dict[str, Any] = field(default_factory=dict)
    stop_on: list[str] = field(default_factory=lambda: list(_TRIAL.stop_on))
    # The verdict the rule judges by (COLLAPSE_TYPES_VERSION; the stored one for a search started before it).
    collapse_types_version: int = COLLAPSE_TYPES_VERSION
    asha_grace_epochs: int = 2
    asha_reduction_factor: float = 2.0
    reuse_actors: bool = True
    # Enqueued first (Optuna's enqueue_trial): dicts of parameter values, e.g. the method's defaults.
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    # The generated corpus the search trains on (generator version, seed, tracks, seconds: see
    # musicssl.corpus.splits.corpus_identity), recorded when it starts; None for other data. A resumed
    # search continues on it, never on a corpus of another generator version (other splits).
    corpus: dict[str, Any] | None = None
    # The tracks it trains and scores on: the usable tracks of each split with their tags, as a digest, and
    # their counts (hpsearch.run.tracks_record), recorded when it starts (a search from before the record: when
    # first resumed). A resumed search on other tracks or splits (a folder changed since) is refused.
    tracks: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.trials < 1:
            problems.append(f"--trials must be at least 1, got {self.trials}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be a whole number from 0 to 2**32 - 1 (Optuna's and numpy's range), got {self.seed}")
        if self.objective not in OBJECTIVES:
            problems.append(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.sampler not in SAMPLERS:
            problems.append(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for name in ("max_epochs", "steps_per_epoch", "concurrency", "patience_epochs", "asha_grace_epochs"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps_per_epoch >= 2**31:  # (musicssl.train.MAX_STEPS_PER_EPOCH) every trial would fail as it started
            problems.append(f"--steps-per-epoch must be under 2**31, got {self.steps_per_epoch}")
        if self.batch_size < 2:
            problems.append(f"--batch-size must be at least 2 (batch statistics), got {self.batch_size}")
        if self.grace_epochs < 0:
            problems.append(f"--grace-epochs must be >= 0, got {self.grace_epochs}")
        if self.probe_segments < 2:
            problems.append(f"--probe-segments must be at least 2 (the collapse metrics need a batch), got {self.probe_segments}")
        if self.probe_segments_per_track < 1:
            problems.append(f"--probe-segments-per-track must be at least 1, got {self.probe_segments_per_track}")
        # Ray refuses a share under 1/10000 of a CPU or GPU, but only as it starts the first trial (a traceback,
        # and a trial left RUNNING in the journal): refused here instead.
        if not (RAY_SMALLEST_SHARE <= self.cpus_per_trial < math.inf):
            problems.append(f"--cpus-per-trial must be a number >= {RAY_SMALLEST_SHARE:g} (Ray's smallest share of a "
                            f"CPU), got {self.cpus_per_trial}")
        if not (self.gpus_per_trial == 0 or RAY_SMALLEST_SHARE <= self.gpus_per_trial < math.inf):
            problems.append(f"--gpus-per-trial must be 0 or a number >= {RAY_SMALLEST_SHARE:g} (Ray's smallest share "
                            f"of a GPU), got {self.gpus_per_trial}")
        from musicssl.models import PRESETS

        if self.preset not in PRESETS:
            problems.append(f"unknown --preset {self.preset!r}; available: {', '.join(sorted(PRESETS))}")
        if self.asha_reduction_factor <= 1:
            problems.append(f"the ASHA reduction factor must be > 1, got {self.asha_reduction_factor}")
        if self.name and name_problem(self.name):
            problems.append(name_problem(self.name))
        try:
            self.collapse_thresholds()
        except (TypeError, ValueError) as error:
            problems.append(str(error))
        types = COLLAPSE_TYPES
        if self.collapse_types_version not in COLLAPSE_TYPES_VERSIONS:
            problems.append(f"collapse_types_version {self.collapse_types_version!r} is not one this version of the "
                            f"search knows ({', '.join(map(str, COLLAPSE_TYPES_VERSIONS))}; a search.json without "
                            "it is read as 1)")
        else:
            types = collapse_types(self.collapse_types_version)
        self.stop_on = list(self.stop_on)
        unknown = [kind for kind in self.stop_on if kind not in types]
        if unknown or not self.stop_on:
            old = " (a search started before 2026-12-02 keeps the verdict of then)" if types != COLLAPSE_TYPES else ""
            problems.append(
                f"--stop-on takes one or more of {', '.join(types)}{old} separated by commas, got "
                f"{','.join(self.stop_on) or 'nothing'} (to stop no collapsed trial, use --no-collapse-stop)"
            )
        if problems:
            raise SettingsError("; ".join(problems))

    def collapse_thresholds(self):
        """The :class:`musicssl.collapse.CollapseThresholds` of the stopping rule (defaults + overrides)."""
        return collapse_thresholds(self.thresholds)

    def trial_settings(self) -> TrialSettings:
        """The part every trial needs."""
        return TrialSettings(
            method=self.method,
            preset=self.preset,
            data=self.data,
            objective=self.objective,
            max_epochs=self.max_epochs,
            steps_per_epoch=self.steps_per_epoch,
            batch_size=self.batch_size,
            probe_segments=self.probe_segments,
            probe_segments_per_track=self.probe_segments_per_track,
            # ASHA compares trials at its rungs on the objective, so a probe objective is then
            # measured every epoch (its cost, ~1.5 s on the CPU corpus, is paid per epoch).
            probe_every_epoch=self.scheduler == "asha" and self.objective.startswith("probe_"),
            seed=self.seed,
            num_threads=max(1, math.floor(self.cpus_per_trial)),  # never more threads than CPUs (1.5: 1, 2.5: 2)
            accelerator="gpu" if self.gpus_per_trial > 0 else "cpu",
            collapse_stop=self.collapse_stop,
            grace_epochs=self.grace_epochs,
            patience_epochs=self.patience_epochs,
            thresholds=dict(self.thresholds),
            stop_on=tuple(self.stop_on),
            collapse_types_version=self.collapse_types_version,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, folder: Path) -> None:
        """Write ``search.json`` whole or not at all (a search stopped meanwhile must stay resumable)."""
        write_whole(Path(folder) / SEARCH_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, root: str | None = None) -> SearchSettings:
        """The settings in ``folder/search.json``; ``root``: the ``--root`` a resume gives in place of the
        stored one (where a search from before the corpus record looks for the corpus it trained on)."""
        path = Path(folder) / SEARCH_FILE
        try:
            values = json.loads(path.read_text())
            if not isinstance(values, dict):
                raise ValueError("not a JSON object")
            known = {f.name for f in dataclasses.fields(cls)}
            missing = sorted(FIRST_SETTINGS - values.keys())
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}, which every search writes")
            unknown = sorted(values.keys() - known)
            if unknown:
                raise SettingsError(
                    f"{path} holds settings this version of the toolkit does not know ({', '.join(unknown)}): a later "
                    "version started the search; continue it with that version (settings left out would change "
                    "the search)")
            values.setdefault("stop_on", list(STOP_ON_BEFORE_SETTING))
            # Written before the verdict of 2026-12-02: the resumed search keeps judging by the old one.
            values.setdefault("collapse_types_version", 1)
            # Written before the record (2026-12-05): a search on `corpus` trained on a corpus of version 1.
            if str(values.get("data", "")).strip().lower() == "corpus" and "corpus" not in values:
                values["corpus"] = _version_1_corpus_of(root if root is not None else values.get("root"))
            return cls(**{k: v for k, v in values.items() if k in known})
        except SettingsError:
            raise
        except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise SettingsError(
                f"{path} cannot be read as a search's settings ({error}); it is written when a search starts: "
                "restore it, or start a new search with another --name"
            ) from None
