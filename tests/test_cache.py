"""The mel cache: stored mels equal the front-end, incremental and crash-safe builds, bad-file handling."""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from musicssl.audio import LogMel, load_audio
from musicssl.data.cache import LOCK_FILE, LogMelConfig, MelCache, MelCacheError
from musicssl.data.index import TrackIndex

# float16 keeps 11 significant bits: rounding moves a value by at most half an ulp, 2**-11 relative.
FLOAT16_RTOL = 2.0**-11


def tone_and_noise(
    seconds: float, sample_rate: int, seed: int, channels: int = 1, amplitude: float = 0.5
) -> np.ndarray:
    """A sine (frequency depends on the seed) plus white noise; ``(samples,)`` or ``(samples, channels)``."""
    rng = np.random.default_rng(seed)
    time = np.arange(round(seconds * sample_rate)) / sample_rate
    columns = [
        amplitude * np.sin(2 * np.pi * (220.0 + 110.0 * seed + 37.0 * channel) * time)
        + 0.1 * amplitude * rng.standard_normal(time.shape)
        for channel in range(channels)
    ]
    audio = np.stack(columns, axis=1) if channels > 1 else columns[0]
    return audio.astype(np.float32)


def write(path: Path, audio: np.ndarray, sample_rate: int, **kwargs) -> str:
    soundfile.write(str(path), audio, sample_rate, **kwargs)
    return str(path)


def make_index(paths: dict[str, str]) -> TrackIndex:
    return TrackIndex.from_records(
        {"track_id": tid, "path": path, "split": "train", "tags": ()} for tid, path in paths.items()
    )


def reference_mel(path: str) -> np.ndarray:
    """What the cache must hold: LogMel of the decoded, peak-normalised audio."""
    audio = load_audio(path, 16000)
    with torch.no_grad():
        return LogMel()(torch.from_numpy(audio / np.abs(audio).max())).numpy()


@pytest.fixture()
def audio_files(tmp_path: Path) -> dict[str, str]:
    """Real files in four formats: 16 kHz mono WAV and FLAC, 44.1 kHz stereo WAV and FLAC."""
    folder = tmp_path / "audio"
    folder.mkdir()
    return {
        "wav16": write(folder / "wav16.wav", tone_and_noise(9.0, 16000, 0), 16000),
        "flac16": write(folder / "flac16.flac", tone_and_noise(7.3, 16000, 1), 16000),
        "wav44": write(folder / "wav44.wav", tone_and_noise(6.0, 44100, 2, channels=2), 44100),
        "flac44": write(folder / "flac44.flac", tone_and_noise(5.5, 44100, 3, channels=2), 44100, subtype="PCM_24"),
    }


