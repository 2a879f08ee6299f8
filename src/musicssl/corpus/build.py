"""Build the embedded corpus: compose, synthesise and master N songs, split them, write ``tracks.csv``.

The output folder holds ``audio/<track_id>.flac`` (16 kHz mono, 16-bit), ``midi/<track_id>.mid``
(the score each track was synthesised from), ``tracks.csv`` (a :class:`TrackIndex` with the
generator factors as extra columns) and ``corpus.json`` (how it was built). The folder appears only
when it is complete: it is built in a hidden sibling folder and renamed at the end.

Each track's content depends only on the corpus seed and the track's number (its random streams are
derived from both), so the corpus is the same whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from musicssl.corpus.compose import STYLES, compose_song, draw_factors
from musicssl.corpus.render import (
    SAMPLE_RATE,
    NoteBank,
    bank_directory,
    default_workers,
    draw_mix,
    ensure_note_bank,
    master,
    synthesize,
    worker_pool,
    write_flac,
)
from musicssl.corpus.splits import SPLIT_BLOCK, SPLIT_FRACTIONS, SPLITS, corpus_identity, split_assignment
from musicssl.corpus.tags import TAG_NAMES
from musicssl.interrupts import held_signals, interrupts_kept
from musicssl.paths import (
    cache_hint,
    cache_root,
    disk_full,
    free_bytes,
    make_writable_folder,
    remove_abandoned_staging,
    same_file_system,
    size_text,
    staging_folder,
)


__all__ = [
    "CorpusConfig",
    "CorpusError",
    "BuildReport",
    "SPLIT_FRACTIONS",
    "GENERATOR_VERSION",
    "cache_dir",
    "default_corpus_dir",
    "split_assignment",
    "build_track",
    "build_corpus",
    "corpus_bytes",
    "ensure_corpus",
]

# 2: a track's split depends on (seed, number) alone, no longer on the number of tracks (version 1's
# corpora of two sizes from one seed held the same songs in different splits).
GENERATOR_VERSION = 2
MIN_TRACKS = SPLIT_BLOCK  # one whole block: fewer could leave the validation split empty
# Training cuts two 4 s views whose starts are at least 4 s apart (musicssl.data.views.ViewConfig), so
# a track needs 8 s: 128,000 samples, 251 frames at 16 kHz and hop 512, exactly ViewFrames.min_track_frames.
# A shorter corpus would build and then have every track left out by ViewDataset; it fails here instead.
MIN_SECONDS = 8.0
MAX_SECONDS = 600.0
REVERB_MARGIN_SECONDS = 1.0  # synthesised past the end so that the cut is not a reverb onset
# What a track takes on disk, measured on the default corpus (600 tracks x 30 s, seed 0, version 2):
# its FLAC 21.0 kB per second of audio on average (from 12.5 to 26.0), its MIDI file 5.1 kB, its row of
# tracks.csv 0.4 kB. A build needs room for the whole corpus (it is moved into place when complete) and
# for the note bank when that is rendered first (54 MB).
AUDIO_BYTES_PER_SECOND = 21_000
TRACK_FILE_BYTES = 5_500
NOTE_BANK_ROOM = 64_000_000


class CorpusError(ValueError):
    """Bad corpus settings or output folder; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class CorpusConfig:
    """What to build: ``tracks`` songs of ``seconds`` each, all drawn from ``seed``."""

    tracks: int = 600
    seconds: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.tracks, int) or self.tracks < MIN_TRACKS:
            raise CorpusError(f"tracks must be an integer >= {MIN_TRACKS} (so that every split has a track), got {self.tracks!r}")
        if not (MIN_SECONDS <= float(self.seconds) <= MAX_SECONDS) or not math.isfinite(float(self.seconds)):
            raise CorpusError(
                f"seconds must be between {MIN_SECONDS:g} and {MAX_SECONDS:g}, got {self.seconds!r} (training cuts two "
                f"4 s views starting at least 4 s apart from each track, so a track needs {MIN_SECONDS:g} s)"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise CorpusError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass(frozen=True)
class BuildReport:
    """What a build produced and how long it took."""

    out_dir: Path
    tracks: int
    seconds: float
    split_counts: dict[str, int]
    tags_used: int
    build_seconds: float
    bank_seconds: float
    bank_dir: Path

    def summary(self) -> str:
        hours = self.tracks * self.seconds / 3600.0
        splits = "/".join(str(self.split_counts[name]) for name in SPLITS)
        return (
            f"built {self.tracks} tracks x {self.seconds:g} s ({hours:.2f} h of audio, {splits} train/valid/test, "
            f"{self.tags_used} tags) in {self.out_dir} in {self.build_seconds:.1f} s"
        )


def _track_bytes(seconds: float) -> int:
    return int(float(seconds) * AUDIO_BYTES_PER_SECOND + TRACK_FILE_BYTES)


def corpus_bytes(config: CorpusConfig) -> int:
    """About how many bytes the corpus ``config`` describes takes on disk (the average per track, measured)."""
    return config.tracks * _track_bytes(config.seconds)


def _check_room(out_dir: Path, config: CorpusConfig, bank_dir: Path) -> None:
    """Refuse a build whose corpus (and the note bank, when it is rendered first on the same disk) would
    not fit on the disk of ``out_dir``: it would fail when the disk is full, after hours for a large one."""
    free = free_bytes(out_dir.parent)
    bank = 0
    if not (bank_directory(bank_dir) / "index.json").is_file() and same_file_system(bank_dir, out_dir.parent):
        bank = NOTE_BANK_ROOM
    if free is None or corpus_bytes(config) + bank <= free:
        return
    hint = cache_hint(OSError(errno.ENOSPC, "", str(out_dir)))
    also = f" (and the note bank, rendered first, about {size_text(NOTE_BANK_ROOM)})" if bank else ""
    raise CorpusError(
        f"{config.tracks} tracks of {float(config.seconds):g} s take about {size_text(corpus_bytes(config))}{also}, "
        f"and {out_dir.parent} has {size_text(free)} free{hint}; build fewer or shorter tracks, or in a folder on a "
        "disk with room"
    )


def cache_dir() -> Path:
    """``$MUSICSSL_CACHE``, else ``~/.cache/musicssl`` (absolute: see :func:`musicssl.paths.cache_root`)."""
    return cache_root()


def default_corpus_dir(tracks: int = 600, seconds: float = 30.0, seed: int = 0, version: int = GENERATOR_VERSION) -> Path:
    """Where :func:`ensure_corpus` keeps a corpus by default (each generator version after the first in a
    folder of its own, so that versions sharing a cache do not rebuild each other's); ``version`` names
    where an earlier version kept it."""
    suffix = "" if version == 1 else f"-v{version}"
    return cache_dir() / f"corpus-{tracks}x{seconds:g}s-seed{seed}{suffix}"


def track_id(number: int) -> str:
    return f"track{number:05d}"


def build_track(number: int, config: CorpusConfig, bank: NoteBank, out_dir: Path, split: str) -> dict:
    """Compose, synthesise, master and write track ``number``; returns its ``tracks.csv`` record.

    The song's factors and notes come from the random stream ``(seed, number, 0)`` and its mix from
    ``(seed, number, 1)``, so a track does not depend on which worker builds it or in what order.
    """
    song_rng = np.random.default_rng([config.seed, number, 0])
    mix_rng = np.random.default_rng([config.seed, number, 1])
    factors = draw_factors(song_rng)
    song = compose_song(factors, config.seconds, song_rng)
    mix = draw_mix(mix_rng)
    audio = synthesize(song, bank, mix.part_gains_db, extra_seconds=REVERB_MARGIN_SECONDS)
    audio, level = master(audio, mix, mix_rng, bank.sample_rate, length=int(round(config.seconds * bank.sample_rate)))
    name = track_id(number)
    audio_path = out_dir / "audio" / f"{name}.flac"
    write_flac(audio_path, audio, bank.sample_rate)
    (out_dir / "midi" / f"{name}.mid").write_bytes(song.midi_bytes())
    return {
        "track_id": name,
        "path": str(audio_path),
        "split": split,
        "tags": factors.tags,
        "duration": len(audio) / bank.sample_rate,
        "style": factors.style,
        "key": factors.key_name,
        "mode": factors.mode,
        "energy": factors.energy,
        "tempo_bpm": factors.tempo_bpm,
        "time_signature": f"{STYLES[factors.style].beats_per_bar}/4",
        "instruments": ";".join(factors.instruments),
        "bass": factors.bass,
        "chords": factors.chords,
        "melody": factors.melody,
        "pad": factors.pad or "",
        "drum_kit": factors.drum_kit,
        "sections": ";".join(song.sections),
        "gain_db": level,
        "eq_low_shelf_db": mix.low_shelf_db,
        "eq_high_shelf_db": mix.high_shelf_db,
        "lowpass_hz": mix.lowpass_hz if mix.lowpass_hz is not None else "",
        "reverb": mix.reverb_wet,
        "reverb_seconds": mix.reverb_seconds,
        "midi": f"midi/{name}.mid",
    }


def _build_track_job(job: tuple[int, CorpusConfig, str, str, str]) -> dict:
    number, config, bank_dir, out_dir, split = job
    return build_track(number, config, NoteBank(Path(bank_dir)), Path(out_dir), split)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CorpusError(f"{out_dir} exists and is not a folder; choose another folder for the corpus")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not _holds_a_corpus(out_dir):
            # A tracks.csv alone is also a user's own dataset (--data PATH), which --force would delete.
            raise CorpusError(f"{out_dir} is not empty and holds no generated corpus (no tracks.csv with a corpus.json "
                              "from this generator); choose an empty or new folder for the corpus")
        if not force:
            raise CorpusError(f"{out_dir} already holds a corpus; rebuild it with --force (force=True in Python) or choose another folder")
        # The whole folder is replaced: what else lies in it (a user's notes, a run folder) would go with it.
        others = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in CORPUS_ENTRIES)
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise CorpusError(f"{out_dir} holds a corpus and also {shown}, which --force would delete with it; move them "
                              "out of the folder first, or build the corpus in another folder")
    # The finished build takes --out's place by renames: the folder the command runs in (or one above it) would be
    # swapped from under its shell.
    try:
        here = Path(os.path.realpath(Path.cwd()))
    except OSError:  # a folder since removed: nothing to swap from under it
        here = None
    if here is not None and (out_dir == here or out_dir in here.parents):
        raise CorpusError(f"--out {out_dir} is the folder this runs in (or holds it), which the finished corpus replaces; "
                          "give a folder inside it or elsewhere, e.g. --out corpus")


