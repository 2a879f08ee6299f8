"""Mel cache build speed and view-sampler throughput against what a training step consumes.

Builds a cache from ``--tracks`` synthetic 30 s tracks (16 kHz WAV: tones plus noise), then times a
DataLoader over :class:`ViewDataset` (batch 64, 2 views of 4 s = 128 x 126 frames each) with 0 and 2
workers: the median over ``--repeats`` passes of ``--batches`` batches, each after ``--warmup``
batches that absorb worker start-up. An :class:`EpochSampler` with ``num_samples`` longer than the
dataset supplies enough keys (each repeat of a track gets new views). The cache (14 MB for 60 tracks) is in the page cache, as it is after the
first epoch of a real run.

    python benchmarks/bench_sampler.py [--tracks 60] [--batches 200] [--repeats 3] [--workdir DIR]

The training step of the ``cpu`` preset takes about 0.1 s per batch of 64 x 2 views and the
``paper`` preset about 0.4-0.7 s (benchmarks/bench_models.py): the sampler must deliver >= 10x the
1,280 segments/s a 0.1 s step consumes, i.e. >= 12,800 segments/s.

Results on the development machine (2 CPU cores shared with other helpers' work, load average 3-4
during the runs, so numbers vary by 2x between runs; torch 2.13.0+cpu; default arguments). Two
consecutive runs:

    build: 60 tracks (30 min of audio) in 4.2-6.0 s with 2 spawned workers (300-430x real time,
           including ~2 s of worker start-up); a no-op rebuild takes 0.01 s
    one item (2 views, in process): median 0.05 ms
    workers  batches  seconds  batches/s  segments/s  x(0.1 s step)  x(0.5 s step)
          0      200     0.80      251.4      32,181          25.1x         125.7x
          2      200     1.70      117.8      15,084          11.8x          58.9x
          0      200     1.27      156.9      20,079          15.7x          78.4x   (busier run)
          2      200     3.03       65.9       8,439           6.6x          33.0x   (busier run)

In process the sampler delivers 20-32k segments/s, 16-25x what the fastest (0.1 s) step consumes,
so it is not the bottleneck; ``num_workers=0`` is the better setting on 2 cores, where two extra
processes compete with the model for the cores and each 8 MB batch crosses shared memory. Per batch
the time goes to the float16 -> float32 transposing copies (~35%), ``torch.stack`` in the default
collate (~20%) and Python overhead; workers pay off on machines with spare cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
from torch.utils.data import DataLoader

from musicssl.cli import int_in
from musicssl.data.cache import MelCache
from musicssl.data.index import TrackIndex
from musicssl.data.views import EpochSampler, ViewDataset

BATCH_SIZE = 64
N_VIEWS = 2
SAMPLE_RATE = 16000


def write_tracks(folder: Path, count: int, seconds: float = 30.0) -> TrackIndex:
    """``count`` tracks of ``seconds`` s: a few random tones plus noise, so each mel differs."""
    rng = np.random.default_rng(0)
    time_axis = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    records = []
    for number in range(count):
        frequencies = rng.uniform(80.0, 4000.0, size=4)
        audio = sum(np.sin(2 * np.pi * f * time_axis) for f in frequencies) / 4 + 0.05 * rng.standard_normal(
            time_axis.shape
        )
        path = folder / f"track{number:03d}.wav"
        soundfile.write(str(path), (0.5 * audio).astype(np.float32), SAMPLE_RATE)
        records.append({"track_id": f"track{number:03d}", "path": str(path), "split": "train", "tags": ()})
    return TrackIndex.from_records(records)


def loader_throughput(dataset: ViewDataset, workers: int, batches: int, warmup: int, repeats: int) -> float:
    """Median over ``repeats`` passes of the seconds for ``batches`` batches after ``warmup`` batches."""
    sampler = EpochSampler(len(dataset), seed=0, num_samples=(batches + warmup) * BATCH_SIZE)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler, num_workers=workers)
    times = []
    for epoch in range(repeats):
        sampler.set_epoch(epoch)
        iterator = iter(loader)
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        segments = sum(views.shape[0] * views.shape[1] for views, _ in iterator)
        times.append(time.perf_counter() - start)
        assert segments == batches * BATCH_SIZE * N_VIEWS
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int_in(1), default=60)
    parser.add_argument("--batches", type=int_in(1), default=200)
    parser.add_argument("--repeats", type=int_in(1), default=3)
    parser.add_argument("--warmup", type=int_in(0), default=3)
    parser.add_argument("--build-workers", type=int_in(0), default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the audio and cache here (default: temp dir)")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        folder = arguments.workdir or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        index = write_tracks(folder, arguments.tracks)
        start = time.perf_counter()
        cache = MelCache.build(index, folder / "cache", workers=arguments.build_workers, progress=False, verbose=False)
        build_seconds = time.perf_counter() - start
        start = time.perf_counter()
        MelCache.build(index, folder / "cache", workers=arguments.build_workers, progress=False, verbose=False)
        rebuild_seconds = time.perf_counter() - start
        audio_seconds = sum(cache.duration(track_id) for track_id in cache.track_ids)
        print(
            f"build: {len(cache)} tracks ({audio_seconds / 60:.0f} min of audio) in {build_seconds:.1f} s with "
            f"{arguments.build_workers} workers ({cache.build_report.processed / build_seconds:.1f} tracks/s, "
            f"{audio_seconds / build_seconds:.0f}x real time); a no-op rebuild takes {rebuild_seconds:.2f} s"
        )

        dataset = ViewDataset(cache, verbose=False)
        item_times = []
        for number in range(500):
            start = time.perf_counter()
            dataset[(0, number % len(dataset), number // len(dataset))]
            item_times.append(time.perf_counter() - start)
        print(f"one item ({N_VIEWS} views, in process): median {statistics.median(item_times) * 1e3:.2f} ms")

        print("workers  batches  seconds  batches/s  segments/s  x(0.1 s step)  x(0.5 s step)")
        for workers in (0, 2):
            seconds = loader_throughput(dataset, workers, arguments.batches, arguments.warmup, arguments.repeats)
            batches_per_second = arguments.batches / seconds
            segments_per_second = batches_per_second * BATCH_SIZE * N_VIEWS
            print(
                f"{workers:7d}  {arguments.batches:7d}  {seconds:7.2f}  {batches_per_second:9.1f}  "
                f"{segments_per_second:10,.0f}  {batches_per_second * 0.1:12.1f}x  {batches_per_second * 0.5:12.1f}x"
            )


if __name__ == "__main__":
    main()
