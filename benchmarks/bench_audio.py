"""Cost of the audio front-end: LogMel per 10 s clip and load_audio per 30 s file.

LogMel runs on 16 kHz clips of 10 s, one at a time (batch 1) and 32 at a time (batch 32, time
reported per clip). load_audio decodes a 30 s 44.1 kHz stereo file (16-bit FLAC, and MP3 as the real
datasets ship it), downmixes and resamples it to 16 kHz mono. Timings are medians after one warm-up,
over ``--repeats`` runs for LogMel and half as many (at least 3) for load_audio; "x real time" is seconds of audio processed per second of compute, the
number that carries over to other machines.

    python benchmarks/bench_audio.py [--threads 1 2] [--repeats 20]

Results on the development machine (2 CPU cores shared with other work, load average 1.8-4.7
during the runs; torch 2.13.0+cpu, soundfile 0.14.0 / libsndfile 1.2.2, soxr 1.1.0; ranges over
three runs with ``--repeats 30``):

    what                                threads  ms per item     x real time
    LogMel 10 s clip, batch 1                 1  1.25 - 1.41     7,100 - 8,000
    LogMel 10 s clip, batch 32 (per clip)     1  4.1 - 4.4       2,300 - 2,400
    LogMel 10 s clip, batch 1                 2  0.9 - 175       57 - 11,300
    LogMel 10 s clip, batch 32 (per clip)     2  5.2 - 8.5       1,200 - 1,900
    load_audio 30 s 44.1k stereo FLAC         1  62 - 124        240 - 480
      of which decoding (FLAC)                1  34 - 68         440 - 890
    load_audio 30 s 44.1k stereo MP3          1  58 - 118        255 - 520
      of which decoding (MP3)                 1  41 - 58         520 - 725

    A training step's audio (64 views of 4 s, 25.6 clips' worth) would cost 30-110 ms of LogMel, 1/4
    to 1/20 of a paper-preset step (0.4-0.7 s, see bench_models.py) and about a cpu-preset step: so
    tracks become mels once, in the mel cache, and training reads mels. Per clip, batch 32 is ~3x dearer than batch 1: its 32 x 513 x 313 complex
    spectrogram (41 MB) leaves the cache; still negligible. Two threads on a busy 2-core machine
    can be 100x slower (OpenMP workers wait on a descheduled peer): run one thread per process.
    load_audio spends about half its time decoding and half resampling (soxr HQ); at ~0.1 s per 30 s
    track, decode each track once into the mel cache rather than every epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile
import torch

from musicssl.cli import int_in
from musicssl.audio import LogMel, load_audio

SAMPLE_RATE = 16000


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def music_like(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Stereo test signal with a music-like spectrum: harmonic tones, decaying noise bursts, hiss.
    FLAC's compression (and so its decode cost) depends on content; pure noise would overstate it."""
    rng = np.random.default_rng(seed)
    time_axis = np.arange(int(seconds * sample_rate)) / sample_rate
    signal = np.zeros_like(time_axis)
    for fundamental in rng.uniform(80.0, 800.0, size=6):
        for harmonic in range(1, 6):
            signal += 0.05 / harmonic * np.sin(2 * np.pi * fundamental * harmonic * time_axis + rng.uniform(0, 6.3))
    beat = np.exp(-20.0 * (time_axis % 0.5))
    signal += 0.2 * beat * rng.standard_normal(len(time_axis)) + 0.003 * rng.standard_normal(len(time_axis))
    stereo = np.stack([signal, 0.9 * signal + 0.01 * rng.standard_normal(len(time_axis))], axis=1)
    return (0.9 * stereo / np.abs(stereo).max()).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int_in(1), nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int_in(1), default=20)
    args = parser.parse_args()

    front_end = LogMel()
    generator = torch.Generator().manual_seed(0)
    clip_seconds = 10
    batch = torch.randn(32, clip_seconds * SAMPLE_RATE, generator=generator) * 0.1

    libsndfile = soundfile.__libsndfile_version__
    print(f"torch {torch.__version__}, soundfile {soundfile.__version__} (libsndfile {libsndfile})")
    print(f"{'what':<38} {'threads':>7} {'ms per item':>12} {'x real time':>12}")
    ratios = []  # each against a baseline timed in the same run
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            per_clip = {}
            for batch_size in (1, 32):
                clips = batch[:batch_size]
                seconds = median_seconds(lambda clips=clips: front_end(clips), args.repeats) / batch_size
                per_clip[batch_size] = seconds
                label = f"LogMel 10 s clip, batch {batch_size}" + (" (per clip)" if batch_size > 1 else "")
                print(f"{label:<38} {threads:>7} {1e3 * seconds:>12.2f} {clip_seconds / seconds:>12.0f}")
            ratios.append(f"LogMel per clip, batch 32 / batch 1 ({threads} thread(s)): {per_clip[32] / per_clip[1]:.2f}")

    file_seconds = 30
    with tempfile.TemporaryDirectory() as folder:
        signal = music_like(file_seconds, 44100)
        files = {"FLAC": Path(folder) / "clip.flac", "MP3": Path(folder) / "clip.mp3"}
        soundfile.write(files["FLAC"], signal, 44100, subtype="PCM_16")
        soundfile.write(files["MP3"], signal, 44100, format="MP3", subtype="MPEG_LAYER_III")
        for name, path in files.items():
            # decoding and resampling are single-threaded; torch threads do not apply
            file_repeats = max(args.repeats // 2, 3)
            seconds = median_seconds(lambda path=path: load_audio(path, SAMPLE_RATE), file_repeats)
            decode_only = median_seconds(lambda path=path: soundfile.read(path, dtype="float32"), file_repeats)
            label = f"load_audio 30 s 44.1k stereo {name}"
            print(f"{label:<38} {1:>7} {1e3 * seconds:>12.2f} {file_seconds / seconds:>12.0f}")
            label = f"  of which decoding ({name})"
            print(f"{label:<38} {1:>7} {1e3 * decode_only:>12.2f} {file_seconds / decode_only:>12.0f}")
            ratios.append(f"load_audio / decoding alone ({name}): {seconds / decode_only:.2f}")
    for line in ratios:
        print(f"RESULT {line}")


if __name__ == "__main__":
    main()
