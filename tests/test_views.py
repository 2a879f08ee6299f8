"""View sampling: exact cache slices, gaps within limits, determinism across DataLoader workers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch
from scipy import stats
from torch.utils.data import DataLoader

from musicssl.data.cache import LogMelConfig, MelCache
from musicssl.data.index import TrackIndex
from musicssl.data.views import (
    EpochSampler,
    ViewConfig,
    ViewDataset,
    ViewFrames,
    fixed_segments,
    keyed_uniforms,
    probe_positions,
    sample_view_starts,
    track_segment_starts,
    track_segments,
)

SR, HOP = 16000, 512
SEGMENT = 4 * SR // HOP + 1  # 126 frames: a centred STFT of 64,000 samples
FRAMES_PER_SECOND = SR / HOP  # 31.25
MIN_GAP, MAX_GAP = 4 * FRAMES_PER_SECOND, 16 * FRAMES_PER_SECOND  # 125 and 500 frames


def frames_of(seconds: float) -> int:
    return round(seconds * SR) // HOP + 1


LONG_IDS = [f"long{k}" for k in range(6)]
LENGTHS = {**{track_id: 30.0 for track_id in LONG_IDS}, "medium": 12.0, "short": 6.0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> MelCache:
    """Noise tracks (every 126-frame window is unique), one 12 s, one 6 s, one half silent."""
    folder = tmp_path_factory.mktemp("views")
    records = []
    rng = np.random.default_rng(0)
    for track_id, seconds in {**LENGTHS, "half_silent": 30.0}.items():
        audio = 0.3 * rng.standard_normal(round(seconds * SR)).astype(np.float32)
        if track_id == "half_silent":
            audio[14 * SR :] = 0.0
        path = folder / f"{track_id}.wav"
        soundfile.write(str(path), audio, SR, subtype="FLOAT")
        records.append({"track_id": track_id, "path": str(path), "split": "train", "tags": ()})
    index = TrackIndex.from_records(records)
    return MelCache.build(index, folder / "cache", workers=0, progress=False, verbose=False)


def locate(whole: np.ndarray, segment: np.ndarray) -> list[int]:
    """Every start frame where ``segment`` is an exact slice of ``whole`` (brute force)."""
    width = segment.shape[1]
    return [
        start for start in range(whole.shape[1] - width + 1) if np.array_equal(whole[:, start : start + width], segment)
    ]


def test_view_config_in_frames_follows_the_stft_arithmetic() -> None:
    assert ViewConfig().in_frames(LogMelConfig()) == ViewFrames(n_views=2, segment=126, min_gap=125, max_gap=500)
    # Gaps honour the limits in seconds: the minimum rounds up, the maximum down (3.3 s = 103.125 frames).
    frames = ViewConfig(segment_seconds=2.0, min_gap_seconds=3.3, max_gap_seconds=5.5).in_frames(LogMelConfig())
    assert frames == ViewFrames(2, 2 * SR // HOP + 1, 104, 171)
    # No whole frame between the limits (103.125-103.44 frames; a fixed 4.01 s is 125.3): the frame nearest
    # the minimum, the one exception the module's docstring states.
    narrow = ViewConfig(min_gap_seconds=3.3, max_gap_seconds=3.31).in_frames(LogMelConfig())
    assert (narrow.min_gap, narrow.max_gap) == (round(3.3 * SR / HOP), round(3.3 * SR / HOP)) == (103, 103)
    fixed = ViewConfig(min_gap_seconds=4.01, max_gap_seconds=4.01).in_frames(LogMelConfig())
    assert (fixed.min_gap, fixed.max_gap) == (125, 125)
    with pytest.raises(ValueError, match="n_views"):
        ViewConfig(n_views=1)
    with pytest.raises(ValueError, match="min_gap_seconds <= max_gap_seconds"):
        ViewConfig(min_gap_seconds=5, max_gap_seconds=4)


def test_views_are_exact_cache_slices_with_gaps_within_limits(cache: MelCache) -> None:
    dataset = ViewDataset(cache, LONG_IDS + ["medium"], verbose=False)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index, track_id in enumerate(dataset.track_ids):
            views, position = dataset[index]
            assert position == index and views.shape == (2, 128, SEGMENT) and views.dtype == torch.float32
            whole = cache.get_track(track_id)
            starts = [locate(whole, view.numpy()) for view in views]
            assert all(len(found) == 1 for found in starts), starts
            gap_seconds = (starts[1][0] - starts[0][0]) * HOP / SR
            assert 4.0 <= gap_seconds <= 16.0
            assert [found[0] for found in starts] == dataset.view_starts(index, epoch).tolist()


def test_gaps_are_uniform_and_first_start_uniform() -> None:
    frames = ViewConfig().in_frames(LogMelConfig())
    num_frames = frames_of(60.0)  # long enough for every gap: 1876 frames
    # The keyed generator the dataset uses, over 4000 keys.
    draws = np.array([sample_view_starts(num_frames, frames, keyed_uniforms((123, 0, k, 0), 2)) for k in range(4000)])
    gaps = draws[:, 1] - draws[:, 0]
    assert gaps.min() == MIN_GAP and gaps.max() == MAX_GAP
    # Discrete uniform on 125..500: mean 312.5, sd sqrt((376^2 - 1) / 12) = 108.5; 4000 draws.
    assert abs(gaps.mean() - 312.5) < 4 * 108.5 / np.sqrt(4000)
    assert stats.kstest((gaps - MIN_GAP + 0.5) / (MAX_GAP - MIN_GAP + 1), "uniform").pvalue > 1e-3
    # Given the gap, the first start is uniform over the positions where both views fit.
    room = num_frames - SEGMENT - gaps + 1
    assert (draws[:, 0] < room).all() and (draws[:, 1] + SEGMENT <= num_frames).all()
    assert stats.kstest((draws[:, 0] + 0.5) / room, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("n_views", [2, 3])
def test_view_starts_fit_every_track_length_and_reach_both_ends(n_views: int) -> None:
    """Over every track length around the shortest that fits, and uniforms at both ends of [0, 1):
    ``None`` exactly below the minimum length; otherwise every gap within its limits and the last view
    inside the track; all-lowest uniforms give the first start and minimum gaps, all-highest ones the
    largest gaps the track allows with the last view ending on the track's last frame."""
    frames = ViewFrames(n_views, SEGMENT, int(MIN_GAP), int(MAX_GAP))
    shortest = SEGMENT + (n_views - 1) * int(MIN_GAP)
    assert frames.min_track_frames == shortest
    top = 1.0 - 1e-12
    grid = [0.0, 0.5, top]
    for num_frames in range(shortest - 3, shortest + 2 * int(MAX_GAP) + 3):
        draws = [sample_view_starts(num_frames, frames, [a, b, c][: n_views]) for a in grid for b in grid for c in grid]
        if num_frames < shortest:
            assert all(draw is None for draw in draws), num_frames
            continue
        for starts in draws:
            gaps = np.diff(starts)
            assert starts[0] >= 0 and starts[-1] + SEGMENT <= num_frames, (num_frames, starts)
            assert (gaps >= MIN_GAP).all() and (gaps <= MAX_GAP).all(), (num_frames, starts)
        lowest = sample_view_starts(num_frames, frames, [0.0] * n_views)
        assert lowest == [k * int(MIN_GAP) for k in range(n_views)]
        highest = sample_view_starts(num_frames, frames, [top] * n_views)
        room = num_frames - SEGMENT  # the frames the starts can spread over
        if n_views == 2:
            assert np.diff(highest).tolist() == [min(int(MAX_GAP), room)]
        assert highest[-1] == room, (num_frames, highest)
    # The track of exactly the shortest length has one placement; two views in 376 frames put the first
    # at 125 at the latest once the gap is the minimum (the last position where both fit).
    assert sample_view_starts(shortest, frames, [0.5] * n_views) == [k * int(MIN_GAP) for k in range(n_views)]
    if n_views == 2:
        assert sample_view_starts(376, frames, [0.0, top]) == [125, 250]


