"""Multi-view sampling from the mel cache: training views, a fixed probe set, per-track segments.

Frame arithmetic (one convention everywhere, the one :class:`musicssl.audio.LogMel` uses):

* a segment of ``s`` seconds is ``round(s * sample_rate) // hop_length + 1`` frames (126 for 4 s at
  16 kHz, hop 512), the frame count of a centred STFT of that many samples;
* a start offset or gap of ``g`` seconds is ``g * sample_rate / hop_length`` frames (125 for 4 s):
  frame ``k`` is centred on sample ``k * hop_length``. The minimum gap is rounded up and the maximum
  rounded down, so every gap honours the limits in seconds, unless no whole frame lies between them
  (3.3-3.31 s, or a fixed 4.01 s, at 32 ms a frame): the gap is then the frame nearest the minimum;
* "non-overlapping" 4 s segments start 125 frames apart: their waveforms do not overlap and the
  frame on the boundary sample is the last of one segment and the first of the next.

A view is an exact slice of the cached whole-track mel (see :mod:`musicssl.data.cache` for how that
differs from running :class:`LogMel` on the waveform crop: edge frames and the ``top_db`` floor).

Randomness: the views of item ``i`` at epoch ``e`` are a function of ``(seed, e, i, draw)`` only,
so they do not depend on DataLoader workers, access order or global RNG state. The uniform numbers
come from BLAKE2b of that key (a counter-based generator, like Philox, with a cryptographic hash as
the mixing function): 1.5 us per item, against ~20 us for seeding a numpy Generator per item.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from musicssl.data.cache import LogMelConfig, MelCache

__all__ = [
    "EpochSampler",
    "ViewConfig",
    "ViewDataset",
    "ViewFrames",
    "fixed_segments",
    "keyed_uniforms",
    "probe_positions",
    "sample_view_starts",
    "track_segment_count",
    "track_segment_starts",
    "track_segments",
]


@dataclass(frozen=True)
class ViewConfig:
    """How views are cut from a track: ``n_views`` segments whose consecutive starts are
    ``min_gap_seconds .. max_gap_seconds`` apart (the study: two 4 s views 4-16 s apart)."""

    n_views: int = 2
    segment_seconds: float = 4.0
    min_gap_seconds: float = 4.0
    max_gap_seconds: float = 16.0

    def __post_init__(self) -> None:
        def finite(value) -> bool:  # NaN passes a "< 0" test, and inf ends in int(inf) far from here
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        if not finite(self.n_views) or int(self.n_views) != self.n_views or self.n_views < 2:
            raise ValueError(f"n_views must be an integer >= 2 (multi-view learning), got {self.n_views!r}")
        if not finite(self.segment_seconds) or self.segment_seconds <= 0:
            raise ValueError(f"segment_seconds must be a finite number > 0, got {self.segment_seconds!r}")
        if not (finite(self.min_gap_seconds) and finite(self.max_gap_seconds)) or (
                self.min_gap_seconds < 0 or self.max_gap_seconds < self.min_gap_seconds):
            raise ValueError(
                f"need finite 0 <= min_gap_seconds <= max_gap_seconds, got {self.min_gap_seconds!r} and "
                f"{self.max_gap_seconds!r}"
            )

    def in_frames(self, settings: LogMelConfig) -> ViewFrames:
        """This configuration in frames of a cache built with ``settings``."""
        per_second = settings.frames_per_second
        # A tiny tolerance so that 4 s at 31.25 frames/s is exactly 125, not ceil(125.00000001).
        min_gap = math.ceil(self.min_gap_seconds * per_second - 1e-6)
        max_gap = math.floor(self.max_gap_seconds * per_second + 1e-6)
        if max_gap < min_gap:  # both limits fall between the same two frames
            min_gap = max_gap = round(self.min_gap_seconds * per_second)
        return ViewFrames(self.n_views, settings.segment_frames(self.segment_seconds), min_gap, max_gap)


def _examples(track_ids: Sequence[str], shown: int = 3) -> str:
    """``e.g. tracks a, b, c`` (the first few ids of a list the message counts), or ``track a`` alone: said as
    ids, which can be numbers (MagnaTagATune's clip ids) and would read as counts."""
    named = ", ".join(map(str, track_ids[:shown]))
    return f"track {named}" if len(track_ids) == 1 else f"e.g. tracks {named}"


@dataclass(frozen=True)
class ViewFrames:
    """A :class:`ViewConfig` in frames: segment length and the allowed start gaps (inclusive)."""

    n_views: int
    segment: int
    min_gap: int
    max_gap: int

    @property
    def min_track_frames(self) -> int:
        """The shortest track (in frames) that fits ``n_views`` segments at the minimum gap."""
        return self.segment + (self.n_views - 1) * self.min_gap


def sample_view_starts(num_frames: int, frames: ViewFrames, uniforms: Sequence[float]) -> list[int] | None:
    """Start frames of ``n_views`` segments in a track of ``num_frames`` frames, in time order.

    ``uniforms``: ``n_views`` numbers in [0, 1) that drive the draw. Each consecutive gap is uniform
    over ``min_gap .. max_gap``, the upper end shrunk to what the track still allows once the later
    gaps have their minimum; then the first start is uniform over the positions where the whole group
    fits. ``None`` when even the minimum gaps do not fit.
    """
    last_start = num_frames - frames.segment
    n_gaps = frames.n_views - 1
    if last_start < n_gaps * frames.min_gap:
        return None
    starts = [0]
    used = 0
    for position in range(n_gaps):
        later_minimum = (n_gaps - position - 1) * frames.min_gap
        upper = min(frames.max_gap, last_start - used - later_minimum)
        used += frames.min_gap + int(uniforms[position] * (upper - frames.min_gap + 1))
        starts.append(used)
    first = int(uniforms[n_gaps] * (last_start - used + 1))
    return [first + offset for offset in starts]


def keyed_uniforms(key: tuple[int, ...], count: int) -> list[float]:
    """``count`` uniform numbers in [0, 1) that depend only on ``key`` (non-negative ints < 2**63)."""
    values: list[float] = []
    block = 0
    while len(values) < count:
        wanted = min(8, count - len(values))  # BLAKE2b gives at most 64 bytes: 8 numbers per block
        packed = struct.pack(f"<{len(key) + 1}q", *key, block)
        digest = hashlib.blake2b(packed, digest_size=8 * wanted, person=b"musicssl-views").digest()
        values.extend((word >> 11) * 2.0**-53 for word in struct.unpack(f"<{wanted}Q", digest))
        block += 1
    return values


class ViewDataset(Dataset):
    """Item ``i``: ``(views, i)`` with ``views`` a float32 tensor ``(n_views, n_mels, segment_frames)``.

    ``track_ids`` (default: every cached track) are kept in the given order; tracks not in the cache
    or too short for ``n_views`` segments at the minimum gap are left out, counted
    (:attr:`skipped_short`, :attr:`skipped_uncached`) and reported once, here.

    Keys: an int ``i`` uses the epoch set by :meth:`set_epoch`; a tuple ``(epoch, i)`` or
    ``(epoch, i, draw)`` (what :class:`EpochSampler` yields) carries its own, which is what makes
    persistent DataLoader workers see the right epoch. ``draw`` distinguishes repeats of a track
    within one epoch.
    """

    def __init__(
        self,
        cache: MelCache,
        track_ids: Sequence[str] | None = None,
        config: ViewConfig | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.cache = cache
        self.config = config or ViewConfig()
        self.frames = self.config.in_frames(cache.settings)
        self.seed = int(seed)
        self.epoch = 0
        requested = list(cache.track_ids if track_ids is None else track_ids)
        self.skipped_uncached = [track_id for track_id in requested if track_id not in cache]
        self.skipped_short = [
            track_id
            for track_id in requested
            if track_id in cache and cache.frames(track_id) < self.frames.min_track_frames
        ]
        left_out = set(self.skipped_uncached) | set(self.skipped_short)
        self.track_ids = [track_id for track_id in requested if track_id not in left_out]
        self._track_frames = np.array([cache.frames(track_id) for track_id in self.track_ids], dtype=np.int64)
        needed = self.frames.min_track_frames / cache.settings.frames_per_second
        if verbose and left_out:
            parts = []
            if self.skipped_short:
                parts.append(
                    f"{len(self.skipped_short)} shorter than {needed:.2f} s ({self.config.n_views} views of "
                    f"{self.config.segment_seconds:g} s starting >= {self.config.min_gap_seconds:g} s apart; "
                    f"{_examples(self.skipped_short)})"
                )
            if self.skipped_uncached:
                parts.append(f"{len(self.skipped_uncached)} not in the mel cache ({_examples(self.skipped_uncached)}; "
                             f"see {cache.path}/skipped.csv)")
            print(
                f"views: left out {' and '.join(parts)}; {len(self.track_ids)} of {len(requested)} tracks used",
                file=sys.stderr,
            )
        if not self.track_ids:
            raise ValueError(
                f"no track can give {self.config.n_views} views: every one of the {len(requested)} tracks is missing "
                f"from the cache or shorter than {needed:.2f} s; lower min_gap_seconds/segment_seconds or n_views"
            )

    @property
    def num_skipped(self) -> int:
        """Tracks left out: too short plus not cached."""
        return len(self.skipped_short) + len(self.skipped_uncached)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used by integer keys (views change from epoch to epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.track_ids)

    def _parse_key(self, key: int | tuple[int, ...]) -> tuple[int, int, int]:
        if isinstance(key, tuple):
            if len(key) == 2:
                return int(key[0]), int(key[1]), 0
            if len(key) == 3:
                return int(key[0]), int(key[1]), int(key[2])
            raise KeyError(f"a ViewDataset key is i, (epoch, i) or (epoch, i, draw), got {key!r}")
        return self.epoch, int(key), 0

    def view_starts(self, index: int, epoch: int | None = None, draw: int = 0) -> np.ndarray:
        """Start frames of the views of item ``index`` at ``epoch`` (default: the current epoch)."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} tracks")
        epoch = self.epoch if epoch is None else epoch
        if epoch < 0 or draw < 0:
            raise ValueError(f"epoch and draw must be >= 0, got {epoch} and {draw}")
        uniforms = keyed_uniforms((self.seed, epoch, index, draw), self.frames.n_views)
        starts = sample_view_starts(int(self._track_frames[index]), self.frames, uniforms)
        assert starts is not None  # too-short tracks were left out in __init__
        return np.array(starts, dtype=np.int64)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[Tensor, int]:
        epoch, index, draw = self._parse_key(key)
        starts = self.view_starts(index, epoch, draw)
        track_id = self.track_ids[index]
        views = np.empty((self.frames.n_views, self.cache.n_mels, self.frames.segment), dtype=np.float32)
        for position, start in enumerate(starts.tolist()):
            self.cache.get(track_id, start, self.frames.segment, out=views[position])
        return torch.from_numpy(views), index


class EpochSampler(Sampler):
    """Yields ``(epoch, i, draw)`` keys for :class:`ViewDataset`: a seeded permutation per epoch.

    ``set_epoch`` (Lightning calls it on the training sampler each epoch) changes both the order and
    the views, also in persistent workers. ``num_samples`` larger than the dataset repeats it in fresh
    permutations, each repeat with new views (``draw``); smaller takes a prefix of the permutation.

    With ``batch_size`` (at most ``num_items``), no batch of ``batch_size`` consecutive keys holds an
    item twice: where a batch spans the end of one permutation and the start of the next, an item of
    the next that the batch holds already moves to just after the batch, swapped with the first item
    there that it does not hold. Each permutation still holds every item once. Before, such a batch
    could hold a track twice (in 12 of 100 batches of 64 from 420 tracks), and a contrastive loss took
    the two as a negative pair.
    """

    def __init__(self, num_items: int, shuffle: bool = True, seed: int = 0, num_samples: int | None = None,
                 batch_size: int | None = None) -> None:
        if num_items <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"num_samples must be > 0 or None, got {num_samples}")
        if batch_size is not None and not 0 < batch_size <= num_items:
            raise ValueError(f"batch_size must be in 1..num_items ({num_items}) or None, got {batch_size}")
        self.num_items = int(num_items)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_samples = self.num_items if num_samples is None else int(num_samples)
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        # A stream separate from ViewDataset's (the trailing 1), so order and views are independent draws.
        rng = np.random.default_rng((self.seed, self.epoch, 1))
        emitted = 0
        previous = np.empty(0, dtype=np.int64)
        for draw in range(math.ceil(self.num_samples / self.num_items)):
            order = rng.permutation(self.num_items) if self.shuffle else np.arange(self.num_items)
            open_batch = emitted % self.batch_size if self.batch_size else 0
            if open_batch:
                order = _apart(order, previous[-open_batch:], self.batch_size - open_batch)
            for index in order[: self.num_samples - emitted]:
                yield self.epoch, int(index), draw
            emitted += min(self.num_items, self.num_samples - emitted)
            previous = order


def _apart(order: np.ndarray, held: np.ndarray, room: int) -> np.ndarray:
    """``order`` with none of ``held`` among its first ``room`` items: each one there swaps places with
    the first item after them not in ``held`` (there are enough when ``room + len(held) <= len(order)``)."""
    order = order.copy()
    held_set = set(held.tolist())
    later = (position for position in range(room, len(order)) if int(order[position]) not in held_set)
    for position in range(room):
        if int(order[position]) in held_set:
            swap = next(later)
            order[position], order[swap] = order[swap], order[position]
    return order


def probe_positions(
    cache: MelCache,
    track_ids: Sequence[str],
    num_segments: int = 512,
    seed: int = 0,
    segment_seconds: float = 4.0,
) -> list[tuple[str, int]]:
    """``(track_id, start_frame)`` of a fixed, seeded set of segments spread over ``track_ids``.

    Every usable track gets ``num_segments // T`` segments and a seeded choice of tracks one more
    (with fewer segments than tracks, a seeded subset gets one each). Within a track the segments are
    stratified: segment ``j`` of ``k`` starts at a seeded point of the ``j``-th of ``k`` equal parts
    of the possible starts. Tracks missing from the cache or shorter than one segment are left out.
    """
    if num_segments <= 0:
        raise ValueError(f"num_segments must be > 0, got {num_segments}")
    segment = cache.settings.segment_frames(segment_seconds)
    usable = [t for t in dict.fromkeys(track_ids) if t in cache and cache.frames(t) >= segment]
    if not usable:
        raise ValueError(
            f"none of the {len(track_ids)} tracks is cached and at least {segment_seconds:g} s long; "
            "cannot build a probe set"
        )
    rng = np.random.default_rng((seed, 2))
    count = len(usable)
    per_track = np.full(count, num_segments // count, dtype=np.int64)
    per_track[rng.choice(count, num_segments % count, replace=False)] += 1
    positions = []
    for track_id, segments in zip(usable, per_track):
        if segments == 0:
            continue
        possible_starts = cache.frames(track_id) - segment + 1
        offsets = rng.random(segments)
        starts = np.floor((np.arange(segments) + offsets) * possible_starts / segments).astype(np.int64)
        positions.extend((track_id, int(start)) for start in starts)
    return positions


def fixed_segments(
    cache: MelCache,
    track_ids: Sequence[str],
    num_segments: int = 512,
    seed: int = 0,
    segment_seconds: float = 4.0,
) -> Tensor:
    """The probe set of :func:`probe_positions` as a float32 tensor ``(num_segments, n_mels, frames)``.

    Deterministic in ``(track_ids, num_segments, seed)``: use it for collapse metrics on validation
    data, so every trial and epoch is measured on the same inputs.
    """
    segment = cache.settings.segment_frames(segment_seconds)
    positions = probe_positions(cache, track_ids, num_segments, seed, segment_seconds)
    batch = np.empty((len(positions), cache.n_mels, segment), dtype=np.float32)
    for row, (track_id, start) in enumerate(positions):
        cache.get(track_id, start, segment, out=batch[row])
    return torch.from_numpy(batch)


def track_segment_starts(
    num_frames: int, segment_frames: int, hop_frames: int, max_segments: int | None = None
) -> np.ndarray:
    """Starts ``0, hop, 2 hop, ...`` of every whole segment in ``num_frames`` frames; with
    ``max_segments``, that many of them evenly spread over the track (first and last included)."""
    if hop_frames <= 0:
        raise ValueError(f"hop must be at least one frame, got {hop_frames}")
    if max_segments is not None and max_segments <= 0:
        raise ValueError(f"max_segments must be > 0 or None, got {max_segments}")
    if num_frames < segment_frames:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, num_frames - segment_frames + 1, hop_frames, dtype=np.int64)
    if max_segments is not None and len(starts) > max_segments:
        starts = starts[np.round(np.linspace(0, len(starts) - 1, max_segments)).astype(np.int64)]
    return starts


def _track_starts(cache: MelCache, track_id: str, hop_seconds: float, segment_seconds: float,
                  max_segments: int | None) -> tuple[np.ndarray, int]:
    """The starts of :func:`track_segments`'s segments of ``track_id`` (before any silence filter), and their
    length in frames."""
    settings = cache.settings
    segment = settings.segment_frames(segment_seconds)
    hop = round(hop_seconds * settings.frames_per_second)
    return track_segment_starts(cache.frames(track_id), segment, hop, max_segments), segment


def track_segment_count(cache: MelCache, track_id: str, hop_seconds: float = 4.0, max_segments: int | None = None,
                        segment_seconds: float = 4.0) -> int:
    """How many segments :func:`track_segments` gives ``track_id`` without the silence filter, from its length
    alone (nothing is read)."""
    return len(_track_starts(cache, track_id, hop_seconds, segment_seconds, max_segments)[0])


def track_segments(
    cache: MelCache,
    track_id: str,
    hop_seconds: float = 4.0,
    max_segments: int | None = None,
    segment_seconds: float = 4.0,
    silence_db: float | None = None,
) -> Tensor:
    """Segments of one track for downstream embedding, float32 ``(S, n_mels, frames)``.

    With the defaults: every back-to-back 4 s segment (starts 125 frames apart at 16 kHz, hop 512, of
    126 frames each: the frame centred on a segment's end is the next one's first;
    a track shorter than one segment gives ``S = 0``). ``max_segments`` keeps that many, evenly
    spread (after the silence filter).

    ``silence_db`` drops a segment when its loudest mel bin (in the cached dB values) is more than
    ``silence_db`` dB below the loudest bin of the whole track; if that would drop all of them, the
    loudest segment is kept. This is our own peak-based rule, NOT the study's silence filter, and it
    keeps far more: the study compared each segment's RMS with the whole track's RMS,
    ``10 * ln(segment RMS / track RMS)`` (natural log, not dB), and dropped segments below -7.5, which
    also removes quiet passages that are not silent. Here a segment goes only when even its loudest
    bin is far below the track's peak: near-silence.
    """
    if max_segments is not None and max_segments <= 0:
        raise ValueError(f"max_segments must be > 0 or None, got {max_segments}")
    # Without the silence filter the segments kept are known before reading: only they are read (a long track
    # gave 2 of its hundreds after reading them all). The same ones: track_segment_starts spreads them as below.
    starts, segment = _track_starts(cache, track_id, hop_seconds, segment_seconds,
                                    max_segments if silence_db is None else None)
    segments = np.empty((len(starts), cache.n_mels, segment), dtype=np.float32)
    for row, start in enumerate(starts):
        cache.get(track_id, int(start), segment, out=segments[row])
    if silence_db is not None and len(starts):
        peaks = segments.max(axis=(1, 2))
        keep = peaks >= cache.get_track(track_id).max() - silence_db
        if not keep.any():
            keep[int(np.argmax(peaks))] = True
        segments = segments[keep]
    if max_segments is not None and len(segments) > max_segments:
        segments = segments[np.round(np.linspace(0, len(segments) - 1, max_segments)).astype(np.int64)]
    return torch.from_numpy(np.ascontiguousarray(segments))
