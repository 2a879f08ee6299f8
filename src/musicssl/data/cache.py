"""The mel cache: decode every track once, store its log-mel, read random crops fast.

Layout of one cache (one folder per front-end setting, so a change of settings never reuses stale
mels)::

    <cache_dir>/mel-16000hz-1024fft-512hop-128mels-<hash>/
        settings.json           the front-end settings and the store format (what the hash covers)
        shard-000001.bin        float16 log-mels of a batch of tracks, time-major (frames, n_mels)
        shard-000001.json       that batch's manifest: track_id -> offset, frames; skipped files
        ...
        skipped.csv             every skipped file with its reason (rewritten after each build)

Why this design:

* **Crash safety.** A build appends batches of finished tracks as new, immutable shards. The data
  file is written under a temporary name, fsynced and renamed; only then is the manifest written
  the same way. A manifest is the commit: a shard without one (crash between the two renames) is
  never read and is deleted by the next build, and temporary files are always ignored. A
  ``Ctrl-C`` commits the tracks already finished before it re-raises. So an interrupted build
  reopens with complete entries only and the next build finishes the rest.
* **Incremental.** A track is decoded again only when it is missing from the cache, when its audio
  file changed (size or modification time) or its id now lists another path, or (for a skipped track)
  when the file, its path or the skipping rules changed. A cached track is re-judged against the
  current skipping rules on every build from its stored length and peak, without decoding: raising
  ``min_seconds`` drops the tracks it excludes.
* **Superseded mels are deleted.** A re-decoded track's old mel stays in its shard (shards are never
  rewritten); a build deletes each shard none of whose mels is current any more (its manifest goes first,
  or is rewritten to the skip records that are), unless a process has the cache open: every open cache
  holds a shared lock on ``.readers.lock``, and the build deletes only when it gets that lock exclusively
  (else the next build does). A shard that still holds current mels is kept whole.
* **A crashing decoder stops nothing.** When a decoding process dies (a decoder crash, the kernel's
  out-of-memory killer), the tracks it might have been working on are retried one at a time in a
  fresh process; a file that kills that process too is recorded as skipped (``crashed``), so the
  build goes on and later builds do not trip over it again.
* **Fast reads.** Each shard is memory-mapped once per process; a crop of ``num_frames`` frames is
  one contiguous slice (time-major storage), so a 4 s view costs one 32 KB read and a transpose.
  Nothing is loaded beyond the requested frames.

Each track is decoded with :func:`musicssl.audio.load_audio`, peak-normalised (``x / max|x|``, as
the study did) and passed whole through :class:`musicssl.audio.LogMel` (by ``LogMel.track``, which holds
a chunk of the track's STFT at a time and gives the module's numbers on the whole). So the ``top_db`` floor is
relative to the *track's* loudest bin, and a crop's edge frames see the neighbouring audio rather
than reflect padding: a crop of the cached mel equals ``LogMel`` of the matching waveform crop except
for those two details.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fcntl
import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import stat
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from musicssl.audio import UNREADABLE, AudioError, LogMel, load_audio, mel_filterbank
from musicssl.data.index import TrackIndex
from musicssl.interrupts import SpawnPool
from musicssl.machine import usable_cpus
from musicssl.progress import progress_bar

__all__ = [
    "SKIP_REASONS",
    "BuildReport",
    "LogMelConfig",
    "MelCache",
    "MelCacheError",
    "SkippedTrack",
]

FORMAT_VERSION = 1
STORE_DTYPE = np.dtype("<f2")  # float16: rounding error <= 0.03 dB below 128 dB; half the disk of float32
SETTINGS_FILE = "settings.json"
SKIP_REPORT_FILE = "skipped.csv"
LOCK_FILE = ".build.lock"
# Held shared by every open cache (MelCache.open, and each process it is pickled to) and exclusively by a
# build that deletes superseded shards: none are deleted while a reader may still read them.
READERS_LOCK_FILE = ".readers.lock"
logger = logging.getLogger(__name__)
_SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.(bin|json)(\.tmp)?$")
_OPEN_SHARDS_PER_PROCESS = 256  # bound on memory maps (each holds a file descriptor)

# Why a file was skipped. The reason is a short code (stable, for filtering); the detail is prose.
SKIP_REASONS = {
    "missing": "the audio file does not exist",
    "empty": "the audio file has 0 bytes",
    "undecodable": "libsndfile cannot decode the file (corrupt, truncated or not audio)",
    "unreadable": "the file cannot be opened (permission denied, an I/O error); tried again at every build",
    "zero_length": "the file decodes to zero samples",
    "non_finite": "the decoded samples contain NaN or inf",
    "too_short": "the track is shorter than the minimum length",
    "truncated": "the file decodes to under half the duration its dataset lists (a truncated download?)",
    "silent": "the track's peak amplitude is below the silence threshold",
    "crashed": "the decoding process died on the file (a decoder crash or out of memory), also when retried alone",
    "failed": "an unexpected error while processing the track",
}


class MelCacheError(RuntimeError):
    """The cache cannot be built or opened; the message says why and what to do."""


@dataclass(frozen=True)
class LogMelConfig:
    """Front-end settings of a mel cache (the arguments of :class:`musicssl.audio.LogMel`).

    ``f_max=None`` means Nyquist (``sample_rate / 2``); it and an explicit Nyquist give the same cache.
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float | None = None
    top_db: float | None = 100.0
    norm: str | None = "slaney"

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LogMelConfig.{name} must be a positive integer, got {value!r}")
        if self.top_db is not None and self.top_db <= 0:
            raise ValueError(f"LogMelConfig.top_db must be positive or None, got {self.top_db!r}")
        mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.f_min, self.f_max, self.norm)  # validates range

    @property
    def resolved_f_max(self) -> float:
        return self.sample_rate / 2.0 if self.f_max is None else float(self.f_max)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def module(self) -> LogMel:
        """The :class:`LogMel` front-end with these settings."""
        return LogMel(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            n_mels=self.n_mels,
            f_min=self.f_min,
            f_max=self.f_max,
            top_db=self.top_db,
            norm=self.norm,
        )

    def num_frames(self, num_samples: int) -> int:
        """Frames of a centred STFT of ``num_samples`` samples: ``num_samples // hop_length + 1``."""
        return int(num_samples) // self.hop_length + 1

    def segment_frames(self, seconds: float) -> int:
        """Frames of a ``seconds``-long crop: ``round(seconds * sample_rate) // hop_length + 1``.

        The same count :class:`LogMel` gives for a waveform of that length (126 for 4 s at 16 kHz,
        hop 512), so a model trained on cache crops sees the shape it would see on raw 4 s clips.
        """
        if seconds <= 0:
            raise ValueError(f"a segment must be longer than 0 s, got {seconds}")
        return self.num_frames(round(seconds * self.sample_rate))

    def canonical(self) -> dict:
        """The settings as they define the stored mels (``f_max`` resolved, numbers as floats)."""
        return {
            "sample_rate": int(self.sample_rate),
            "n_fft": int(self.n_fft),
            "hop_length": int(self.hop_length),
            "n_mels": int(self.n_mels),
            "f_min": float(self.f_min),
            "f_max": self.resolved_f_max,
            "top_db": None if self.top_db is None else float(self.top_db),
            "norm": self.norm,
            "peak_normalise": True,
            "store_dtype": STORE_DTYPE.str,
            "format_version": FORMAT_VERSION,
        }

    def cache_key(self) -> str:
        """Folder name of the cache for these settings: readable prefix plus a hash of all settings."""
        digest = hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()[:12]
        return f"mel-{self.sample_rate}hz-{self.n_fft}fft-{self.hop_length}hop-{self.n_mels}mels-{digest}"

    @classmethod
    def from_canonical(cls, values: dict) -> LogMelConfig:
        fields = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in fields})