def test_stored_mels_equal_logmel_of_decoded_audio(tmp_path: Path, audio_files: dict[str, str]) -> None:
    cache = MelCache.build(make_index(audio_files), tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert cache.track_ids == sorted(audio_files)
    for track_id, path in audio_files.items():
        stored = cache.get_track(track_id)
        reference = reference_mel(path)
        assert stored.dtype == np.float32 and stored.shape == reference.shape
        np.testing.assert_allclose(stored, reference, rtol=FLOAT16_RTOL, atol=1e-6)
        # Stored as float16: every value is one, and the shards hold 2 bytes per value.
        np.testing.assert_array_equal(stored, stored.astype(np.float16).astype(np.float32))
    shard_bytes = sum(path.stat().st_size for path in cache.path.glob("shard-*.bin"))
    assert shard_bytes == sum(cache.frames(track_id) for track_id in audio_files) * cache.n_mels * 2
    # Frame count of a centred STFT, written out: samples // hop + 1 (16 kHz files: no resampling).
    assert cache.frames("wav16") == round(9.0 * 16000) // 512 + 1 == 282
    assert cache.frames("flac16") == round(7.3 * 16000) // 512 + 1
    assert cache.duration("wav16") == pytest.approx(9.0)
    assert cache.duration("wav44") == pytest.approx(6.0, abs=1e-3)
    # A slice read without the rest of the track is the same slice of the whole.
    np.testing.assert_array_equal(cache.get("flac44", 17, 40), cache.get_track("flac44")[:, 17:57])


def test_a_long_track_is_stored_as_the_whole_file_read_and_transformed_at_once(tmp_path: Path) -> None:
    """A 150 s stereo 44.1 kHz track: 4,688 frames, so three chunks of the cache's log-mel and 26 blocks of
    decoding. What is stored is, to the bit, the float16 of LogMel on the whole file read at once, down-mixed,
    resampled (soxr's one-shot) and peak-normalised, as the cache computed it before it decoded and
    transformed a track a part at a time."""
    import soxr

    folder = tmp_path / "audio"
    folder.mkdir()
    rng = np.random.default_rng(5)
    seconds = np.arange(150 * 44100) / 44100
    tone = np.sin(2 * np.pi * 440.0 * seconds) * np.linspace(0.01, 1.0, len(seconds))  # rising 40 dB
    stereo = np.stack([tone + 0.01 * rng.standard_normal(len(seconds)), 0.5 * tone], axis=1)
    path = write(folder / "long.flac", stereo, 44100)
    cache = MelCache.build(make_index({"long": path}), tmp_path / "cache", workers=0, progress=False, verbose=False)

    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    audio = soxr.resample(data.mean(axis=1), rate, 16000, quality="HQ").astype(np.float32)
    with torch.no_grad():
        whole = LogMel()(torch.from_numpy(audio / np.float32(np.abs(audio).max()))).numpy()
    assert whole.shape == (128, 150 * 16000 // 512 + 1) == (128, 4688)
    np.testing.assert_array_equal(cache.get_track("long"), whole.astype(np.float16).astype(np.float32))


def test_peak_normalisation_and_channel_mixing(tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    mono = tone_and_noise(5.0, 16000, 4)
    paths = {
        "loud": write(folder / "loud.wav", mono, 16000, subtype="FLOAT"),
        # 26 dB quieter: peak normalisation must make it the same track.
        "quiet": write(folder / "quiet.wav", mono * 0.05, 16000, subtype="FLOAT"),
        # Two identical channels average to the mono signal.
        "stereo": write(folder / "stereo.wav", np.stack([mono, mono], axis=1), 16000, subtype="FLOAT"),
    }
    cache = MelCache.build(make_index(paths), tmp_path / "cache", workers=0, progress=False, verbose=False)
    loud = cache.get_track("loud")
    np.testing.assert_allclose(cache.get_track("quiet"), loud, rtol=2 * FLOAT16_RTOL, atol=1e-5)
    np.testing.assert_allclose(cache.get_track("stereo"), loud, rtol=2 * FLOAT16_RTOL, atol=1e-5)


def test_crop_of_cached_mel_equals_logmel_of_waveform_crop(tmp_path: Path) -> None:
    """A 4 s crop of the whole-track mel equals LogMel of the 4 s waveform except its two edge frames
    (reflect padding) - true here because noise keeps every bin far above the top_db floor."""
    audio = tone_and_noise(12.0, 16000, 5)
    path = write(tmp_path / "track.wav", audio, 16000, subtype="FLOAT")
    cache = MelCache.build(make_index({"t": path}), tmp_path / "cache", workers=0, progress=False, verbose=False)
    normalised = audio / np.abs(audio).max()
    start_frame = 50
    waveform_crop = normalised[start_frame * 512 : start_frame * 512 + 64000]
    with torch.no_grad():
        crop_mel = LogMel()(torch.from_numpy(waveform_crop)).numpy()
    assert crop_mel.shape == (128, 126)
    cached = cache.get("t", start_frame, 126)
    np.testing.assert_allclose(cached[:, 1:-1], crop_mel[:, 1:-1], rtol=FLOAT16_RTOL, atol=1e-4)


def test_front_end_settings_select_the_cache_folder(tmp_path: Path, audio_files: dict[str, str]) -> None:
    index = make_index({"wav16": audio_files["wav16"]})
    default = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    # f_max=None means Nyquist: spelling it out is the same front-end, hence the same cache.
    explicit = MelCache.build(
        index, tmp_path / "cache", LogMelConfig(f_max=8000.0), workers=0, progress=False, verbose=False
    )
    assert explicit.path == default.path and explicit.build_report.processed == 0
    small = MelCache.build(
        index, tmp_path / "cache", LogMelConfig(n_mels=64, top_db=80.0), workers=0, progress=False, verbose=False
    )
    assert small.path != default.path and small.build_report.processed == 1
    assert small.get_track("wav16").shape == (64, 282)
    other_hop = LogMelConfig(hop_length=256)
    assert MelCache.location(tmp_path / "cache", other_hop) not in (default.path, small.path)
    # Opening a root with two caches needs the settings; with them it finds the right one.
    with pytest.raises(MelCacheError, match="expected one mel cache folder"):
        MelCache.open(tmp_path / "cache")
    assert MelCache.open(tmp_path / "cache", LogMelConfig(n_mels=64, top_db=80.0)).path == small.path
    assert MelCache.open(default).path == default.path


def test_rebuild_processes_only_new_or_changed_tracks(tmp_path: Path, audio_files: dict[str, str]) -> None:
    first_two = {key: audio_files[key] for key in ("wav16", "flac16")}
    first = MelCache.build(make_index(first_two), tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (first.build_report.processed, first.build_report.added) == (2, 2)

    second = MelCache.build(make_index(audio_files), tmp_path / "cache", workers=0, progress=False, verbose=False)
    report = second.build_report
    assert (report.processed, report.added, report.already_cached) == (2, 2, 2)
    assert second.track_ids == sorted(audio_files)

    third = MelCache.build(make_index(audio_files), tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (third.build_report.processed, third.build_report.already_cached) == (0, 4)
    records = {track_id: third.audio_record(track_id) for track_id in audio_files}
    assert records == {track_id: second.audio_record(track_id) for track_id in audio_files}

    # New audio under the same id (different size) is recomputed; the old mel is never served.
    write(Path(audio_files["wav16"]), tone_and_noise(11.0, 16000, 9), 16000)
    fourth = MelCache.build(make_index(audio_files), tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert fourth.build_report.processed == 1
    # Its record (what keys results derived from the mels) changes with it; the others' stay.
    new_record = fourth.audio_record("wav16")
    assert new_record != records["wav16"]
    assert new_record[2:5] == (11 * 16000 // 512 + 1, 11 * 16000, Path(audio_files["wav16"]).stat().st_size)
    assert {k: fourth.audio_record(k) for k in audio_files if k != "wav16"} == {
        k: v for k, v in records.items() if k != "wav16"
    }
    assert fourth.frames("wav16") == 11 * 16000 // 512 + 1
    np.testing.assert_allclose(
        fourth.get_track("wav16"), reference_mel(audio_files["wav16"]), rtol=FLOAT16_RTOL, atol=1e-6
    )


def test_superseded_mels_are_deleted_when_no_process_reads_the_cache(tmp_path: Path, audio_files: dict[str, str]) -> None:
    """Shards are never rewritten: a re-decoded track's new mel goes to a new shard. The old ones stayed for
    good, so a dataset copied again without its modification times (cp without -p) grew the cache by its
    whole size each time. A build now deletes a shard none of whose mels is current, unless a process has
    the cache open; a shard that still holds current mels is kept, its superseded bytes counted."""
    import gc

    from musicssl.data.cache import READERS_LOCK_FILE

    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio\n" * 100)  # its skip record shares the first manifest with the mels

    def build():
        return MelCache.build(make_index({**audio_files, "broken": str(broken)}), tmp_path / "cache", workers=0,
                              progress=False, verbose=False)

    def data_bytes(cache):
        return sum(path.stat().st_size for path in cache.path.glob("shard-*.bin"))

    first = build()
    n_mels = first.n_mels
    full = data_bytes(first)
    committed_ns = (first.path / "shard-000001.json").stat().st_mtime_ns  # older entries' checks read it
    assert full == sum(first.frames(t) for t in audio_files) * n_mels * 2  # float16 rows of n_mels
    del first
    gc.collect()
    stamp = time.time() + 100
    for path in audio_files.values():  # a copy without modification times: every track is decoded again
        os.utime(path, (stamp, stamp))
    second = build()
    report = second.build_report
    assert report.processed == 4 and report.reclaimed_bytes == full and report.superseded_bytes == 0
    assert data_bytes(second) == full and len(list(second.path.glob("shard-*.json"))) == 2
    first_manifest = json.loads((second.path / "shard-000001.json").read_text())  # now the skip record alone
    assert (first_manifest["data"], first_manifest["tracks"]) == (None, [])
    assert [skip["track_id"] for skip in first_manifest["skipped"]] == ["broken"]
    assert (second.path / "shard-000001.json").stat().st_mtime_ns == committed_ns
    assert "deleted " in report.summary() and "MB of superseded mels" in report.summary()
    # The skipped file's record outlives its manifest's mels: not retried, still listed.
    assert report.already_skipped == 1 and [t.track_id for t in second.skipped] == ["broken"]
    for track_id, path in audio_files.items():  # what stays is the current mel
        np.testing.assert_allclose(second.get_track(track_id), reference_mel(path), rtol=FLOAT16_RTOL, atol=1e-6)

    # While a process has the cache open (here `second`; a search's trials, say), nothing is deleted: its
    # state names those shards. The next build deletes them.
    for path in audio_files.values():
        os.utime(path, (stamp + 100, stamp + 100))
    third = build()
    assert third.build_report.reclaimed_bytes == 0 and third.build_report.superseded_bytes == full
    assert data_bytes(third) == 2 * full
    np.testing.assert_allclose(second.get_track("wav16"), third.get_track("wav16"))  # the reader still reads
    del second, third
    gc.collect()
    fourth = build()
    assert fourth.build_report.processed == 0 and fourth.build_report.reclaimed_bytes == full
    assert data_bytes(fourth) == full
    # One track of a shard re-decoded: the shard stays (three current mels), its superseded mel is counted.
    frames = fourth.frames("wav16")
    del fourth
    gc.collect()
    os.utime(audio_files["wav16"], (stamp + 200, stamp + 200))
    fifth = build()
    assert fifth.build_report.reclaimed_bytes == 0 and fifth.build_report.superseded_bytes == frames * n_mels * 2
    assert data_bytes(fifth) == full + frames * n_mels * 2
    assert (fifth.path / READERS_LOCK_FILE).is_file()
    assert fifth.build_report.already_skipped == 1 and [t.track_id for t in fifth.skipped] == ["broken"]
    assert "broken" in (fifth.path / "skipped.csv").read_text()


def test_a_shard_that_cannot_be_deleted_does_not_fail_the_build(tmp_path: Path, audio_files: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Deleting superseded mels comes after the build's work is committed: a shard this user may not delete
    (another user's, in a shared cache) leaves the build as it is, with a warning."""
    import gc
    import logging

    def build():
        return MelCache.build(make_index(audio_files), tmp_path / "cache", workers=0, progress=False, verbose=False)

    build()
    gc.collect()
    stamp = time.time() + 100
    for path in audio_files.values():
        os.utime(path, (stamp, stamp))
    real_unlink = Path.unlink

    def refused(self, *args, **kwargs):
        if self.name.startswith("shard-"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refused)
    with caplog.at_level(logging.WARNING, logger="musicssl.data.cache"):
        cache = build()
    assert cache.build_report.processed == 4 and cache.build_report.reclaimed_bytes == 0
    assert "superseded mels not deleted" in caplog.text and "Permission denied" in caplog.text
    for track_id, path in audio_files.items():
        np.testing.assert_allclose(cache.get_track(track_id), reference_mel(path), rtol=FLOAT16_RTOL, atol=1e-6)


def test_process_pool_build_matches_in_process_build(tmp_path: Path, audio_files: dict[str, str]) -> None:
    index = make_index(audio_files)
    pooled = MelCache.build(index, tmp_path / "pooled", workers=2, progress=False, verbose=False)
    for track_id, path in audio_files.items():
        np.testing.assert_allclose(pooled.get_track(track_id), reference_mel(path), rtol=FLOAT16_RTOL, atol=1e-6)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import musicssl.data.cache as cache_module
    from musicssl.data.index import TrackIndex

    original = cache_module._atomic_write_bytes
    manifests = []

    def dying_write(path, payload):
        # Die the hard way while committing the third shard: its data file is in place, its manifest
        # is half written to the temporary name. Nothing gets a chance to clean up.
        if path.name.startswith("shard-"):
            manifests.append(path.name)
            if len(manifests) == 3:
                path.with_name(path.name + ".tmp").write_bytes(payload[: len(payload) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        original(path, payload)

    cache_module._atomic_write_bytes = dying_write
    index = TrackIndex.from_csv(sys.argv[1])
    cache_module.MelCache.build(index, sys.argv[2], workers=0, commit_every_seconds=0.0, progress=False)
    """
)


def test_killed_build_keeps_complete_entries_and_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    paths = {f"t{k}": write(folder / f"t{k}.wav", tone_and_noise(4.5, 16000, k), 16000) for k in range(6)}
    index = make_index(paths)
    index.to_csv(tmp_path / "tracks.csv")
    completed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "tracks.csv"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == -9, completed.stderr  # killed by SIGKILL, as planned

    location = MelCache.location(tmp_path / "cache")
    leftovers = sorted(path.name for path in location.iterdir() if path.name.startswith("shard-"))
    assert leftovers == [
        "shard-000001.bin",
        "shard-000001.json",
        "shard-000002.bin",
        "shard-000002.json",
        "shard-000003.bin",
        "shard-000003.json.tmp",
    ]
    interrupted = MelCache.open(tmp_path / "cache")
    # One track per commit, in index order: exactly the two committed tracks, both intact.
    assert interrupted.track_ids == ["t0", "t1"]
    for track_id in interrupted.track_ids:
        np.testing.assert_allclose(
            interrupted.get_track(track_id), reference_mel(paths[track_id]), rtol=FLOAT16_RTOL, atol=1e-6
        )

    resumed = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (resumed.build_report.processed, resumed.build_report.already_cached) == (4, 2)
    assert resumed.track_ids == sorted(paths)
    assert not list(location.glob("*.tmp"))
    for track_id, path in paths.items():
        np.testing.assert_allclose(resumed.get_track(track_id), reference_mel(path), rtol=FLOAT16_RTOL, atol=1e-6)


def test_ctrl_c_commits_finished_tracks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import musicssl.data.cache as cache_module

    folder = tmp_path / "audio"
    folder.mkdir()
    paths = {f"t{k}": write(folder / f"t{k}.wav", tone_and_noise(4.5, 16000, k), 16000) for k in range(5)}
    original = cache_module._compute_track
    calls = []

    def interrupted_on_fourth(task):
        calls.append(task.track_id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(task)

    monkeypatch.setattr(cache_module, "_compute_track", interrupted_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        # No time-based commit would happen before the end: only the interrupt handler saves work.
        MelCache.build(make_index(paths), tmp_path / "cache", workers=0, commit_every_seconds=1e9, progress=False)
    monkeypatch.setattr(cache_module, "_compute_track", original)
    assert MelCache.open(tmp_path / "cache").track_ids == ["t0", "t1", "t2"]
    resumed = MelCache.build(make_index(paths), tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert resumed.build_report.processed == 2 and resumed.track_ids == sorted(paths)


def test_ctrl_c_with_decoding_processes_commits_finished_tracks_and_ends_them(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The processes ignore Ctrl-C (a terminal sends it to each); the build commits what it has, then
    ends them at once instead of letting them decode the tracks in flight, which it drops."""
    import multiprocessing

    import musicssl.data.cache as cache_module
    from musicssl.interrupts import SpawnPool

    folder = tmp_path / "audio"
    folder.mkdir()
    paths = {f"t{k:02d}": write(folder / f"t{k:02d}.wav", tone_and_noise(4.5, 16000, k), 16000) for k in range(12)}
    iterate = cache_module._iterate_results

    def interrupted_after_three(tasks, workers):
        results = iterate(tasks, workers)
        try:
            for count, result in enumerate(results, 1):
                yield result
                if count == 3:
                    raise KeyboardInterrupt
        finally:
            results.close()

    ended = []

    class Pool(SpawnPool):  # the cache's pool, which says when it is ended
        def terminate(self):
            ended.append(len(self._processes))
            super().terminate()

    monkeypatch.setattr(cache_module, "_iterate_results", interrupted_after_three)
    monkeypatch.setattr(cache_module, "_new_pool", lambda workers: Pool(workers, cache_module._init_worker))
    with pytest.raises(KeyboardInterrupt):
        MelCache.build(make_index(paths), tmp_path / "cache", workers=2, commit_every_seconds=1e9, progress=False)
    assert ended == [2] and multiprocessing.active_children() == []  # ended, not waited for
    assert len(MelCache.open(tmp_path / "cache").track_ids) == 3
    monkeypatch.setattr(cache_module, "_iterate_results", iterate)
    resumed = MelCache.build(make_index(paths), tmp_path / "cache", workers=2, progress=False, verbose=False)
    assert resumed.build_report.processed == 9 and resumed.track_ids == sorted(paths)
    for track_id, path in paths.items():
        np.testing.assert_allclose(resumed.get_track(track_id), reference_mel(path), rtol=FLOAT16_RTOL, atol=1e-6)
    assert multiprocessing.active_children() == []


def test_bad_files_are_skipped_with_reasons_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    good = {
        "good1": write(folder / "good1.wav", tone_and_noise(5.0, 16000, 1), 16000),
        "good2": write(folder / "good2.flac", tone_and_noise(5.0, 44100, 2, channels=2), 44100),
    }
    (folder / "empty.wav").write_bytes(b"")
    (folder / "random.wav").write_bytes(np.random.default_rng(0).bytes(4096))
    flac_bytes = Path(good["good2"]).read_bytes()
    (folder / "truncated.flac").write_bytes(flac_bytes[:20])
    (folder / "notes.txt").write_text("these are not the samples you are looking for\n" * 50)
    write(folder / "zero_length.wav", np.zeros(0, dtype=np.float32), 16000)
    with_nan = tone_and_noise(5.0, 16000, 3)
    with_nan[1000] = np.nan
    write(folder / "nan.wav", with_nan, 16000, subtype="FLOAT")
    write(folder / "silent.wav", np.zeros(5 * 16000, dtype=np.float32), 16000)
    write(folder / "whisper.wav", np.full(5 * 16000, 1e-5, dtype=np.float32), 16000, subtype="FLOAT")  # -100 dBFS
    write(folder / "short.wav", tone_and_noise(1.0, 16000, 4), 16000)
    expected = {
        "empty": "empty",
        "random": "undecodable",
        "truncated": "undecodable",
        "notes": "undecodable",
        "zero_length": "zero_length",
        "nan": "non_finite",
        "silent": "silent",
        "whisper": "silent",
        "short": "too_short",
        "missing": "missing",
    }
    files = {name: str(next(folder.glob(f"{name}.*"), folder / f"{name}.wav")) for name in expected}
    cache = MelCache.build(make_index({**good, **files}), tmp_path / "cache", workers=0, progress=False)

    assert cache.track_ids == ["good1", "good2"]
    assert {track.track_id: track.reason for track in cache.skipped} == expected
    for track in cache.skipped:
        assert track.path == files[track.track_id] and track.path in track.detail
    report = cache.build_report
    assert report.skipped == 10 and report.added == 2 and report.usable == 2
    assert report.skip_reasons == {
        "empty": 1,
        "undecodable": 3,
        "zero_length": 1,
        "non_finite": 1,
        "silent": 2,
        "too_short": 1,
        "missing": 1,
    }
    printed = capsys.readouterr().out
    assert "10 of this dataset's file(s) skipped in all" in printed and "skipped.csv" in printed
    with open(cache.path / "skipped.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert {row["track_id"]: row["reason"] for row in rows} == expected
    # Skipped tracks have no data: asking for one says why.
    with pytest.raises(KeyError, match="too_short"):
        cache.frames("short")
    # Unchanged bad files are not decoded again; a repaired one is.
    write(folder / "short.wav", tone_and_noise(6.0, 16000, 4), 16000)
    again = MelCache.build(make_index({**good, **files}), tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (again.build_report.processed, again.build_report.already_skipped) == (1, 9)
    assert "short" in again.track_ids and len(again.skipped) == 9
    # Other skipping rules (a shorter minimum length) retry every skipped file, not the cached ones.
    relaxed = MelCache.build(
        make_index(files), tmp_path / "cache", workers=0, min_seconds=0.5, progress=False, verbose=False
    ).build_report
    assert (relaxed.processed, relaxed.already_cached, relaxed.skipped) == (9, 1, 9)


@pytest.mark.parametrize("workers", [0, 2])
def test_paths_that_are_no_file_are_skipped_and_the_build_goes_on(tmp_path: Path, workers: int) -> None:
    # An index the loaders did not check (check_audio=False, or made by hand): before, a name too long for the
    # file system made the build raise OSError [Errno 36] and lose what it had decoded.
    good = write(tmp_path / "good.wav", tone_and_noise(5.0, 16000, 1), 16000)
    (tmp_path / "folder.wav").mkdir()
    paths = {"good": good, "long": str(tmp_path / ("x" * 300 + ".wav")), "folder": str(tmp_path / "folder.wav"),
             "under_a_file": str(Path(good) / "inner.wav"), "gone": str(tmp_path / "gone.wav")}
    cache = MelCache.build(make_index(paths), tmp_path / "cache", workers=workers, progress=False, verbose=False)
    assert cache.track_ids == ["good"]
    skipped = {track.track_id: (track.reason, track.detail) for track in cache.skipped}
    assert skipped == {
        "long": ("missing", f"{paths['long']}: no such file (File name too long)"),
        "folder": ("missing", f"{paths['folder']}: a folder, not an audio file"),
        "under_a_file": ("missing", f"{paths['under_a_file']}: no such file (Not a directory)"),
        "gone": ("missing", f"{paths['gone']}: no such file"),
    }


def test_listed_files_the_loader_drops_are_in_skipped_csv_with_why(tmp_path: Path) -> None:
    """A tags file listing a name too long for the file system stopped the loader with a bare OSError
    ([Errno 36]; pathlib raises it, as it does for a folder on the way that may not be entered). It is dropped
    as missing, and the cache's skip list gives each dropped file's reason with the file system's word."""
    from musicssl.data.loaders import load_folder

    root = tmp_path / "set"
    (root / "folder.wav").mkdir(parents=True)
    write(root / "good.wav", tone_and_noise(5.0, 16000, 1), 16000)
    long = "x" * 300
    (root / "tags.csv").write_text(f"path,tags\ngood.wav,a\n{long}.wav,b\nfolder.wav,a\ngone.wav,b\n")
    index = load_folder(root, split_fractions=(1.0, 0.0, 0.0))
    assert index.track_ids == ["good"]
    assert {entry["track_id"]: entry["reason"] for entry in index.extra["missing"]} == {
        long: "missing", "folder": "a folder", "gone": "missing"}
    cache = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False,
                           dropped=index.extra["missing"])
    base = root.resolve()
    assert {track.track_id: (track.reason, track.detail) for track in cache.skipped} == {
        long: ("missing", f"{base / long}.wav: no such file (File name too long)"),
        "folder": ("missing", f"{base / 'folder.wav'}: a folder, not an audio file"),
        "gone": ("missing", f"{base / 'gone.wav'}: no such file"),
    }


def test_what_the_mp3_decoder_prints_goes_with_its_file_not_to_the_console(tmp_path: Path, capfd) -> None:
    """libmpg123 prints "Note: Illegal Audio-MPEG-Header ..." straight to file descriptor 2; before, those
    lines from the decoding processes broke into the progress bar, with no file named."""
    folder = tmp_path / "audio"
    folder.mkdir()
    clean = write(folder / "clean.mp3", tone_and_noise(12.0, 16000, 1), 16000, format="MP3")
    payload = bytearray(Path(clean).read_bytes())
    damaged = bytearray(payload)
    damaged[len(damaged) // 2: len(damaged) // 2 + 40] = bytes(40)  # a few frames' worth of zeros: resynced past
    (folder / "damaged.mp3").write_bytes(damaged)
    broken = payload[:4 * 1024] + np.random.default_rng(0).bytes(2000) + payload[6 * 1024:]
    (folder / "broken.mp3").write_bytes(broken)
    index = make_index({name: str(folder / f"{name}.mp3") for name in ("clean", "damaged", "broken")})

    # In-process (workers=0) the decoder's lines reach the console: the files do make it print.
    MelCache.build(index, tmp_path / "in-process", workers=0, progress=False, verbose=False)
    assert "Illegal Audio-MPEG-Header" in capfd.readouterr().err

    cache = MelCache.build(index, tmp_path / "pooled", workers=2, progress=False)
    captured = capfd.readouterr()
    assert "Illegal Audio-MPEG-Header" not in captured.err + captured.out.split("the decoder printed warnings")[0]
    assert cache.track_ids == ["clean", "damaged"]
    (skip,) = cache.skipped
    assert skip.track_id == "broken" and skip.reason == "undecodable"
    assert "; the decoder printed: Note: Illegal Audio-MPEG-Header" in skip.detail
    report = cache.build_report
    ((path, said),) = report.decoder_warnings
    assert path == str(folder / "damaged.mp3") and said.startswith("Note: Illegal Audio-MPEG-Header")
    assert (f"the decoder printed warnings for 1 file(s) it decoded, which are kept: {path} ({path}: Note: Illegal "
            "Audio-MPEG-Header") in captured.out

    # One decoding process, the damaged file first: the next file's report starts empty.
    ordered = make_index({name: str(folder / f"{name}.mp3") for name in ("damaged", "clean")})
    again = MelCache.build(ordered, tmp_path / "one-process", workers=1, progress=False, verbose=False)
    assert [path for path, _ in again.build_report.decoder_warnings] == [str(folder / "damaged.mp3")]
    # A file decoded past damage and then skipped (here too short) keeps what the decoder printed.
    long = write(folder / "long.mp3", tone_and_noise(25.0, 16000, 2), 16000, format="MP3")
    with_long = make_index({**{name: str(folder / f"{name}.mp3") for name in ("damaged", "clean")}, "long": long})
    short = MelCache.build(with_long, tmp_path / "too-short", workers=1, min_seconds=20.0, progress=False,
                           verbose=False)
    assert short.track_ids == ["long"]
    details = {track.track_id: (track.reason, track.detail) for track in short.skipped}
    assert details["damaged"][0] == "too_short"
    assert "; the decoder printed: Note: Illegal Audio-MPEG-Header" in details["damaged"][1]
    assert details["clean"][0] == "too_short" and "the decoder printed" not in details["clean"][1]
    assert short.build_report.decoder_warnings == []  # only kept files are listed there
    assert "Illegal Audio-MPEG-Header" not in capfd.readouterr().err


def test_a_decoder_output_capture_that_cannot_be_set_up_skips_no_file(tmp_path: Path, monkeypatch) -> None:
    """No usable temporary folder (a full /tmp): the file decodes without the capture. Before, every
    file was recorded as failed, and stayed skipped in later builds."""
    import musicssl.data.cache as cache_module

    def no_temporary_folder(*args, **kwargs):
        raise FileNotFoundError("No usable temporary directory found")

    monkeypatch.setattr(cache_module, "_CAPTURE_DECODER_OUTPUT", True)  # as in a decoding process
    monkeypatch.setattr(cache_module, "_decoder_sink", None)
    monkeypatch.setattr(cache_module.tempfile, "TemporaryFile", no_temporary_folder)
    path = write(tmp_path / "tone.mp3", tone_and_noise(6.0, 16000, 1), 16000, format="MP3")
    cache = MelCache.build(make_index({"tone": path}), tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert cache.track_ids == ["tone"] and not cache.skipped


def test_a_file_that_decodes_to_under_half_its_listed_duration_is_skipped_as_truncated(tmp_path: Path) -> None:
    """An interrupted MP3 download still decodes, to its first part only: with the duration its dataset
    lists (MTG-Jamendo's DURATION), it is skipped as truncated; before, it was cached as a whole track."""
    folder = tmp_path / "audio"
    folder.mkdir()
    full = write(folder / "full.mp3", tone_and_noise(20.0, 16000, 1), 16000, format="MP3")
    payload = Path(full).read_bytes()
    (folder / "cut.mp3").write_bytes(payload[: int(0.4 * len(payload))])  # about 8 s of the 20
    cut = str(folder / "cut.mp3")
    decoded = load_audio(cut, 16000).shape[0] / 16000
    assert 4.0 < decoded < 10.0  # usable length, well under half of 20 s

    def index(rows: list[tuple[str, str, float | None]]) -> TrackIndex:
        return TrackIndex.from_records({"track_id": tid, "path": path, "split": "train", "tags": (), "duration": seconds}
                                       for tid, path, seconds in rows)

    cache = MelCache.build(index([("full", full, 20.0), ("cut", cut, 20.0), ("unlisted", cut, None),
                                  ("close", cut, 1.9 * decoded)]),
                           tmp_path / "cache", workers=0, progress=False, verbose=False)
    # Listed 20 s, decodes to under 10: skipped. Without a listed duration there is nothing to compare;
    # just under twice the decoded length is still over half.
    assert cache.track_ids == ["close", "full", "unlisted"]
    [skipped] = cache.skipped
    assert (skipped.track_id, skipped.reason) == ("cut", "truncated")
    assert f"{cut}: {decoded:.2f} s of audio, but the dataset lists 20.00 s (a truncated download?" in skipped.detail
    assert cache.build_report.skip_reasons == {"truncated": 1}
    # A track cached before its duration was listed is judged from its stored length, without decoding.
    relisted = MelCache.build(index([("full", full, 20.0), ("cut", cut, 20.0), ("unlisted", cut, 20.0),
                                     ("close", cut, 1.9 * decoded)]),
                              tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (relisted.build_report.processed, relisted.build_report.excluded) == (0, 1)
    assert relisted.track_ids == ["close", "full"]
    assert {track.track_id: track.reason for track in relisted.skipped} == {"cut": "truncated", "unlisted": "truncated"}
    # Unchanged, the verdicts stand without decoding; when the listed duration is corrected (or no
    # longer listed) the file is judged again (metadata can be wrong, the file fine).
    again = MelCache.build(index([("full", full, 20.0), ("cut", cut, 20.0), ("unlisted", cut, 20.0),
                                  ("close", cut, 1.9 * decoded)]),
                           tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (again.build_report.processed, again.build_report.already_skipped) == (0, 2)
    corrected = MelCache.build(index([("full", full, 20.0), ("cut", cut, decoded), ("unlisted", cut, None),
                                      ("close", cut, 1.9 * decoded)]),
                               tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert corrected.build_report.processed == 2
    assert corrected.track_ids == ["close", "cut", "full", "unlisted"] and corrected.skipped == []


def test_durations_listed_in_milliseconds_are_named_as_such(tmp_path: Path, capsys) -> None:
    """A tags file's duration column in milliseconds (9000 for a 9 s clip): every track was skipped as "a truncated
    download? fetch the file again", and the build ended "none of the tracks is usable ({'truncated': 2})"."""
    paths = {f"t{n}": write(tmp_path / f"t{n}.flac", tone_and_noise(9.0, 16000, n), 16000) for n in range(2)}
    index = TrackIndex.from_records({"track_id": track_id, "path": path, "split": "train", "tags": (),
                                     "duration": 9000.0} for track_id, path in paths.items())
    with pytest.raises(MelCacheError) as raised:
        MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert ("none of the 2 tracks of index 'custom' is usable ({'truncated': 2}); 2 of them list about 1000 times "
            "their audio's duration: give the duration column in seconds; see ") in str(raised.value)
    skipped = MelCache.open(tmp_path / "cache").skipped
    # Where some tracks are usable, the build's summary says it.
    index.tracks.loc[index.tracks["track_id"] == "t0", "duration"] = 9.0
    MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=True)
    printed = capsys.readouterr().out
    assert re.search(r"mel cache: 1 of this dataset's file\(s\) skipped in all \(1 truncated\); see \S+/skipped.csv \(1 "
                     r"list about 1000 times their audio's duration: give the duration column in seconds\)\n", printed), printed
    assert [track.detail for track in skipped] == [
        f"{paths[t]}: 9.00 s of audio, but the dataset lists 9000.00 s (milliseconds? the duration column needs "
        "seconds)" for t in ("t0", "t1")]


def test_index_without_usable_tracks_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    index = make_index({"a": str(tmp_path / "a.wav"), "b": str(tmp_path / "b.wav")})
    with pytest.raises(MelCacheError, match=r"none of the 2 tracks.*undecodable.*missing"):
        MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)


def test_a_disk_that_fills_fails_the_build_naming_the_cache_and_frees_what_the_failed_write_took(
    tmp_path: Path, small_disk
) -> None:
    """The shard being written when the disk filled is removed at once (before, its temporary file kept
    the disk full until the next build); a build given room again then makes the whole cache."""
    folder = tmp_path / "audio"
    folder.mkdir()
    paths = {f"t{n:02d}": write(folder / f"t{n:02d}.flac", tone_and_noise(9.0, 16000, n), 16000) for n in range(12)}
    disk = small_disk(300_000)  # under the 12 x 72 kB of their mels (282 frames x 128 mels x 2 bytes each)
    with pytest.raises(OSError) as failed:
        MelCache.build(make_index(paths), disk.path / "cache", workers=0, progress=False, verbose=False)
    assert failed.value.errno == errno.ENOSPC and str(disk.path / "cache") in str(failed.value.filename)
    left = [path.name for path in (disk.path / "cache").rglob("shard-*")]
    assert left == [] or all(name.endswith(".json") for name in left), left
    assert shutil.disk_usage(disk.path).used < 100_000
    disk.resize(4_000_000)
    cache = MelCache.build(make_index(paths), disk.path / "cache", workers=0, progress=False, verbose=False)
    assert cache.track_ids == sorted(paths) and cache.frames("t00") == 282


def test_concurrent_build_waits_for_the_other_builder_then_times_out(
    tmp_path: Path, audio_files: dict[str, str], capsys
) -> None:
    location = MelCache.location(tmp_path / "cache")
    location.mkdir(parents=True)
    index = make_index(audio_files)
    with open(location / LOCK_FILE, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(MelCacheError, match="another process holds this cache's build lock and has committed "
                                                "nothing for over 1 s"):
            MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=True, lock_timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 5.0
        assert "waiting for it" in capsys.readouterr().out
        # While the other builder commits shards, the wait goes on past the timeout (a build of a large
        # collection takes hours; before, the waiting run failed after lock_timeout however busy it was).
        def commit_shards() -> None:
            for number in range(6):
                time.sleep(0.4)
                (location / f"shard-{900 + number:06d}.json.tmp").write_text("{}")

        committer = threading.Thread(target=commit_shards)
        committer.start()
        started = time.monotonic()
        with pytest.raises(MelCacheError, match="committed nothing for over 1 s"):
            MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False, lock_timeout=1.0)
        committer.join()
        assert time.monotonic() - started >= 2.4 + 1.0  # the last commit at 2.4 s, then the full timeout
        for leftover in location.glob("shard-0009*.json.tmp"):
            leftover.unlink()
        # The other builder finishes while this one waits: the build then goes ahead.
        releaser = threading.Timer(0.7, lambda: fcntl.flock(lock.fileno(), fcntl.LOCK_UN))
        releaser.start()
        cache = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False, lock_timeout=30.0)
        releaser.join()
    assert cache.build_report.processed == len(audio_files) and cache.track_ids == sorted(audio_files)


def test_a_file_system_that_cannot_lock_files_builds_without_the_lock_and_says_so(
    tmp_path: Path, audio_files: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Some NFS or Lustre mounts refuse ``flock`` (ENOLCK). The build stopped with a bare OSError; it goes on
    without its lock and says so. (No such file system can be mounted here: ``flock`` is replaced.)"""
    def no_locks(handle, operation) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    first = dict(list(audio_files.items())[:2])
    with caplog.at_level("WARNING", logger="musicssl.data.cache"):
        MelCache.build(make_index(first), tmp_path / "cache", workers=0, progress=False, verbose=False)
        cache = MelCache.build(make_index(audio_files), tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert cache.track_ids == sorted(audio_files) and cache.build_report.processed == len(audio_files) - 2
    for track_id, path in audio_files.items():
        np.testing.assert_allclose(cache.get_track(track_id), reference_mel(path), rtol=FLOAT16_RTOL, atol=1e-6)
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [f"mel cache {cache.path}: this file system cannot lock files (No locks available); building "
                        "without the lock, so do not build this cache from two processes at once"] * 2


def test_reads_check_bounds_and_survive_pickling(tmp_path: Path, audio_files: dict[str, str]) -> None:
    cache = MelCache.build(make_index(audio_files), tmp_path / "cache", workers=0, progress=False, verbose=False)
    frames = cache.frames("wav16")
    assert cache.get("wav16", frames - 126, 126).shape == (128, 126)
    with pytest.raises(IndexError, match="outside track"):
        cache.get("wav16", frames - 125, 126)
    with pytest.raises(IndexError):
        cache.get("wav16", -1, 10)
    with pytest.raises(KeyError, match="never cached"):
        cache.get("nope", 0, 10)
    copy = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(copy.get("flac16", 3, 100), cache.get("flac16", 3, 100))


def test_open_without_cache_explains_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(MelCacheError, match="MelCache.build"):
        MelCache.open(tmp_path / "nothing")


@pytest.mark.slow  # 13-15 s; run when the cache's build lock or its process pool's start changes
def test_build_at_import_time_fails_at_once_instead_of_hanging(tmp_path: Path) -> None:
    """A script that builds at module level, without a main guard: each spawned decoding worker imports
    it and reaches the build while its parent holds the cache lock. That must be a clear error that
    names the fix, not a wait for a lock that is never released (the default lock timeout is an hour)."""
    folder = tmp_path / "audio"
    folder.mkdir()
    paths = {f"t{k}": write(folder / f"t{k}.wav", tone_and_noise(4.5, 16000, k), 16000) for k in range(3)}
    make_index(paths).to_csv(tmp_path / "tracks.csv")
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from musicssl.data.cache import MelCache
            from musicssl.data.index import TrackIndex

            MelCache.build(TrackIndex.from_csv({str(tmp_path / "tracks.csv")!r}), {str(tmp_path / "cache")!r},
                           workers=2, progress=False, verbose=False)
            print("built")
            """
        )
    )
    completed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "built" not in completed.stdout
    assert 'put it under `if __name__ == "__main__":`' in completed.stderr  # from the worker
    assert "a decoding process died as it started" in completed.stderr  # the parent's own error
    # Processes that die before they get a file say nothing about the files: none is blamed.
    assert MelCache.open(tmp_path / "cache").skipped == []

    # The same script with the guard builds.
    guarded = script.read_text().replace("\nMelCache.build", '\nif __name__ == "__main__":\n    MelCache.build')
    script.write_text(guarded.replace("\nprint(", "\n    print("))
    completed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    assert "built" in completed.stdout


def test_same_size_rewrite_is_recomputed(tmp_path: Path) -> None:
    """Different audio of the same length and format has the same file size: the modification time
    must tell the cache that the file changed, or it would keep serving the old mels."""
    path = write(tmp_path / "song.wav", tone_and_noise(6.0, 16000, 0), 16000)
    index = make_index({"song": path})
    first = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    old_mel = first.get_track("song")
    size, mtime_ns = os.stat(path).st_size, os.stat(path).st_mtime_ns
    write(Path(path), tone_and_noise(6.0, 16000, 5), 16000)
    assert os.stat(path).st_size == size and os.stat(path).st_mtime_ns != mtime_ns

    second = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (second.build_report.processed, second.build_report.already_cached) == (1, 0)
    new_mel = second.get_track("song")
    assert not np.allclose(new_mel, old_mel, atol=1.0)
    np.testing.assert_allclose(new_mel, reference_mel(path), rtol=FLOAT16_RTOL, atol=1e-6)
    third = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (third.build_report.processed, third.build_report.already_cached) == (0, 1)


def _make_legacy(folder: Path) -> None:
    """Rewrite every manifest as the code before mtimes and peaks were stored wrote it, keeping the
    manifest's own modification time (the commit time that older entries are judged by)."""
    for manifest_path in folder.glob("shard-*.json"):
        stamp = manifest_path.stat()
        manifest = json.loads(manifest_path.read_text())
        for track in manifest["tracks"]:
            track.pop("mtime_ns", None), track.pop("peak", None)
        for skip in manifest["skipped"]:
            skip.pop("mtime_ns", None)
        manifest_path.write_text(json.dumps(manifest))
        os.utime(manifest_path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_cache_from_before_mtimes_still_opens_and_catches_later_rewrites(tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    paths = {
        "loud": write(folder / "loud.wav", tone_and_noise(6.0, 16000, 0), 16000),
        "quiet": write(folder / "quiet.wav", tone_and_noise(6.0, 16000, 1, amplitude=0.01), 16000),  # about -35 dBFS
    }
    index = make_index(paths)
    built = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    expected = {track_id: built.get_track(track_id) for track_id in paths}
    _make_legacy(built.path)

    reopened = MelCache.open(tmp_path / "cache")
    for track_id in paths:
        np.testing.assert_array_equal(reopened.get_track(track_id), expected[track_id])
    # Files untouched since the entries were committed: trusted, nothing decoded.
    again = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (again.build_report.processed, again.build_report.already_cached) == (0, 2)
    # A stricter silence threshold needs the peak, which an old entry lacks: only then is it decoded.
    stricter = MelCache.build(
        index, tmp_path / "cache", workers=0, silence_threshold_db=-30.0, progress=False, verbose=False
    )
    assert stricter.build_report.processed == 2 and stricter.track_ids == ["loud"]
    assert {track.track_id: track.reason for track in stricter.skipped} == {"quiet": "silent"}

    # An old entry whose file was rewritten (same size) after that build is decoded again.
    rebuilt = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    _make_legacy(rebuilt.path)
    write(Path(paths["loud"]), tone_and_noise(6.0, 16000, 7), 16000)
    fresh = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (fresh.build_report.processed, fresh.build_report.already_cached) == (1, 1)
    np.testing.assert_allclose(fresh.get_track("loud"), reference_mel(paths["loud"]), rtol=FLOAT16_RTOL, atol=1e-6)


def test_current_rules_apply_to_cached_tracks_without_decoding(tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    paths = {
        "long": write(folder / "long.wav", tone_and_noise(12.0, 16000, 0), 16000),
        "short": write(folder / "short.wav", tone_and_noise(5.0, 16000, 1), 16000),
        "quiet": write(folder / "quiet.wav", tone_and_noise(12.0, 16000, 2, amplitude=0.01), 16000),
    }
    index = make_index(paths)
    first = MelCache.build(index, tmp_path / "cache", workers=0, min_seconds=4.0, progress=False, verbose=False)
    assert first.track_ids == ["long", "quiet", "short"]

    longer = MelCache.build(
        index, tmp_path / "cache", workers=0, min_seconds=10.0, progress=False, verbose=False
    )
    report = longer.build_report
    assert longer.track_ids == ["long", "quiet"]
    assert (report.processed, report.excluded, report.already_cached) == (0, 1, 2)
    assert {track.track_id: track.reason for track in longer.skipped} == {"short": "too_short"}
    assert "5.00 s of audio, need at least 10.00 s" in longer.skipped[0].detail
    assert "1 cached track(s) no longer meet" in report.summary()

    louder = MelCache.build(
        index, tmp_path / "cache", workers=0, min_seconds=10.0, silence_threshold_db=-30.0, progress=False,
        verbose=False,
    )
    assert (louder.build_report.processed, louder.build_report.excluded) == (1, 1)  # "short": rules changed
    assert louder.track_ids == ["long"]
    assert {track.track_id: track.reason for track in louder.skipped} == {"short": "too_short", "quiet": "silent"}

    # Back to the first rules: the skipped tracks are retried (decoded) and usable again.
    relaxed = MelCache.build(index, tmp_path / "cache", workers=0, min_seconds=4.0, progress=False, verbose=False)
    assert (relaxed.build_report.processed, relaxed.build_report.excluded) == (2, 0)
    assert relaxed.track_ids == ["long", "quiet", "short"]
    np.testing.assert_allclose(relaxed.get_track("short"), reference_mel(paths["short"]), rtol=FLOAT16_RTOL, atol=1e-6)


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import musicssl.data.cache as cache_module
    from musicssl.data.index import TrackIndex

    decode = cache_module._compute_track
    here = Path(__file__).parent

    def decode_or_die(task):
        name = Path(task.path).stem
        with open(here / "decoded.log", "a") as log:
            log.write(name + "\\n")
        if name == "poison":
            # Die while the other process is in the middle of a good file, so that the pool's breakage
            # hits that file too. Then die as a decoder crash or the kernel's out-of-memory killer
            # would have it: at once, with no exception and no cleanup.
            deadline = time.monotonic() + 20
            while not list(here.glob("running-*")) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        marker = here / f"running-{name}-{os.getpid()}"
        marker.touch()
        time.sleep(0.5)
        try:
            return decode(task)
        finally:
            marker.unlink()

    # At module level, so that it runs in every decoding process too: spawn imports this script there.
    cache_module._compute_track = decode_or_die

    if __name__ == "__main__":
        index = TrackIndex.from_csv(sys.argv[1])
        cache_module.MelCache.build(index, sys.argv[2], workers=2, progress=False)
        print("built")
    """
)


RACE_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, time
    from musicssl.data import cache

    if __name__ == "__main__":
        paths = sys.argv[1:]
        tasks = [cache._Task(os.path.basename(p), p, cache.LogMelConfig(), 64000, 1e-4) for p in paths]
        results = cache._iterate_results(tasks, 1)
        first = next(results)
        # The decoding process dies while the build is not waiting on it (as during a shard commit).
        (worker,) = multiprocessing.active_children()
        os.kill(worker.pid, signal.SIGKILL)
        # Wait until the pool knows (its management thread marks it broken): the next submission
        # then fails at once, the case under test.
        pool = results.gi_frame.f_locals["pool"]
        deadline = time.monotonic() + 60
        while not pool._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool._broken, "the pool never noticed its dead process"
        rest = list(results)
        print(sorted((r.track_id, r.reason or "ok") for r in [first, *rest]))
    """
)


@pytest.mark.slow  # 10-11 s; run when the cache's decoding pool changes (a decoder that dies on a file is in the
# fast suite: test_a_file_that_kills_its_decoding_process_is_skipped_and_the_build_goes_on)
def test_a_decoding_process_that_dies_while_the_build_is_busy_elsewhere_loses_no_track(tmp_path: Path) -> None:
    """The pool breaks between two waits: the next submission fails at once. That track never ran
    (it goes to the next pool) and those in flight are retried alone; none is lost or blamed."""
    paths = [write(tmp_path / f"t{k}.wav", tone_and_noise(4.5, 16000, k), 16000) for k in range(6)]
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT)
    completed = subprocess.run([sys.executable, str(script), *paths], capture_output=True, text=True, timeout=300,
                               check=False, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == str(sorted((f"t{k}.wav", "ok") for k in range(6)))


def test_a_file_that_kills_its_decoding_process_is_skipped_and_the_build_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    names = ["t0", "t1", "t2", "poison", "t3", "t4", "t5"]
    paths = {name: write(folder / f"{name}.wav", tone_and_noise(4.5, 16000, k), 16000) for k, name in enumerate(names)}
    index = make_index(paths)
    index.to_csv(tmp_path / "tracks.csv")
    script = tmp_path / "crashing_decoder.py"
    script.write_text(CRASH_SCRIPT)
    completed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "tracks.csv"), str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "built" in completed.stdout
    assert f"the decoder crashed on {paths['poison']}" in completed.stdout  # the summary names the file

    cache = MelCache.open(tmp_path / "cache")
    # The tracks decoded beside the poison file when its process died are retried, not blamed.
    assert cache.track_ids == sorted(set(names) - {"poison"})
    for track_id in cache.track_ids:
        np.testing.assert_allclose(
            cache.get_track(track_id), reference_mel(paths[track_id]), rtol=FLOAT16_RTOL, atol=1e-6
        )
    assert [(track.track_id, track.reason) for track in cache.skipped] == [("poison", "crashed")]
    decoded = (tmp_path / "decoded.log").read_text().split()
    assert decoded.count("poison") == 2  # in the pool, then alone
    assert any(decoded.count(name) == 2 for name in names if name != "poison"), decoded  # a neighbour, retried
    assert paths["poison"] in cache.skipped[0].detail and "decoding process died" in cache.skipped[0].detail
    with open(cache.path / "skipped.csv", newline="") as stream:
        assert [(row["track_id"], row["reason"]) for row in csv.DictReader(stream)] == [("poison", "crashed")]

    # The next build does not decode it again (the file is unchanged) ...
    again = MelCache.build(index, tmp_path / "cache", workers=0, progress=False, verbose=False)
    assert (again.build_report.processed, again.build_report.already_skipped) == (0, 1)
    # ... unless asked to: here, without the crashing decoder, it is a good file.
    retried = MelCache.build(index, tmp_path / "cache", workers=0, retry_skipped=True, progress=False, verbose=False)
    assert retried.build_report.processed == 1 and "poison" in retried.track_ids


def test_a_datasets_missing_and_empty_files_are_in_skipped_csv_and_keep_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The loader drops a listed track whose audio is missing or empty; prepare_data still lists it in
    skipped.csv, and the cache folder stays the same when such a file comes back or a track is added."""
    from musicssl.data.pipeline import default_mel_cache_dir, prepare_data

    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "music"
    (root / "audio").mkdir(parents=True)
    for seed, name in enumerate(("a", "b", "c")):
        write(root / "audio" / f"{name}.wav", tone_and_noise(6.0, 16000, seed), 16000)
    (root / "audio" / "empty.wav").write_bytes(b"")
    rows = ["path,tags,split", "audio/a.wav,x,train", "audio/b.wav,y,train", "audio/c.wav,x,valid",
            "audio/empty.wav,y,train", "audio/gone.wav,x,train"]
    (root / "tags.csv").write_text("\n".join(rows) + "\n")

    first = prepare_data(str(root), LogMelConfig(n_mels=64), workers=0, verbose=True)
    console = capsys.readouterr().out
    assert first.track_ids("train", "valid") == ["audio/a", "audio/b", "audio/c"]
    with open(first.cache.path / "skipped.csv", newline="") as handle:
        skipped = {row["track_id"]: row for row in csv.DictReader(handle)}
    assert {track: row["reason"] for track, row in skipped.items()} == {"audio/empty": "empty", "audio/gone": "missing"}
    assert skipped["audio/gone"]["path"].endswith("gone.wav") and "no such file" in skipped["audio/gone"]["detail"]
    assert "2 more listed track(s) have no usable audio file" in console
    assert "2 of this dataset's file(s) skipped in all (1 empty, 1 missing)" in console
    folder = first.cache.path
    manifests = sorted(folder.glob("shard-*.json"))

    # Nothing changed: nothing decoded, nothing committed again.
    again = prepare_data(str(root), LogMelConfig(n_mels=64), workers=0, verbose=False)
    assert again.cache.path == folder and sorted(folder.glob("shard-*.json")) == manifests
    assert again.cache.build_report.processed == 0

    # The missing file arrives and a new track is added: same folder, only those two decoded.
    write(root / "audio" / "gone.wav", tone_and_noise(6.0, 16000, 7), 16000)
    write(root / "audio" / "new.wav", tone_and_noise(6.0, 16000, 8), 16000)
    (root / "tags.csv").write_text("\n".join([*rows, "audio/new.wav,y,test"]) + "\n")
    grown = prepare_data(str(root), LogMelConfig(n_mels=64), workers=0, verbose=False)
    assert grown.cache.path == folder
    assert grown.cache.build_report.processed == 2 and grown.cache.build_report.added == 2
    assert [track.track_id for track in grown.cache.skipped] == ["audio/empty"]
    # A skipped track no longer listed is not counted as this dataset's (the cache still remembers it).
    (root / "tags.csv").write_text("\n".join([row for row in rows if "empty" not in row] + ["audio/new.wav,y,test"]) + "\n")
    capsys.readouterr()
    prepare_data(str(root), LogMelConfig(n_mels=64), workers=0, verbose=True)
    assert "skipped in all" not in capsys.readouterr().out
    (root / "tags.csv").write_text("\n".join([*rows, "audio/new.wav,y,test"]) + "\n")
    prepare_data(str(root), LogMelConfig(n_mels=64), workers=0, verbose=True)
    assert "1 of this dataset's file(s) skipped in all (1 empty)" in capsys.readouterr().out
    # A file that goes missing after it was cached keeps its mel in the cache (the index drops it).
    os.remove(root / "audio" / "a.wav")
    shrunk = prepare_data(str(root), LogMelConfig(n_mels=64), workers=0, verbose=False)
    assert shrunk.cache.path == folder and "audio/a" in shrunk.cache and "audio/a" not in shrunk.track_ids("train")
    assert shrunk.cache.build_report.processed == 0

    # A cache named the earlier way (a hash of every path) is kept while it is the only one.
    import hashlib

    index, dataset_folder = shrunk.index, folder.parent  # the cache's path is the front-end's folder in it
    digest = hashlib.sha1("\n".join(sorted(index.paths)).encode()).hexdigest()[:10]
    legacy = dataset_folder.parent / f"music-{digest}"
    legacy.mkdir()
    assert default_mel_cache_dir(index) == dataset_folder  # the current one exists: it wins
    dataset_folder.rename(tmp_path / "moved")
    assert default_mel_cache_dir(index) == legacy


def test_a_track_repointed_to_another_file_of_the_same_size_and_mtime_is_recomputed(tmp_path: Path) -> None:
    """Files extracted from one archive share a modification time, and same-length audio has the same
    size: a track id re-pointed to such a file (a tags file's path fixed) must be decoded again."""
    old = write(tmp_path / "old.wav", tone_and_noise(6.0, 16000, 0), 16000)
    new = write(tmp_path / "new.wav", tone_and_noise(6.0, 16000, 5), 16000)
    short = write(tmp_path / "short.wav", tone_and_noise(1.0, 16000, 1), 16000)
    other_short = write(tmp_path / "other_short.wav", tone_and_noise(1.0, 16000, 2), 16000)
    for path in (old, new, short, other_short):
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    first = MelCache.build(make_index({"song": old, "clip": short}), tmp_path / "cache", workers=0,
                           progress=False, verbose=False)
    assert first.track_ids == ["song"] and [track.reason for track in first.skipped] == ["too_short"]
    old_mel = first.get_track("song")

    second = MelCache.build(make_index({"song": new, "clip": other_short}), tmp_path / "cache", workers=0,
                            progress=False, verbose=False)
    assert (second.build_report.processed, second.build_report.already_cached) == (2, 0)
    assert not np.allclose(second.get_track("song"), old_mel, atol=1.0)
    np.testing.assert_allclose(second.get_track("song"), reference_mel(new), rtol=FLOAT16_RTOL, atol=1e-6)
    assert [track.path for track in second.skipped] == [other_short]  # the skip names the file now listed
    third = MelCache.build(make_index({"song": new, "clip": other_short}), tmp_path / "cache", workers=0,
                           progress=False, verbose=False)
    assert (third.build_report.processed, third.build_report.already_cached) == (0, 1)


def test_a_relative_cache_setting_is_read_against_the_folder_it_was_set_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: MUSICSSL_CACHE=relcache gave a cache whose shard paths were relative, so a cache handed
    to another process in another folder (a search's trial, which Ray Tune runs in its own folder)
    failed with FileNotFoundError on its first read."""
    from musicssl.data.pipeline import prepare_data

    root = tmp_path / "music"
    root.mkdir()
    for seed, name in enumerate(("a", "b")):
        write(root / f"{name}.wav", tone_and_noise(6.0, 16000, seed), 16000)
    (root / "tags.csv").write_text("path,tags,split\na.wav,x,train\nb.wav,y,valid\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MUSICSSL_CACHE", "relcache")
    data = prepare_data(str(root), LogMelConfig(n_mels=64), workers=0, verbose=False)
    assert data.cache.path.is_absolute() and (tmp_path / "relcache") in data.cache.path.parents
    moved = pickle.loads(pickle.dumps(data.cache))
    elsewhere = tmp_path / "trial"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    np.testing.assert_array_equal(moved.get("a", 0, 10), data.cache.get("a", 0, 10))


def _as_an_ordinary_user() -> list[str]:
    """The command prefix that runs Python without root's permission to read any file (a user's view of
    file permissions), or [] where this process is not root."""
    if os.geteuid() != 0:
        return [sys.executable]
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable]


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file permissions")
def test_a_file_that_cannot_be_opened_is_said_so_and_tried_again_and_an_unreadable_folder_is_warned_of(tmp_path):
    """Before: an unreadable file was "not a readable WAV/FLAC/OGG/MP3 file, or corrupt (libsndfile: System
    error.)", and once its permissions were corrected (size and time unchanged) it stayed skipped for good; a
    folder that could not be listed was left out without a word."""
    root = tmp_path / "set"
    for folder in ("a", "b"):
        for number in range(4):
            path = root / folder / f"t{number}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            time_axis = np.arange(16000 * 5) / 16000
            soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * (200 + 50 * number) * time_axis)).astype(np.float32),
                            16000)
    script = textwrap.dedent("""
        import sys
        from musicssl.data.pipeline import prepare_data
        prepared = prepare_data(sys.argv[1], workers=0, verbose=False)
        report = prepared.cache.skip_report()
        print(len(prepared.index), len(prepared.cache), list(report["reason"]), list(report["detail"]))
    """)
    env = {**os.environ, "MUSICSSL_CACHE": str(tmp_path / "cache")}
    (root / "a" / "t3.wav").chmod(0)
    (tmp_path / "cache").mkdir(mode=0o777)
    tmp_path.chmod(0o755)
    command = [*_as_an_ordinary_user(), "-c", script, str(root)]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (f"8 7 ['unreadable'] ['{root / 'a' / 't3.wav'}: cannot open the file: Permission "
                                    "denied; make it readable (chmod a+r)']")
    (root / "a" / "t3.wav").chmod(0o644)
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "8 8 [] []"
    for mode in (0, 0o644):  # neither listed nor entered; listed, not entered (before: a PermissionError)
        (root / "b").chmod(mode)
        try:
            listing = subprocess.run([*command[:-3], "-c", "import sys; from musicssl.data.loaders import load_folder; "
                                      "print(load_folder(sys.argv[1], unlabeled=True).track_ids)", str(root)],
                                     capture_output=True, text=True, env=env, timeout=120)
        finally:
            (root / "b").chmod(0o755)
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.strip() == "['a/t0', 'a/t1', 'a/t2', 'a/t3']"
        assert (f"{root}: 1 folder(s) could not be read and were left out, e.g. {root / 'b'} (Permission denied); "
                "make them readable (chmod a+rx)") in listing.stderr