def test_keyed_uniforms_are_uniform_independent_and_key_dependent() -> None:
    values = np.array([keyed_uniforms((0, epoch, index, 0), 10) for epoch in range(20) for index in range(100)])
    assert values.shape == (2000, 10) and values.min() >= 0.0 and values.max() < 1.0
    for column in range(10):  # columns 0-7 come from one hash block, 8-9 from the next
        assert stats.kstest(values[:, column], "uniform").pvalue > 1e-4
    correlations = np.corrcoef(values.T)[np.triu_indices(10, 1)]
    assert np.abs(correlations).max() < 4.5 / np.sqrt(2000)
    assert keyed_uniforms((1, 2, 3, 4), 3) == keyed_uniforms((1, 2, 3, 4), 3)
    assert keyed_uniforms((1, 2, 3, 4), 3) != keyed_uniforms((1, 2, 4, 3), 3)


def test_gap_range_shrinks_on_short_tracks(cache: MelCache) -> None:
    # 12 s = 376 frames: the second view must start by frame 376 - 126 = 250, so gaps are 125..250.
    assert cache.frames("medium") == frames_of(12.0) == 376
    dataset = ViewDataset(cache, ["medium"], verbose=False)
    gaps = np.array([np.diff(dataset.view_starts(0, epoch))[0] for epoch in range(400)])
    assert gaps.min() >= MIN_GAP and gaps.max() <= 250
    assert gaps.max() >= 240 and gaps.min() <= 135  # the whole shrunken range is used