@dataclass(frozen=True)
class SkippedTrack:
    """A track the cache could not use: ``reason`` is a key of :data:`SKIP_REASONS`, ``detail`` is prose."""

    track_id: str
    path: str
    reason: str
    detail: str


@dataclass
class BuildReport:
    """What one :meth:`MelCache.build` call did."""

    cache_path: Path
    requested: int  # tracks in the index
    already_cached: int  # cached before this build and unchanged
    already_skipped: int  # skipped by an earlier build and not retried (file and rules unchanged)
    processed: int  # tracks decoded by this build
    added: int  # of those, now cached
    skipped: int  # of those, skipped
    skip_reasons: dict[str, int]  # this build's skips by reason
    usable: int  # tracks of the index now in the cache
    seconds: float
    excluded: int = 0  # cached tracks that the current min_seconds/silence rules now skip (not decoded)
    crashed: list[str] = field(default_factory=list)  # files whose decoding process died (reason "crashed")
    dropped: int = 0  # listed tracks the loader left out of the index: audio file missing or empty
    # (path, what the decoder printed) for files that decoded, and are kept, although the decoder
    # library printed warnings (mpg123 resyncing past damaged MP3 frames)
    decoder_warnings: list[tuple[str, str]] = field(default_factory=list)
    # Bytes of mels superseded by re-decoded tracks (a file changed, or copied without its modification
    # time) that this build deleted, and those it kept: in shards that also hold current mels, or while
    # another process had the cache open (the next build deletes those).
    reclaimed_bytes: int = 0
    superseded_bytes: int = 0

    def summary(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skip_reasons.items()))
        text = (
            f"mel cache {self.cache_path}: {self.usable} of {self.requested} tracks usable; this build "
            f"processed {self.processed} ({self.added} added, {self.skipped} skipped"
            f"{': ' + reasons if reasons else ''}) in {self.seconds:.1f} s"
        )
        if self.excluded:
            text += f"; {self.excluded} cached track(s) no longer meet min_seconds/silence_threshold_db, now skipped"
        if self.already_skipped:
            text += f"; {self.already_skipped} skipped earlier (unchanged, not retried)"
        if self.dropped:
            text += (f"; {self.dropped} more listed track(s) have no usable audio file (missing or empty; "
                     f"in {SKIP_REPORT_FILE} unless cached before)")
        if self.reclaimed_bytes:
            text += f"; deleted {self.reclaimed_bytes / 2**20:.1f} MB of superseded mels"
        if self.superseded_bytes:
            text += (f"; {self.superseded_bytes / 2**20:.1f} MB of superseded mels kept (in shards that also hold "
                     "current ones, or while the cache was open, in this process or another)")
        if self.crashed:
            text += f"; the decoder crashed on {_first_five(self.crashed)} (skipped; fix or remove, then rebuild with retry_skipped=True)"
        if self.decoder_warnings:
            paths = [path for path, _ in self.decoder_warnings]
            first_path, first_said = self.decoder_warnings[0]
            text += (f"; the decoder printed warnings for {len(paths)} file(s) it decoded, which are kept: "
                     f"{_first_five(paths)} ({first_path}: {first_said})")
        return text


def _first_five(paths: Sequence[str]) -> str:
    """``a, b, c, d, e and 3 more``."""
    more = len(paths) - 5
    return ", ".join(paths[:5]) + (f" and {more} more" if more > 0 else "")


# A track whose audio decodes to less than this fraction of the duration its dataset lists (MTG-Jamendo's
# DURATION, a tags file's duration column) is skipped as "truncated": an interrupted download of an MP3
# still decodes, to its first part only.
TRUNCATED_FRACTION = 0.5


@dataclass(frozen=True)
class _Task:
    track_id: str
    path: str
    settings: LogMelConfig
    min_samples: int
    silence_peak: float
    listed_samples: int | None = None  # the duration the dataset lists, in samples (None: not listed)


@dataclass
class _Result:
    track_id: str
    path: str
    size: int | None
    mtime_ns: int | None
    mel: np.ndarray | None = None  # (frames, n_mels) float16 when the track is usable
    samples: int = 0
    peak: float | None = None  # peak amplitude of the decoded audio, before normalisation
    reason: str = ""
    detail: str = ""
    listed_samples: int | None = None  # the listed length a "truncated" verdict was judged against
    decoder_output: str = ""  # what the decoder library printed while decoding (decoding processes only)


@dataclass(frozen=True)
class _Entry:
    shard: str
    offset: int
    frames: int
    samples: int
    path: str
    size: int | None
    mtime_ns: int | None  # None in manifests written before modification times were recorded
    peak: float | None  # None likewise
    rules: tuple[float, float]  # (min_seconds, silence_threshold_db) it was cached under
    committed_ns: int  # modification time of its manifest: when the entry was committed


@dataclass(frozen=True)
class _SkipRecord:
    track: SkippedTrack
    size: int | None
    mtime_ns: int | None
    rules: tuple[float, float]  # (min_seconds, silence_threshold_db) in force when it was skipped
    committed_ns: int
    listed_samples: int | None = None  # "truncated": the listed length it fell short of