def _publish(staging: Path, out_dir: Path, force: bool) -> bool:
    """Move the finished build into place. Returns False if another build finished there first."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if force and _holds_a_corpus(out_dir):
        retired = staging_folder(out_dir.parent, f".{out_dir.name}.old-")  # removed next, or by a later build
        out_dir.rename(retired / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(retired, ignore_errors=True)
        return True
    try:
        staging.rename(out_dir)
    except OSError:
        if (out_dir / "tracks.csv").is_file():
            return False  # a concurrent build of the same corpus won the race; its result is as good
        raise
    return True


def _check_same_corpus(out_dir: Path, config: CorpusConfig) -> None:
    """After another build published into ``out_dir`` first: fine if it is this corpus (same
    generator and settings: the same files), else a :class:`CorpusError` (this build is lost)."""
    try:
        theirs = json.loads((out_dir / "corpus.json").read_text())
    except (OSError, ValueError):
        theirs = {}
    if (isinstance(theirs, dict) and theirs.get("generator_version") == GENERATOR_VERSION
            and theirs.get("config") == asdict(config)):
        return
    settings = theirs.get("config") if isinstance(theirs, dict) and isinstance(theirs.get("config"), dict) else {}
    described = ", ".join(f"{key} {settings[key]}" for key in ("tracks", "seconds", "seed") if key in settings)
    raise CorpusError(
        f"{out_dir}: another build finished a different corpus there while this one ran"
        f"{f' ({described})' if described else ''}; this build ({config.tracks} tracks, {config.seconds:g} s, seed "
        f"{config.seed}) was not kept: give another folder, or --force to replace that corpus"
    )


def build_corpus(
    out_dir: str | Path,
    config: CorpusConfig = CorpusConfig(),
    workers: int | None = None,
    bank_cache_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> BuildReport:
    """Build the corpus described by ``config`` into ``out_dir``.

    ``workers`` processes build tracks in parallel (default: one per CPU); the result does not
    depend on it. The note bank is rendered into ``bank_cache_dir`` (default :func:`cache_dir`) on
    first use and reused afterwards. ``out_dir`` must be new or empty unless ``force`` replaces a
    corpus already there. Raises :class:`CorpusError` for bad settings or folders.
    """
    from musicssl.progress import progress_bar

    started = time.perf_counter()
    # Through a symbolic link, the folder it names: the build is moved into place by renames, which would
    # replace the link itself (before: an empty linked folder failed after the whole build, and with force
    # the link was replaced by a new folder while the old corpus stayed where it pointed).
    out_dir = Path(os.path.realpath(Path(out_dir).expanduser().absolute()))
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise CorpusError(f"workers must be a positive integer, got {workers!r}")
    _check_out_dir(out_dir, force)
    bank_dir = Path(bank_cache_dir) if bank_cache_dir is not None else cache_dir()
    bank_folder = Path(os.path.realpath(bank_dir.expanduser().absolute()))  # corp/../corp/bank is corp/bank; links too
    out_folder = Path(os.path.normpath(out_dir))
    if bank_folder == out_folder or out_folder in bank_folder.parents:  # the corpus takes --out's place when done
        where = "--cache-dir" if bank_cache_dir is not None else "the note bank's folder (MUSICSSL_CACHE)"
        raise CorpusError(f"{where} {bank_folder} is inside {out_dir}, which the finished corpus replaces; keep the note "
                          "bank outside the corpus's folder")
    try:  # before the note bank: a folder that cannot be written fails at once
        make_writable_folder(out_dir.parent)
    except OSError as error:
        hint = cache_hint(OSError(error.errno, error.strerror, str(out_dir)))  # the default corpus's place
        raise CorpusError(f"{out_dir}: cannot create the corpus there ({error.strerror or error}){hint}; give a folder "
                          "you can write") from None
    _check_room(out_dir, config, bank_folder)

    bank = ensure_note_bank(bank_dir, workers=workers, progress=progress)
    bank_seconds = time.perf_counter() - started

    splits = split_assignment(config.tracks, config.seed)
    for kind in ("partial", "old"):  # of builds killed here before: one under way, or one replacing a corpus
        remove_abandoned_staging(out_dir.parent, f".{out_dir.name}.{kind}-")
    staging = staging_folder(out_dir.parent, f".{out_dir.name}.partial-")
    done = 0  # tracks written
    try:
        (staging / "audio").mkdir()
        (staging / "midi").mkdir()
        jobs = [(number, config, str(bank.directory), str(staging), splits[number]) for number in range(config.tracks)]
        records: list[dict] = [{}] * config.tracks
        with progress_bar(total=config.tracks, desc="corpus", unit="track", disable=not progress,
                          dynamic_ncols=True) as bar:
            if workers == 1:
                for job in jobs:
                    records[job[0]] = _build_track_job(job)
                    done += 1
                    bar.update()
            else:
                pool = worker_pool(min(workers, config.tracks))
                try:
                    with interrupts_kept():
                        for record in pool.imap_unordered(_build_track_job, jobs, chunksize=2):
                            records[int(record["track_id"][len("track") :])] = record
                            done += 1
                            bar.update()
                finally:
                    # Every worker ended before the staging folder is removed, whatever signal comes
                    # meanwhile: a second Ctrl-C (a double press, or `timeout -s INT`, which signals the
                    # process and then its group) cut the pool's end short, and workers went on writing
                    # tracks into a folder removed under them, which then stayed.
                    with held_signals():
                        pool.terminate()
                        pool.join()
        from musicssl.data.index import TrackIndex

        index = TrackIndex.from_records(records, tag_names=[tag for tag in TAG_NAMES if any(tag in r["tags"] for r in records)], name=out_dir.name)
        index.to_csv(staging / "tracks.csv")
        split_counts = {name: splits.count(name) for name in SPLITS}
        build_seconds = time.perf_counter() - started
        info = {
            "generator_version": GENERATOR_VERSION,
            "config": asdict(config),
            "sample_rate": SAMPLE_RATE,
            "split_counts": split_counts,
            "tag_vocabulary": list(TAG_NAMES),
            "tags_used": len(index.tag_names),
            "note_bank": str(bank.directory),
            "workers": workers,
            "build_seconds": round(build_seconds, 2),
        }
        (staging / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
        # Moving it into place (with --force: the old corpus out, the new one in, the old one removed)
        # is not cut short: a signal there could leave --out missing, or say "nothing was left" of a
        # corpus that is in place.
        with held_signals():
            if not _publish(staging, out_dir, force):
                _check_same_corpus(out_dir, config)
    except Exception as error:
        # A disk that filled meanwhile (by this build, or by others since the check of room): said as such,
        # with what the corpus needs. libsndfile loses the errno ("System error.", a RuntimeError): for it,
        # the room left tells.
        if not disk_full(error, staging if isinstance(error, RuntimeError) else None,
                         room=4 * _track_bytes(config.seconds)):
            raise
        hint = cache_hint(OSError(errno.ENOSPC, "", str(out_dir)))
        raise CorpusError(
            f"{out_dir.parent}: its disk filled after {done} of {config.tracks} tracks (the corpus takes about "
            f"{size_text(corpus_bytes(config))}){hint}; the partial build is removed: free some space, or build fewer "
            "or shorter tracks, or in a folder on a disk with room"
        ) from error
    finally:
        with held_signals():  # a second Ctrl-C must not leave the folder half removed
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return BuildReport(out_dir, config.tracks, float(config.seconds), split_counts, len(index.tag_names), build_seconds, bank_seconds, bank.directory)


def ensure_corpus(out_dir: Path | None = None, tracks: int = 600, seed: int = 0, seconds: float = 30.0) -> Path:
    """The folder holding the corpus's ``tracks.csv``, building the corpus first if it is missing.

    Default folder: :func:`default_corpus_dir` (``$MUSICSSL_CACHE/corpus-{tracks}x{seconds}s-seed{seed}``, with
    ``-v{version}`` after version 1; ``MUSICSSL_CACHE`` defaults to ``~/.cache/musicssl``). A folder with a ``tracks.csv`` is returned as it
    is, unless its ``corpus.json`` names another generator version than this one (its splits and some of
    its audio would differ from what this version builds): the default folder is then built again, and a
    folder given raises :class:`CorpusError` saying how to rebuild it.
    """
    config = CorpusConfig(tracks=tracks, seconds=seconds, seed=seed)
    given = out_dir is not None
    out_dir = Path(out_dir).expanduser().absolute() if given else default_corpus_dir(tracks, seconds, seed)
    if _usable_corpus(out_dir, given):
        return out_dir
    # One build at a time: commands started together on an empty cache (two searches, a search and a training
    # run) each built the whole corpus before, for minutes, the second's then dropped.
    with _build_lock(out_dir):
        if _usable_corpus(out_dir, given):  # built by the process this one waited for
            return out_dir
        if not (out_dir / "tracks.csv").is_file():
            build_corpus(out_dir, config)
            return out_dir
        print(f"corpus {out_dir}: built by generator version {_generator_version(out_dir)}, this is "
              f"{GENERATOR_VERSION}; building it again", file=sys.stderr, flush=True)
        build_corpus(out_dir, config, force=True)
    return out_dir


def _usable_corpus(out_dir: Path, given: bool) -> bool:
    """Whether ``out_dir`` holds a corpus :func:`ensure_corpus` returns as it is (False: build it, or build the
    default folder's again); :class:`CorpusError` for a folder given that holds another generator version's."""
    if not (out_dir / "tracks.csv").is_file():
        return False
    version = _generator_version(out_dir)
    if version in (None, GENERATOR_VERSION):  # None: no corpus.json to say (a corpus written by hand)
        return True
    if given:
        identity = corpus_identity(out_dir)
        settings = (f" --tracks {identity['tracks']} --seconds {identity['seconds']:g} --seed {identity['seed']}"
                    if identity else " (with its settings)")
        raise CorpusError(f"{out_dir}: a corpus of generator version {version}; this version builds version "
                          f"{GENERATOR_VERSION}, with other splits and some other audio: rebuild it with python -m "
                          f"musicssl.corpus --out {out_dir}{settings} --force, or use another folder (a backbone "
                          f"trained on it can still be evaluated on it: give its tracks.csv as the dataset)")
    return False


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Hold the lock of builds into ``out_dir`` (a hidden file beside it, locked with ``flock``: released when
    the process ends, however it ends), waiting, with one line said, while another process holds it. Where
    the lock cannot be had (a folder that cannot be written, which the build then reports; a file system
    that cannot lock files), the block runs without it."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir.parent / f".{out_dir.name}.build.lock", "a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"corpus {out_dir}: another process is building it; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # Ctrl-C and SIGTERM still stop the wait
        except OSError:  # no locks on this file system: as before, each process builds (the last one's stays)
            pass
        yield


# What a corpus folder holds: all a rebuild (force) replaces.
CORPUS_ENTRIES = frozenset({"audio", "midi", "tracks.csv", "corpus.json"})


def _holds_a_corpus(folder: Path) -> bool:
    """Whether ``folder`` holds a corpus this generator built (any version): a ``tracks.csv`` and a
    ``corpus.json`` that records a generator version. Only such a folder is ever replaced (``force``)."""
    return (folder / "tracks.csv").is_file() and _generator_version(folder) is not None


def _generator_version(folder: Path) -> object:
    """The ``generator_version`` a corpus folder's ``corpus.json`` records (None without one)."""
    try:
        info = json.loads((folder / "corpus.json").read_text())
    except (OSError, ValueError):
        return None
    return info.get("generator_version") if isinstance(info, dict) else None