def test_three_views_fit_and_respect_gaps(cache: MelCache) -> None:
    config = ViewConfig(n_views=3, segment_seconds=2.0, min_gap_seconds=2.0, max_gap_seconds=8.0)
    dataset = ViewDataset(cache, LONG_IDS + ["medium"], config=config, verbose=False)
    segment, min_gap, max_gap = 2 * SR // HOP + 1, 2 * SR / HOP, 8 * SR / HOP
    for epoch in range(20):
        for index in range(len(dataset)):
            starts = dataset.view_starts(index, epoch)
            gaps = np.diff(starts)
            assert len(starts) == 3 and ((gaps >= min_gap) & (gaps <= max_gap)).all()
            assert starts[0] >= 0 and starts[-1] + segment <= cache.frames(dataset.track_ids[index])
    views, _ = dataset[(5, 6)]
    assert views.shape == (3, 128, segment)


def test_short_and_uncached_tracks_are_left_out_counted_and_reported_once(
    cache: MelCache, capsys: pytest.CaptureFixture
) -> None:
    # 6 s = 188 frames < 126 + 125 = 251 needed for two views 4 s apart.
    dataset = ViewDataset(cache, ["long0", "short", "medium", "not-a-track"])
    assert dataset.track_ids == ["long0", "medium"]
    assert dataset.skipped_short == ["short"] and dataset.skipped_uncached == ["not-a-track"]
    assert dataset.num_skipped == 2
    reported = capsys.readouterr().err
    assert "1 shorter than 8.03 s" in reported and "1 not in the mel cache" in reported
    # Which ones, by id (before: the counts alone).
    assert "starting >= 4 s apart; track short)" in reported and "1 not in the mel cache (track not-a-track; see " in reported
    for epoch in range(2):
        dataset.set_epoch(epoch)
        _ = [dataset[index] for index in range(len(dataset))]
    assert capsys.readouterr().err == ""
    # Shorter gaps make the 6 s track usable.
    relaxed = ViewDataset(cache, ["short"], config=ViewConfig(min_gap_seconds=1.0, max_gap_seconds=2.0), verbose=False)
    assert relaxed.num_skipped == 0
    with pytest.raises(ValueError, match="no track can give 2 views"):
        ViewDataset(cache, ["short"], verbose=False)


def collect(dataset: ViewDataset, sampler: EpochSampler, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=workers)
    return list(loader)


def test_batches_identical_with_zero_and_two_workers(cache: MelCache) -> None:
    dataset = ViewDataset(cache, LONG_IDS + ["medium"], seed=7, verbose=False)
    sampler = EpochSampler(len(dataset), shuffle=True, seed=7)
    by_epoch = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        in_process = collect(dataset, sampler, workers=0)
        two_workers = collect(dataset, sampler, workers=2)
        assert len(in_process) == len(two_workers) == 3
        for (views_a, index_a), (views_b, index_b) in zip(in_process, two_workers):
            assert torch.equal(index_a, index_b) and torch.equal(views_a, views_b)
        by_epoch[epoch] = in_process
        # Each item depends on (seed, epoch, i) only, not on access order or batch composition.
        for views, indices in in_process:
            for row, index in enumerate(indices.tolist()):
                assert torch.equal(views[row], dataset[(epoch, index)][0])
    assert not torch.equal(by_epoch[0][0][0], by_epoch[1][0][0])
    # Integer keys follow set_epoch; a plain DataLoader in order gives the same views as the keys.
    dataset.set_epoch(1)
    ordered = DataLoader(dataset, batch_size=7, num_workers=2)
    views, indices = next(iter(ordered))
    assert all(torch.equal(views[i], dataset[(1, i)][0]) for i in range(7))
    # Another seed gives other views.
    other = ViewDataset(cache, LONG_IDS + ["medium"], seed=8, verbose=False)
    assert not torch.equal(other[(0, 0)][0], dataset[(0, 0)][0])