@dataclass
class _State:
    """Committed contents of a cache folder, newest manifest winning for each track."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    skipped: dict[str, _SkipRecord] = field(default_factory=dict)
    shard_frames: dict[str, int] = field(default_factory=dict)
    last_number: int = 0
    skip_manifest: dict[str, str] = field(default_factory=dict)  # track id -> the manifest its skip record is in


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _file_stamp(path: Path) -> tuple[int | None, int | None]:
    """``(size, st_mtime_ns)`` of a regular file, ``(None, None)`` when there is none."""
    try:
        status = path.stat()
    except OSError:
        return None, None
    if not stat.S_ISREG(status.st_mode):
        return None, None
    return status.st_size, status.st_mtime_ns


def _same_file(
    size: int | None, mtime_ns: int | None, committed_ns: int, now: tuple[int | None, int | None]
) -> bool:
    """Whether a file whose stamp is ``now`` is still the one recorded as ``(size, mtime_ns)``.

    Size and modification time must both match: audio rewritten with the same length (same size)
    gets a new mtime. Entries of older manifests carry no mtime; for them the file must not have
    been modified after the manifest was committed (``committed_ns``), which catches any rewrite
    since that build without decoding every old entry again.
    """
    size_now, mtime_now = now
    if size is None or size_now is None:
        return size == size_now
    if size != size_now:
        return False
    if mtime_ns is not None:
        return mtime_now == mtime_ns
    return mtime_now is not None and mtime_now <= committed_ns


def _too_short_detail(path: str | Path, samples: int, min_samples: int, sample_rate: int) -> str:
    return f"{path}: {samples / sample_rate:.2f} s of audio, need at least {min_samples / sample_rate:.2f} s"


MILLISECONDS_HINT = "milliseconds? the duration column needs seconds"  # a truncated file's listed duration, x1000
# Of tracks skipped with that hint, in the build's summary and in its error when none is usable.
IN_MILLISECONDS = "list about 1000 times their audio's duration: give the duration column in seconds"


def _truncated(path: str | Path, samples: int, listed_samples: int | None, sample_rate: int) -> tuple[str, str] | None:
    """``("truncated", detail)`` when ``samples`` fall short of :data:`TRUNCATED_FRACTION` of the listed length."""
    if listed_samples is None or samples >= TRUNCATED_FRACTION * listed_samples:
        return None
    # About 1000 times the audio's length: a duration column in milliseconds (before: "a truncated download?" of
    # every track, as if the files were at fault).
    in_ms = 500 <= listed_samples / max(samples, 1) <= 2000
    why = MILLISECONDS_HINT if in_ms else "a truncated download? fetch the file again"
    return "truncated", (f"{path}: {samples / sample_rate:.2f} s of audio, but the dataset lists "
                         f"{listed_samples / sample_rate:.2f} s ({why})")


def _listed_samples(index: TrackIndex, sample_rate: int) -> list[int | None]:
    """Per track of ``index``, the duration its ``duration`` column lists in samples (None where it lists none)."""
    if "duration" not in index.tracks.columns:
        return [None] * len(index)
    listed = []
    for value in index.tracks["duration"]:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        samples = seconds * sample_rate
        listed.append(round(samples) if math.isfinite(samples) and samples > 0 else None)
    return listed


def _silent_detail(path: str | Path, peak: float, silence_peak: float) -> str:
    level = 20.0 * math.log10(peak) if peak > 0 else -math.inf
    return f"{path}: peak {level:.1f} dBFS, below the silence threshold {20 * math.log10(silence_peak):.1f} dBFS"


def _decode_reason(message: str) -> str:
    # load_audio raises one AudioError type; these messages are the cases worth their own code.
    if UNREADABLE in message:
        return "unreadable"
    if "zero samples" in message:
        return "zero_length"
    if "NaN or inf" in message:
        return "non_finite"
    return "undecodable"


# Set in decoding processes (_init_worker): there a file decodes on the one thread that works, so what
# is written to stderr meanwhile comes from decoding it (mpg123's "Note: Illegal Audio-MPEG-Header ...",
# written straight to file descriptor 2; a Python warning the decoding raises would be caught too) and
# is reported with the file instead of on the console.
_CAPTURE_DECODER_OUTPUT = False
_DECODER_OUTPUT_LIMIT = 65536  # bytes read back per file; a damaged file can print a line per frame
_decoder_sink = None


@contextmanager
def _decoder_output() -> Iterator[list[str]]:
    """Catch what C libraries write to stderr (file descriptor 2) in the block, in decoding processes;
    the list yielded holds the text once the block has ended (nothing elsewhere)."""
    global _decoder_sink
    caught: list[str] = []
    saved = None
    if _CAPTURE_DECODER_OUTPUT:
        # A capture that cannot be set up (no usable temporary folder, no stderr) decodes without one:
        # the file must not be skipped for it.
        try:
            if _decoder_sink is None:
                _decoder_sink = tempfile.TemporaryFile()
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(_decoder_sink.fileno(), 2)
        except (OSError, ValueError):
            if saved is not None:
                os.close(saved)
                saved = None
    try:
        yield caught
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
            try:
                _decoder_sink.seek(0)
                caught.append(_decoder_sink.read(_DECODER_OUTPUT_LIMIT).decode(errors="replace"))
                _decoder_sink.seek(0)
                _decoder_sink.truncate()
            except OSError:
                pass


def _decoder_said(text: str, lines: int = 2) -> str:
    """The first ``lines`` distinct lines of the decoder's output, on one line ("" for none)."""
    said = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not said:
        return ""
    shown = " / ".join(line[:160] for line in said[:lines])
    return shown + (f" (+{len(said) - lines} more lines)" if len(said) > lines else "")


def _compute_track(task: _Task) -> _Result:
    """Decode, check and transform one track. Never raises for a bad file: the result says why."""
    path = Path(task.path)
    # Stamped before decoding: a file rewritten while it is decoded then looks changed next time.
    size, mtime_ns = _file_stamp(path)
    result = _Result(track_id=task.track_id, path=task.path, size=size, mtime_ns=mtime_ns)
    if size is None:  # (before, path.exists() here raised for a name too long: the build stopped, losing its work)
        result.reason, result.detail = _no_file(path)
        return result
    if size == 0:
        result.reason, result.detail = "empty", f"{path}: empty file (0 bytes)"
        return result
    sample_rate = task.settings.sample_rate
    output: list[str] = []
    try:
        with _decoder_output() as output:
            audio = load_audio(path, sample_rate)
    except AudioError as error:
        result.reason, result.detail = _decode_reason(str(error)), str(error)
    except Exception as error:  # noqa: BLE001 - one bad file must never stop a build
        result.reason, result.detail = "failed", f"{path}: {type(error).__name__}: {error}"
        return result
    else:
        _judge_decoded(task, path, audio, result)
    result.decoder_output = _decoder_said("".join(output))
    # Undecodable, or decoded and then skipped (a damaged download decoded in part: "truncated").
    if result.reason and result.decoder_output:
        result.detail += f"; the decoder printed: {result.decoder_output}"
    return result


def _no_file(path: Path) -> tuple[str, str]:
    """The skip reason and detail of a ``path`` that is not a regular file; never raises."""
    try:
        status = path.stat()
    except PermissionError as error:  # (not as root) a folder on the way that may not be entered
        return "unreadable", f"{path}: cannot reach it ({error.strerror}); make its folders readable (chmod a+rx)"
    except OSError as error:  # no such file, a name too long, a file where a folder should be...
        return "missing", f"{path}: no such file" + ("" if error.errno == errno.ENOENT else f" ({error.strerror})")
    kind = "a folder" if stat.S_ISDIR(status.st_mode) else "not a regular file"
    return "missing", f"{path}: {kind}, not an audio file"


def _judge_decoded(task: _Task, path: Path, audio: np.ndarray, result: _Result) -> None:
    """Skip the decoded track (set ``result.reason`` and ``detail``) or store its log-mel."""
    sample_rate = task.settings.sample_rate
    result.samples = int(audio.shape[0])
    if audio.shape[0] < task.min_samples:
        result.reason = "too_short"
        result.detail = _too_short_detail(path, audio.shape[0], task.min_samples, sample_rate)
        return
    truncated = _truncated(path, result.samples, task.listed_samples, sample_rate)
    if truncated:
        result.reason, result.detail = truncated
        result.listed_samples = task.listed_samples
        return
    peak = float(np.max(np.abs(audio)))
    result.peak = peak
    if peak < task.silence_peak:
        result.reason, result.detail = "silent", _silent_detail(path, peak, task.silence_peak)
        return
    try:
        # (A chunk of frames at a time: the numbers of the module on the whole track, without its whole STFT.)
        stored = np.ascontiguousarray(task.settings.module().track(audio, peak).T, dtype=STORE_DTYPE)
    except Exception as error:  # noqa: BLE001
        result.reason, result.detail = "failed", f"{path}: log-mel failed: {type(error).__name__}: {error}"
        return
    if not np.isfinite(stored).all():
        result.reason, result.detail = "failed", f"{path}: log-mel has non-finite values after float16 conversion"
        return
    result.mel = stored