def test_epoch_sampler_permutes_and_repeats_with_fresh_draws(cache: MelCache) -> None:
    sampler = EpochSampler(5, seed=3)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert sorted(index for _, index, _ in keys) == [0, 1, 2, 3, 4]
    assert {(epoch, draw) for epoch, _, draw in keys} == {(2, 0)}
    longer = list(EpochSampler(5, seed=3, num_samples=12))
    assert len(longer) == 12 and [draw for *_, draw in longer] == [0] * 5 + [1] * 5 + [2] * 2
    assert sorted(index for _, index, draw in longer if draw == 1) == [0, 1, 2, 3, 4]
    dataset = ViewDataset(cache, LONG_IDS, verbose=False)
    assert not torch.equal(dataset[(0, 2, 0)][0], dataset[(0, 2, 1)][0])
    assert [index for _, index, _ in EpochSampler(4, shuffle=False)] == [0, 1, 2, 3]


def batches_holding_a_key_twice(keys: list[tuple[int, int, int]], batch_size: int) -> int:
    items = [index for _, index, _ in keys]
    return sum(len(set(items[i:i + batch_size])) < batch_size for i in range(0, len(items), batch_size))


@pytest.mark.parametrize(("items", "batch_size", "steps"), [(420, 64, 100), (200, 128, 40), (7, 7, 9), (65, 64, 30),
                                                            (10, 3, 50), (128, 64, 10)])
def test_no_batch_holds_a_track_twice_where_permutations_join(items: int, batch_size: int, steps: int) -> None:
    for seed, epoch in ((0, 0), (5, 3)):
        plain = EpochSampler(items, seed=seed, num_samples=steps * batch_size)
        apart = EpochSampler(items, seed=seed, num_samples=steps * batch_size, batch_size=batch_size)
        plain.set_epoch(epoch)
        apart.set_epoch(epoch)
        keys, plain_keys = list(apart), list(plain)
        assert len(keys) == steps * batch_size and batches_holding_a_key_twice(keys, batch_size) == 0
        # Each pass over the tracks (draw) still holds each track once, and its views are its draw's.
        for draw in range(math.ceil(len(keys) / items)):
            indices = [index for e, index, d in keys if d == draw and e == epoch]
            assert len(set(indices)) == len(indices) == min(items, len(keys) - draw * items)
        if items % batch_size == 0:  # the batches end where the permutations do: nothing to move
            assert keys == plain_keys
        else:  # each case has batches that hold a track twice without batch_size
            assert batches_holding_a_key_twice(plain_keys, batch_size) > 0
    # What it mends: without batch_size, 12 of the 100 batches of 64 from 420 tracks hold a track twice.
    assert batches_holding_a_key_twice(list(EpochSampler(420, seed=0, num_samples=6400)), 64) == 12
    with pytest.raises(ValueError, match=r"batch_size must be in 1..num_items \(5\)"):
        EpochSampler(5, batch_size=6)


def test_fixed_segments_are_deterministic_spread_and_exact(cache: MelCache) -> None:
    tracks = LONG_IDS + ["medium", "short"]
    positions = probe_positions(cache, tracks, num_segments=20, seed=0)
    segments = fixed_segments(cache, tracks, num_segments=20, seed=0)
    assert segments.shape == (20, 128, SEGMENT)
    assert torch.equal(segments, fixed_segments(cache, tracks, num_segments=20, seed=0))
    assert not torch.equal(segments, fixed_segments(cache, tracks, num_segments=20, seed=1))
    per_track = {track: sum(track == t for t, _ in positions) for track in tracks}
    assert sorted(per_track.values()) == [2] * 4 + [3] * 4  # 20 over 8 tracks: 2 each, 4 get a third
    for row, (track_id, start) in enumerate(positions):
        np.testing.assert_array_equal(segments[row].numpy(), cache.get_track(track_id)[:, start : start + SEGMENT])
    # Stratified: the k segments of a track lie in k different equal parts of its possible starts.
    for track in tracks:
        possible = cache.frames(track) - SEGMENT + 1
        starts = sorted(start for t, start in positions if t == track)
        parts = [start * per_track[track] // possible for start in starts]
        assert parts == list(range(per_track[track]))
    # Fewer segments than tracks: one segment each from distinct tracks.
    few = probe_positions(cache, tracks, num_segments=5, seed=0)
    assert len({track for track, _ in few}) == 5


def test_track_segments_are_the_non_overlapping_slices(cache: MelCache) -> None:
    whole = cache.get_track("long0")
    assert whole.shape[1] == frames_of(30.0) == 938
    segments = track_segments(cache, "long0")
    # 4 s segments every 4 s (125 frames) in 938 frames: starts 0, 125, ..., 750 -> 7 segments.
    expected_starts = list(range(0, 938 - SEGMENT + 1, 125))
    assert expected_starts == [0, 125, 250, 375, 500, 625, 750]
    assert segments.shape == (7, 128, SEGMENT)
    for row, start in enumerate(expected_starts):
        np.testing.assert_array_equal(segments[row].numpy(), whole[:, start : start + SEGMENT])
    spread = track_segments(cache, "long0", max_segments=3)
    for row, start in enumerate([0, 375, 750]):
        np.testing.assert_array_equal(spread[row].numpy(), whole[:, start : start + SEGMENT])
    # Audio stops at 14 s: segments starting at 16, 20, 24 s are digital silence and are dropped,
    # the one spanning 12-16 s holds audio and is kept.
    assert len(track_segments(cache, "half_silent")) == 7
    assert len(track_segments(cache, "half_silent", silence_db=60.0)) == 4
    assert len(track_segments(cache, "short", hop_seconds=1.0)) == (frames_of(6.0) - SEGMENT) // 31 + 1
    # Evenly spread picks are the nearest of the whole segments: 3 of 8 (indices 0, 3.5, 7) are 0, 4 and 7.
    assert track_segment_starts(SEGMENT + 7 * 125, SEGMENT, 125).tolist() == [125 * k for k in range(8)]
    assert track_segment_starts(SEGMENT + 7 * 125, SEGMENT, 125, max_segments=3).tolist() == [0, 500, 875]
    assert track_segment_starts(SEGMENT + 7 * 125, SEGMENT, 125, max_segments=5).tolist() == [0, 250, 500, 625, 875]


def test_the_silence_rule_reads_each_segments_loudest_bin_and_keeps_the_loudest_when_all_would_go(tmp_path) -> None:
    """A segment stays when its loudest bin is within ``silence_db`` of the track's loudest: one short
    burst in otherwise digital silence keeps its segment (its mean would not). When the track's peak
    lies after its last whole segment, every segment would go: the one with the loudest bin stays."""
    rng = np.random.default_rng(1)
    burst = 0.3 * rng.standard_normal(30 * SR).astype(np.float32)
    burst[7 * SR // 2 :] = 0.0  # loud 0-3.5 s, then silence but for 20 ms at 10 s (segment 8-12 s)
    burst[10 * SR : 10 * SR + SR // 50] = 0.3 * rng.standard_normal(SR // 50)
    tail = 1e-4 * rng.standard_normal(30 * SR).astype(np.float32)
    tail[29 * SR :] = 0.5 * rng.standard_normal(SR)  # loud only after the last whole segment (24-28 s)
    records = []
    for track_id, audio in (("burst", burst), ("tail", tail)):
        path = tmp_path / f"{track_id}.wav"
        soundfile.write(str(path), audio, SR, subtype="FLOAT")
        records.append({"track_id": track_id, "path": str(path), "split": "train", "tags": ()})
    cache = MelCache.build(TrackIndex.from_records(records), tmp_path / "cache", workers=0, progress=False,
                           verbose=False)
    starts = list(range(0, 938 - SEGMENT + 1, 125))
    whole = cache.get_track("burst")
    kept = track_segments(cache, "burst", silence_db=60.0).numpy()
    assert len(kept) == 2
    np.testing.assert_array_equal(kept[0], whole[:, 0:SEGMENT])
    np.testing.assert_array_equal(kept[1], whole[:, 250 : 250 + SEGMENT])
    whole = cache.get_track("tail")
    peaks = [whole[:, start : start + SEGMENT].max() for start in starts]
    assert max(peaks) < whole.max() - 60.0  # every whole segment is below the threshold
    loudest = starts[int(np.argmax(peaks))]
    kept = track_segments(cache, "tail", silence_db=60.0).numpy()
    assert len(kept) == 1
    np.testing.assert_array_equal(kept[0], whole[:, loudest : loudest + SEGMENT])