def _rejudge(
    entry: _Entry, rules: tuple[float, float], min_samples: int, silence_peak: float, sample_rate: int,
    listed_samples: int | None = None,
) -> tuple[str, str] | str | None:
    """A cached track against the current skipping rules and its listed duration, from its stored
    length and peak.

    ``None``: still usable; ``(reason, detail)``: skip it now; ``"decode"``: an entry of an older
    manifest has no stored peak and the silence threshold is stricter than the one it passed, so only
    decoding can tell.
    """
    if entry.samples < min_samples:
        return "too_short", _too_short_detail(entry.path, entry.samples, min_samples, sample_rate)
    truncated = _truncated(entry.path, entry.samples, listed_samples, sample_rate)
    if truncated:
        return truncated
    if entry.peak is not None:
        if entry.peak < silence_peak:
            return "silent", _silent_detail(entry.path, entry.peak, silence_peak)
        return None
    return "decode" if rules[1] > entry.rules[1] else None


def _refuse_while_importing_main() -> None:
    """Fail at once when a decoding worker, while importing the caller's main module, reaches a build.

    Workers start with ``spawn``: each imports the parent's ``__main__``, so a script that builds at
    module level builds again inside every worker. Such a worker would wait for the cache lock that
    its parent holds while the parent waits for the worker: a silent hang. (The flag is the one
    :mod:`multiprocessing` itself checks before it lets a half-started process start others.)
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise MelCacheError(
            "a mel cache build was started while a decoding process was importing your script: the code that "
            "builds it (e.g. prepare_data or MelCache.build) runs at import; put it under "
            "`if __name__ == \"__main__\":`, or pass workers=0"
        )


def _init_worker() -> None:
    # One torch thread per worker: the pool already uses every core, more threads would oversubscribe.
    torch.set_num_threads(1)
    global _CAPTURE_DECODER_OUTPUT
    _CAPTURE_DECODER_OUTPUT = True


def _worker_ready() -> int:
    """A task that needs no file: it tells a process that cannot start from one that a file kills."""
    return os.getpid()


def _new_pool(workers: int) -> ProcessPoolExecutor:
    # Spawned; its processes ignore Ctrl-C, which the parent handles: the pool is ended at once
    # (terminate(): the tracks in flight are dropped, decoded again next time) and what is finished is
    # committed.
    return SpawnPool(workers, _init_worker)


def _crashed(task: _Task) -> _Result:
    size, mtime_ns = _file_stamp(Path(task.path))
    return _Result(
        track_id=task.track_id,
        path=task.path,
        size=size,
        mtime_ns=mtime_ns,
        reason="crashed",
        detail=(
            f"{task.path}: the decoding process died while processing this file, also when it was retried alone "
            "(a crash in the decoder, or out of memory); fix or remove the file, then rebuild with retry_skipped=True"
        ),
    )


def _isolate(suspects: Sequence[_Task]) -> Iterator[_Result]:
    """Results of the tasks that were in flight when a pool broke, each run alone in a one-process pool.

    A task that kills its process again is the culprit: its result says ``crashed``. The others (the
    innocent neighbours of a crash, or files that ran out of memory only beside others) come out as
    usual. Raises :class:`BrokenProcessPool` if a fresh process dies before it is given any file
    (e.g. while importing the caller's script): then no file is to blame.
    """
    pool: ProcessPoolExecutor | None = None
    try:
        for task in suspects:
            if pool is None:
                pool = _new_pool(1)
                pool.submit(_worker_ready).result()
            try:
                result = pool.submit(_compute_track, task).result()
            except BrokenProcessPool:
                pool.shutdown(wait=True)
                pool = None
                result = _crashed(task)
            yield result
    except BaseException:  # the caller stopped (Ctrl-C, an error): what is in flight would be dropped anyway
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _iterate_results(tasks: Sequence[_Task], workers: int) -> Iterator[_Result]:
    """Results of ``tasks`` in completion order; in-process when ``workers == 0``.

    When a decoding process dies, the pool is broken and every task it held fails with it; those
    tasks go through :func:`_isolate` and the rest continue in a new pool.
    """
    if workers == 0:
        for task in tasks:
            yield _compute_track(task)
        return
    queue = iter(tasks)
    exhausted = False
    while True:
        pool = _new_pool(workers)
        in_flight: dict[Future, _Task] = {}
        broken = False
        try:
            while not broken:
                # A bounded window keeps memory flat however many tracks there are.
                while not exhausted and len(in_flight) < 2 * workers:
                    task = next(queue, None)
                    if task is None:
                        exhausted = True
                        break
                    try:
                        in_flight[pool.submit(_compute_track, task)] = task
                    except BrokenProcessPool:
                        # A process died while no one was waiting (e.g. during a shard commit): this
                        # task never ran, so it goes to the next pool; those in flight are the suspects.
                        queue = itertools.chain([task], queue)
                        broken = True
                        break
                if broken:
                    break
                if not in_flight:
                    return
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    if isinstance(future.exception(), BrokenProcessPool):
                        broken = True  # kept in flight: it is one of the suspects
                        continue
                    del in_flight[future]
                    yield future.result()
        except BaseException:  # the caller stopped (Ctrl-C, an error): what is in flight would be dropped anyway
            pool.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after terminate(): nothing left to do
        # Tasks that finished before the pool broke keep their results; the others are suspects.
        suspects = []
        for future, task in in_flight.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                yield future.result()
            else:
                suspects.append(task)
        yield from _isolate(suspects)


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _atomic_write_bytes(path: Path, payload: bytes, mtime_ns: int | None = None) -> None:
    """Write ``path`` whole or not at all (a temporary file, renamed); with ``mtime_ns``, the file has that
    modification time from the moment it appears."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as stream:
        stream.write(payload)
        stream.flush()
        os.fsync(stream.fileno())
    if mtime_ns is not None:
        os.utime(temporary, ns=(mtime_ns, mtime_ns))
    os.replace(temporary, path)


def _shard_number(name: str) -> int | None:
    match = _SHARD_PATTERN.match(name)
    return int(match.group(1)) if match else None


def _read_state(folder: Path, n_mels: int) -> _State:
    """Committed entries of ``folder``: every manifest in shard order, later ones overriding earlier."""
    state = _State()
    manifests = sorted(
        (number, path) for path in folder.glob("shard-*.json") if (number := _shard_number(path.name)) is not None
    )
    for number, manifest_path in manifests:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise MelCacheError(
                f"{manifest_path}: unreadable manifest ({error}); delete it and rebuild to recompute its tracks"
            ) from None
        shard = manifest.get("data")
        if shard is not None:
            expected = int(manifest["total_frames"]) * n_mels * STORE_DTYPE.itemsize
            found = _file_size(folder / shard)
            if found != expected:
                raise MelCacheError(
                    f"{folder / shard}: expected {expected} bytes, found {found}; the shard is damaged. "
                    f"Delete {manifest_path.name} and rebuild to recompute its tracks"
                )
            state.shard_frames[shard] = int(manifest["total_frames"])
        rules = (float(manifest["min_seconds"]), float(manifest["silence_threshold_db"]))
        committed_ns = manifest_path.stat().st_mtime_ns
        # "mtime_ns" and "peak" are absent from manifests written before they were recorded.
        for track in manifest["tracks"]:
            track_id = track["track_id"]
            peak = track.get("peak")
            state.skip_manifest.pop(track_id, None)
            state.entries[track_id] = _Entry(
                shard,
                int(track["offset"]),
                int(track["frames"]),
                int(track["samples"]),
                track["path"],
                track["size"],
                track.get("mtime_ns"),
                None if peak is None else float(peak),
                rules,
                committed_ns,
            )
            state.skipped.pop(track_id, None)
        for skip in manifest["skipped"]:
            track_id = skip["track_id"]
            record = SkippedTrack(track_id, skip["path"], skip["reason"], skip["detail"])
            state.skipped[track_id] = _SkipRecord(record, skip["size"], skip.get("mtime_ns"), rules, committed_ns,
                                                  skip.get("listed_samples"))
            state.skip_manifest[track_id] = manifest_path.name
            state.entries.pop(track_id, None)
        state.last_number = number
    return state


class _ShardWriter:
    """Appends batches of results to a cache folder as committed shards (data first, manifest last)."""

    def __init__(self, folder: Path, n_mels: int, first_number: int, rules: tuple[float, float]) -> None:
        self.folder = folder
        self.n_mels = n_mels
        self.next_number = first_number
        self.rules = rules

    def commit(self, results: list[_Result]) -> None:
        number = self.next_number
        try:
            self._commit(results)
        except Exception as error:
            # What the failed commit wrote goes at once (a full disk stays full otherwise, until the next build
            # would remove it): its temporary files, and its data file when its manifest never landed.
            if not (self.folder / f"shard-{number:06d}.json").exists():
                for name in (f"shard-{number:06d}.bin.tmp", f"shard-{number:06d}.bin", f"shard-{number:06d}.json.tmp"):
                    with contextlib.suppress(OSError):
                        (self.folder / name).unlink()
            if isinstance(error, OSError) and error.filename is None:  # a failed write names no file (disk full,
                raise OSError(error.errno, error.strerror, str(self.folder)) from error  # file too large): the cache
            raise

    def _commit(self, results: list[_Result]) -> None:
        if not results:
            return
        number = self.next_number
        self.next_number += 1
        usable = [result for result in results if result.mel is not None]
        data_name = f"shard-{number:06d}.bin" if usable else None
        tracks, offset = [], 0
        if data_name is not None:
            temporary = self.folder / f"{data_name}.tmp"
            with open(temporary, "wb") as stream:
                for result in usable:
                    stream.write(result.mel.tobytes())
                    tracks.append(
                        {
                            "track_id": result.track_id,
                            "path": result.path,
                            "size": result.size,
                            "mtime_ns": result.mtime_ns,
                            "offset": offset,
                            "frames": int(result.mel.shape[0]),
                            "samples": result.samples,
                            "peak": result.peak,
                        }
                    )
                    offset += int(result.mel.shape[0])
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.folder / data_name)
        manifest = {
            "format_version": FORMAT_VERSION,
            "data": data_name,
            "total_frames": offset,
            "n_mels": self.n_mels,
            "min_seconds": self.rules[0],
            "silence_threshold_db": self.rules[1],
            "tracks": tracks,
            "skipped": [
                {
                    "track_id": r.track_id,
                    "path": r.path,
                    "size": r.size,
                    "mtime_ns": r.mtime_ns,
                    "reason": r.reason,
                    "detail": r.detail,
                    **({"listed_samples": r.listed_samples} if r.reason == "truncated" else {}),
                }
                for r in results
                if r.mel is None
            ],
        }
        # The manifest's rename is the commit point: before it, nothing of this batch is visible.
        _atomic_write_bytes(self.folder / f"shard-{number:06d}.json", json.dumps(manifest).encode())
        _fsync_directory(self.folder)


class MelCache:
    """Read access to a built mel cache. Build with :meth:`build`, open with :meth:`open`.

    ``get(track_id, start_frame, num_frames)`` returns ``(n_mels, num_frames)`` float32 dB values
    read straight from a memory map. Safe to pickle (DataLoader workers reopen the maps lazily).
    """

    def __init__(self, path: Path, settings: LogMelConfig, state: _State) -> None:
        self.path = Path(path)
        self.settings = settings
        self._entries = state.entries
        self._skipped = {track_id: record.track for track_id, record in state.skipped.items()}
        self._shard_frames = state.shard_frames
        self._track_ids = sorted(self._entries)
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self.build_report: BuildReport | None = None
        self._reader_lock: Any = None  # see READERS_LOCK_FILE; set by open()

    # ----------------------------------------------------------------------------------- locating
    @staticmethod
    def location(cache_dir: str | Path, front_end: LogMelConfig | None = None) -> Path:
        """The folder that holds the cache for ``front_end`` under ``cache_dir``."""
        return Path(cache_dir) / (front_end or LogMelConfig()).cache_key()

    @classmethod
    def open(cls, source: str | Path | MelCache, front_end: LogMelConfig | None = None) -> MelCache:
        """Open a built cache.

        ``source`` is a cache folder (holding ``settings.json``), a root passed to :meth:`build` (then
        ``front_end`` picks the folder; without it the root must hold exactly one cache), or a
        :class:`MelCache` (reopened, seeing any shards committed since).
        """
        if isinstance(source, MelCache):
            source = source.path
        root = Path(source)
        if (root / SETTINGS_FILE).is_file():
            folder = root
        elif front_end is not None:
            folder = cls.location(root, front_end)
        else:
            candidates = sorted(path.parent for path in root.glob(f"*/{SETTINGS_FILE}"))
            if len(candidates) != 1:
                found = ", ".join(path.name for path in candidates) or "none"
                raise MelCacheError(
                    f"{root}: expected one mel cache folder, found {found}; pass front_end=LogMelConfig(...) "
                    f"or the cache folder itself, or build one with MelCache.build(index, {str(root)!r})"
                )
            folder = candidates[0]
        if not (folder / SETTINGS_FILE).is_file():
            raise MelCacheError(
                f"{folder}: no mel cache here; build it with MelCache.build(index, cache_dir, front_end)"
            )
        stored = json.loads((folder / SETTINGS_FILE).read_text())
        if stored.get("format_version") != FORMAT_VERSION:
            raise MelCacheError(
                f"{folder}: cache format {stored.get('format_version')} but this code reads format {FORMAT_VERSION}; "
                "delete the folder and rebuild"
            )
        settings = LogMelConfig.from_canonical(stored)
        if front_end is not None and settings.canonical() != front_end.canonical():
            raise MelCacheError(f"{folder}: built with {settings}, not the requested {front_end}")
        reader_lock = _hold_as_reader(folder)  # before the state is read: its shards stay while this reads
        cache = cls(folder, settings, _read_state(folder, settings.n_mels))
        cache._reader_lock = reader_lock
        return cache

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        index: TrackIndex,
        cache_dir: str | Path,
        front_end: LogMelConfig | Mapping[str, Any] | None = None,
        *,
        workers: int | None = None,
        min_seconds: float = 4.0,
        silence_threshold_db: float = -80.0,
        retry_skipped: bool = False,
        commit_every_seconds: float = 20.0,
        commit_every_bytes: int = 128 * 2**20,
        progress: bool = True,
        verbose: bool = True,
        lock_timeout: float = 900.0,
        dropped: Sequence[Mapping[str, Any]] = (),
    ) -> MelCache:
        """Cache the log-mel of every track of ``index`` under ``cache_dir`` and open the cache.

        Only tracks not cached yet, or whose audio file changed (size or modification time) or is another
        path than the one cached, are decoded; a cached track whose file has gone keeps its mel. Unusable
        files (missing, empty, undecodable, zero-length, non-finite, shorter than ``min_seconds``, peak
        below ``silence_threshold_db`` dBFS, decoding to under :data:`TRUNCATED_FRACTION` of the duration
        the index's ``duration`` column lists, or crashing the decoding process) are skipped, listed in
        ``skipped.csv`` with their reason and counted on the console; they are retried only when their file,
        its path or these rules change, or with ``retry_skipped=True``. The rules apply to cached tracks
        too, judged from their stored length and peak without decoding: a cached track that they now exclude
        becomes skipped. Finished tracks are committed at least every ``commit_every_seconds``, so an
        interrupted build loses little and resumes where it stopped. A build of the same folder by another
        process is waited for while it commits work (it decodes what this one would); ``lock_timeout``
        seconds without a commit from it are an error.

        ``dropped``: tracks the dataset lists but its loader left out of ``index`` because their audio
        file is missing or empty (the loaders' ``index.extra["missing"]``: dicts with ``track_id``,
        ``path`` and ``reason``). They are recorded as skipped, so that ``skipped.csv`` lists every
        unusable file of the dataset; one cached before keeps its mel.

        Caches written before modification times and peaks were stored still open and build: such an
        entry is trusted while its file's size is unchanged and the file was not modified after the
        entry was committed, and it is decoded again only if ``silence_threshold_db`` is now stricter
        than the threshold it was cached under.

        ``front_end``: a :class:`LogMelConfig` or a dict of its fields (default: the study's front-end
        with ``f_max`` at Nyquist). ``workers``: decoding processes (default: one per CPU this process may use), started with
        ``spawn``, so a script calling this must do so under ``if __name__ == "__main__":``; 0 decodes
        in this process. Raises :class:`MelCacheError` when none of the index's tracks is usable.
        """
        started = time.monotonic()
        _refuse_while_importing_main()
        if isinstance(front_end, Mapping):
            front_end = LogMelConfig(**front_end)
        settings = front_end or LogMelConfig()
        if not isinstance(index, TrackIndex):
            raise TypeError(f"index must be a TrackIndex, got {type(index).__name__}")
        if len(index) == 0:
            raise MelCacheError(f"track index {index.name!r} has no tracks; nothing to cache")
        if min_seconds < 0:
            raise ValueError(f"min_seconds must be >= 0, got {min_seconds}")
        workers = usable_cpus() if workers is None else int(workers)
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        folder = cls.location(cache_dir, settings)
        folder.mkdir(parents=True, exist_ok=True)
        rules = (float(min_seconds), float(silence_threshold_db))
        with open(folder / LOCK_FILE, "a") as lock:
            _wait_for_lock(lock, folder, lock_timeout, verbose)
            # The lock is released when the file closes, also when this process dies.
            report = cls._build_locked(
                index,
                folder,
                settings,
                workers,
                rules,
                retry_skipped,
                commit_every_seconds,
                commit_every_bytes,
                progress,
                dropped,
            )
        report.seconds = time.monotonic() - started
        cache = cls.open(folder)
        cache.build_report = report
        if verbose:
            print(report.summary())
            # This index's skipped tracks (the cache may also remember files of tracks no longer listed).
            listed_ids = [*index.track_ids, *(str(track["track_id"]) for track in dropped)]
            skipped = [cache._skipped[t] for t in dict.fromkeys(listed_ids) if t in cache._skipped]
            if skipped:
                counts = Counter(track.reason for track in skipped)
                reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
                in_ms = sum(MILLISECONDS_HINT in track.detail for track in skipped)
                print(f"mel cache: {len(skipped)} of this dataset's file(s) skipped in all ({reasons}); see "
                      f"{folder / SKIP_REPORT_FILE}" + (f" ({in_ms} {IN_MILLISECONDS})" if in_ms else ""))
        if report.usable == 0:
            skipped = [cache._skipped[t] for t in index.track_ids if t in cache._skipped]
            reasons = Counter(track.reason for track in skipped)
            in_ms = sum(MILLISECONDS_HINT in track.detail for track in skipped)
            hint = f"; {in_ms} of them {IN_MILLISECONDS}" if in_ms else ""
            raise MelCacheError(
                f"none of the {len(index)} tracks of index {index.name!r} is usable ({dict(reasons)}){hint}; "
                f"see {folder / SKIP_REPORT_FILE} for each file and reason"
            )
        return cache

    @classmethod
    def _build_locked(
        cls,
        index: TrackIndex,
        folder: Path,
        settings: LogMelConfig,
        workers: int,
        rules: tuple[float, float],
        retry_skipped: bool,
        commit_every_seconds: float,
        commit_every_bytes: int,
        progress: bool,
        dropped: Sequence[Mapping[str, Any]] = (),
    ) -> BuildReport:
        settings_path = folder / SETTINGS_FILE
        if settings_path.is_file():
            stored = json.loads(settings_path.read_text())
            if stored != settings.canonical():
                raise MelCacheError(
                    f"{settings_path}: settings {stored} do not match the folder's key; delete the folder"
                )
        else:
            _atomic_write_bytes(settings_path, json.dumps(settings.canonical(), indent=2, sort_keys=True).encode())
        # Leftovers of an interrupted build: temporary files and data files whose manifest never landed.
        committed = {path.name for path in folder.glob("shard-*.json")}
        highest = 0
        for path in folder.iterdir():
            number = _shard_number(path.name)
            if number is None:
                continue
            highest = max(highest, number)
            orphan = path.name.endswith(".bin") and f"shard-{number:06d}.json" not in committed
            if path.name.endswith(".tmp") or orphan:
                path.unlink()
        state = _read_state(folder, settings.n_mels)
        for path in folder.glob("shard-*.bin"):  # a data file no manifest names: its deletion was cut short
            if path.name not in state.shard_frames:
                path.unlink()

        tasks: list[_Task] = []
        excluded: list[_Result] = []  # cached tracks that the current rules skip, judged without decoding
        already_cached = already_skipped = 0
        min_samples = round(rules[0] * settings.sample_rate)
        silence_peak = 10.0 ** (rules[1] / 20.0)
        for track_id, path, listed_samples in zip(index.track_ids, index.paths,
                                                  _listed_samples(index, settings.sample_rate)):
            now = _file_stamp(Path(path))
            entry = state.entries.get(track_id)
            # A missing file keeps its cached mel (the point of a cache); a changed one means new audio, and
            # so does another path (the id re-pointed to another file, which may share size and mtime).
            if entry is not None and entry.path != path:
                entry = None
            unchanged = entry is not None and _same_file(entry.size, entry.mtime_ns, entry.committed_ns, now)
            if entry is not None and (now[0] is None or unchanged):
                verdict = _rejudge(entry, rules, min_samples, silence_peak, settings.sample_rate, listed_samples)
                if verdict is None:
                    already_cached += 1
                elif verdict == "decode":
                    if now[0] is None:  # nothing to decode: keep the mel, as for any missing file
                        already_cached += 1
                    else:
                        tasks.append(_Task(track_id, path, settings, min_samples, silence_peak, listed_samples))
                else:
                    size, mtime_ns = now if now[0] is not None else (entry.size, entry.mtime_ns)
                    reason, detail = verdict
                    excluded.append(_Result(track_id, path, size, mtime_ns, reason=reason, detail=detail,
                                            listed_samples=listed_samples))
                continue
            record = state.skipped.get(track_id)
            # A file skipped as truncated is judged again when the duration its dataset lists changes.
            if (not retry_skipped and _record_stands(record, rules, path, now)
                    and (record.track.reason != "truncated" or record.listed_samples == listed_samples)):
                already_skipped += 1
                continue
            tasks.append(_Task(track_id, path, settings, min_samples, silence_peak, listed_samples))
        listed = set(index.track_ids)
        for track in dropped:
            track_id, path = str(track["track_id"]), str(track["path"])
            if track_id in listed or track_id in state.entries:
                continue  # a cached mel outlives its file (as above); the index does not use it
            now = _file_stamp(Path(path))
            if track.get("reason") == "empty" and now[0] == 0:
                reason, detail = "empty", f"{path}: empty file (0 bytes)"
            elif now[0] is not None:  # a file there now (arrived since the loader looked): missing when listed
                reason, detail = "missing", f"{path}: no such file"
            else:  # why: no such file, a folder, a folder on the way that may not be entered, a name too long...
                reason, detail = _no_file(Path(path))
            record = state.skipped.get(track_id)
            if _record_stands(record, rules, path, now) and record.track.reason == reason:
                continue  # recorded by an earlier build
            excluded.append(_Result(track_id, path, *now, reason=reason, detail=detail))

        writer = _ShardWriter(folder, settings.n_mels, max(highest, state.last_number) + 1, rules)
        writer.commit(excluded)
        reasons: Counter[str] = Counter()
        crashed: list[str] = []
        decoder_warnings: list[tuple[str, str]] = []
        added = 0
        pending: list[_Result] = []
        pending_bytes = 0
        last_commit = time.monotonic()
        bar = progress_bar(total=len(tasks), desc="mel cache", unit="track", disable=not progress or not tasks,
                           mininterval=0.5)
        results = _iterate_results(tasks, min(workers, len(tasks)))
        try:
            for result in results:
                pending.append(result)
                if result.mel is None:
                    reasons[result.reason] += 1
                    if result.reason == "crashed":
                        crashed.append(result.path)
                else:
                    added += 1
                    pending_bytes += result.mel.nbytes
                    if result.decoder_output:
                        decoder_warnings.append((result.path, result.decoder_output))
                bar.set_postfix(skipped=sum(reasons.values()), refresh=False)  # (before the update, which may draw it)
                bar.update(1)
                if pending_bytes >= commit_every_bytes or time.monotonic() - last_commit >= commit_every_seconds:
                    writer.commit(pending)
                    pending, pending_bytes, last_commit = [], 0, time.monotonic()
        except KeyboardInterrupt:
            # Keep the finished work; an interrupt during this commit leaves only temp files or an orphan.
            writer.commit(pending)
            pending = []
            raise
        except BrokenProcessPool:
            # Raised only when a fresh decoding process dies before it is given a file (see _isolate);
            # a process that dies on a file instead records that file as skipped ("crashed").
            writer.commit(pending)
            pending = []
            raise MelCacheError(
                f"a decoding process died as it started, before it was given any file (if it printed an error "
                f"while importing your script, the build is not under `if __name__ == \"__main__\":`; else out of "
                f"memory?); {added} tracks were saved. Rebuild to resume, with fewer workers if memory is short"
            ) from None
        finally:
            try:
                results.close()  # stops the pool now, not when the traceback is collected
            finally:
                bar.close()
        writer.commit(pending)

        final = _read_state(folder, settings.n_mels)
        _write_skip_report(folder / SKIP_REPORT_FILE, [record.track for record in final.skipped.values()])
        reclaimed, superseded = _reclaim_superseded(folder, final, settings.n_mels)
        return BuildReport(
            cache_path=folder,
            requested=len(index),
            already_cached=already_cached,
            already_skipped=already_skipped,
            processed=len(tasks),
            added=added,
            skipped=sum(reasons.values()),
            skip_reasons=dict(reasons),
            usable=sum(track_id in final.entries for track_id in index.track_ids),
            seconds=0.0,
            excluded=sum(result.track_id in listed for result in excluded),
            crashed=crashed,
            dropped=len(dropped),
            decoder_warnings=decoder_warnings,
            reclaimed_bytes=reclaimed,
            superseded_bytes=superseded,
        )

    # ------------------------------------------------------------------------------------- reading
    @property
    def track_ids(self) -> list[str]:
        """Cached track ids, sorted (independent of the order tracks finished decoding)."""
        return list(self._track_ids)

    @property
    def n_mels(self) -> int:
        return self.settings.n_mels

    @property
    def skipped(self) -> list[SkippedTrack]:
        """Every skipped file with its reason, sorted by track id."""
        return [self._skipped[track_id] for track_id in sorted(self._skipped)]

    def skip_report(self) -> pd.DataFrame:
        """The skipped files as a table: ``track_id, path, reason, detail``."""
        return pd.DataFrame(
            [dataclasses.asdict(track) for track in self.skipped], columns=["track_id", "path", "reason", "detail"]
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self._entries

    def __repr__(self) -> str:
        return f"MelCache({str(self.path)!r}, tracks={len(self)}, skipped={len(self._skipped)})"

    def _entry(self, track_id: str) -> _Entry:
        try:
            return self._entries[track_id]
        except KeyError:
            reason = self._skipped.get(track_id)
            why = f"it was skipped: {reason.reason} ({reason.detail})" if reason else "it was never cached"
            raise KeyError(f"track {track_id!r} is not in the mel cache {self.path}: {why}") from None

    def audio_record(self, track_id: str) -> tuple:
        """What identifies a track's audio as this cache holds it: ``(shard, offset, frames, samples,
        size, mtime_ns)``, where its log-mel lies and the size and modification time of the file it was
        decoded from (``None`` for the last two in manifests older than those records). A file changed
        since (size or modification time) is decoded again into a new shard, so its record changes; an
        unchanged cache keeps it. For keys of results derived from the mels (``analysis.downstream``)."""
        entry = self._entry(track_id)
        return (entry.shard, entry.offset, entry.frames, entry.samples, entry.size, entry.mtime_ns)

    def frames(self, track_id: str) -> int:
        """Number of mel frames of the track (``samples // hop_length + 1``)."""
        return self._entry(track_id).frames

    def duration(self, track_id: str) -> float:
        """Decoded length of the track in seconds."""
        return self._entry(track_id).samples / self.settings.sample_rate

    def _shard_array(self, shard: str) -> np.ndarray:
        array = self._maps.get(shard)
        if array is None:
            # Copy-on-write mapping: reads share the page cache like a read-only map, and the arrays are
            # writeable in numpy's eyes, so torch.from_numpy takes them without a warning. Nothing writes.
            mapped = np.memmap(
                self.path / shard, dtype=STORE_DTYPE, mode="c", shape=(self._shard_frames[shard], self.n_mels)
            )
            array = mapped.view(np.ndarray)  # plain-array slicing is cheaper; the view keeps the map alive
            self._maps[shard] = array
            if len(self._maps) > _OPEN_SHARDS_PER_PROCESS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return array

    def get(self, track_id: str, start_frame: int, num_frames: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frames ``start_frame .. start_frame + num_frames - 1`` of a track, ``(n_mels, num_frames)`` float32.

        Reads only those frames. ``out`` (float32, that shape) receives them instead of a new array.
        """
        entry = self._entry(track_id)
        start_frame, num_frames = int(start_frame), int(num_frames)
        if num_frames <= 0 or start_frame < 0 or start_frame + num_frames > entry.frames:
            raise IndexError(
                f"frames [{start_frame}, {start_frame + num_frames}) are outside track {track_id!r} "
                f"(0 to {entry.frames})"
            )
        first = entry.offset + start_frame
        block = self._shard_array(entry.shard)[first : first + num_frames]
        if out is None:
            out = np.empty((self.n_mels, num_frames), dtype=np.float32)
        elif out.shape != (self.n_mels, num_frames) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {(self.n_mels, num_frames)}, got {out.dtype} {out.shape}")
        # torch converts float16 -> float32 and transposes in one pass, about twice as fast as numpy.
        torch.from_numpy(out).copy_(torch.from_numpy(block).T)
        return out

    def get_track(self, track_id: str) -> np.ndarray:
        """The whole track's log-mel, ``(n_mels, frames)`` float32."""
        return self.get(track_id, 0, self.frames(track_id))

    def __getstate__(self) -> dict:
        # Memory maps do not pickle usefully; each process maps the shards it reads (and holds its own
        # readers' lock: the shards this state names stay while any process reads them).
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        state["_reader_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reader_lock = _hold_as_reader(self.path)


def _hold_as_reader(folder: Path) -> Any:
    """Open and share-lock the cache's readers' lock (None where that cannot be done, e.g. a read-only
    cache: no build deletes shards there either). The lock lasts as long as the returned file is open."""
    try:
        handle = open(folder / READERS_LOCK_FILE, "a")
    except OSError:
        try:  # a cache this user may read but not write: a shared lock needs no write access
            handle = open(folder / READERS_LOCK_FILE)
        except OSError:
            return None
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
    except OSError:
        handle.close()
        return None
    return handle


def _reclaim_superseded(folder: Path, state: _State, n_mels: int) -> tuple[int, int]:
    """:func:`_delete_superseded`, best effort: the build's work is committed, and a shard this user may
    not delete (a shared cache) is left as it is."""
    try:
        return _delete_superseded(folder, state, n_mels)
    except (OSError, ValueError, KeyError) as error:
        logger.warning("mel cache %s: superseded mels not deleted (%s); the next build tries again", folder, error)
        return 0, 0


def _delete_superseded(folder: Path, state: _State, n_mels: int) -> tuple[int, int]:
    """Delete the shards no current entry reads: ``(bytes deleted, superseded bytes kept)``.

    A re-decoded track's new mel goes to a new shard (shards are never rewritten); its old mel stays where
    it was. A data file none of whose mels is current is deleted, and its manifest with it, or rewritten
    to the skip records in it that are current (keeping its modification time, which older entries'
    checks read). Only when no process has the cache open (see :data:`READERS_LOCK_FILE`): a reader's state
    may name those shards. Called under the build lock, with ``state`` read after the build's commits.
    """
    manifests = sorted((number, path) for path in folder.glob("shard-*.json")
                       if (number := _shard_number(path.name)) is not None)
    current_frames: Counter[str] = Counter()
    for entry in state.entries.values():
        current_frames[entry.shard] += entry.frames
    with_current_skips = set(state.skip_manifest.values())
    row_bytes = n_mels * STORE_DTYPE.itemsize
    stale: list[tuple[Path, str | None]] = []  # (manifest, its data file); ``state`` read them all already
    superseded = 0
    for number, path in manifests:
        data = f"shard-{number:06d}.bin" if f"shard-{number:06d}.bin" in state.shard_frames else None
        if data in current_frames:  # kept whole: its superseded mels are counted, not deleted
            superseded += (state.shard_frames[data] - current_frames[data]) * row_bytes
        elif data is not None or (path.name not in with_current_skips and number != state.last_number):
            stale.append((path, data))
    if not stale:
        return 0, superseded
    kept = superseded + sum(_file_size(folder / data) or 0 for _, data in stale if data is not None)
    try:
        lock = open(folder / READERS_LOCK_FILE, "a")
    except OSError:
        return 0, kept
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # open elsewhere (a search's trials, say): kept for a later build
            return 0, kept
        reclaimed = 0
        current_skips = {name: [] for name in state.skip_manifest.values()}
        for track_id, name in state.skip_manifest.items():
            current_skips[name].append(track_id)
        for path, data in stale:
            keep = set(current_skips.get(path.name, ()))
            if keep or _shard_number(path.name) == state.last_number:  # the newest stays: shard numbers only grow
                status = path.stat()
                manifest = json.loads(path.read_text())
                manifest = {**manifest, "data": None, "total_frames": 0, "tracks": [],
                            "skipped": [skip for skip in manifest["skipped"] if skip["track_id"] in keep]}
                # Its modification time set before the rename: no crash leaves it with a new one
                _atomic_write_bytes(path, json.dumps(manifest).encode(), mtime_ns=status.st_mtime_ns)
            else:
                path.unlink()  # first the manifest (the commit), then its data: an orphan is deleted later
            if data is not None:
                reclaimed += _file_size(folder / data) or 0
                (folder / data).unlink(missing_ok=True)
        _fsync_directory(folder)
    return reclaimed, superseded


def _record_stands(
    record: _SkipRecord | None, rules: tuple[float, float], path: str, now: tuple[int | None, int | None]
) -> bool:
    """Whether an earlier skip still holds: made under the same rules, for the same path, the file unchanged,
    and for the file's own fault (a file that could not be opened, its permissions since corrected perhaps
    without changing its size or time, is tried again)."""
    return (record is not None and record.track.reason != "unreadable" and record.rules == rules
            and record.track.path == path
            and _same_file(record.size, record.mtime_ns, record.committed_ns, now))


def _last_commit_ns(folder: Path) -> int:
    """When the folder's newest shard file was written (0 if none): a build writes one at least every
    ``commit_every_seconds`` while it makes progress."""
    latest = 0
    try:
        for path in folder.iterdir():
            if path.name.startswith("shard-"):
                try:
                    latest = max(latest, path.stat().st_mtime_ns)
                except OSError:
                    pass  # renamed or removed meanwhile
    except OSError:
        pass
    return latest


def _wait_for_lock(lock, folder: Path, timeout: float, verbose: bool) -> None:
    """Take the build lock, waiting for another process's build while it makes progress: it decodes
    tracks this build wants too (a cache can serve several indexes, e.g. MTG-Jamendo's subsets), so
    this one then finds them cached. Gives up after ``timeout`` seconds in which the other build
    committed nothing (a hung or stopped builder), however long it has been running. Where the file
    system cannot lock files, the build goes on without the lock and says so."""
    deadline = time.monotonic() + timeout
    seen = _last_commit_ns(folder)
    announced = False
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            latest = _last_commit_ns(folder)
            if latest != seen:
                seen, deadline = latest, time.monotonic() + timeout
            if time.monotonic() >= deadline:
                raise MelCacheError(
                    f"{folder}: another process holds this cache's build lock and has committed nothing for "
                    f"over {timeout:.0f} s; if it is stuck, stop it, then run again"
                ) from None
            if verbose and not announced:
                print(f"{folder}: another process is building this cache; waiting for it", flush=True)
                announced = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        except OSError as error:  # a file system that cannot lock files (some NFS or Lustre mounts)
            logger.warning("mel cache %s: this file system cannot lock files (%s); building without the lock, so "
                           "do not build this cache from two processes at once", folder, error.strerror or error)
            return


def _write_skip_report(path: Path, skipped: list[SkippedTrack]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["track_id", "path", "reason", "detail"])
    for track in sorted(skipped, key=lambda item: item.track_id):
        writer.writerow([track.track_id, track.path, track.reason, track.detail])
    _atomic_write_bytes(path, buffer.getvalue().encode())
