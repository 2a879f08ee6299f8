"""Downstream evaluation cost: embedding throughput (tracks/s) and the time of a full evaluation.

Data: the embedded corpus (600 tracks x 30 s, built if missing, in ``$MUSICSSL_CACHE``), or with
``--synthetic`` a folder of ``--tracks`` synthetic 30 s tracks (tones plus noise, tagged by pitch
class) of the same size. The "checkpoint" is a seeded random backbone saved as a state_dict: the cost
does not depend on the weights.

1. Embedding extraction (the protocol's segments: up to 25 non-silent 4 s segments per training
   track, every segment of valid/test tracks) per preset and torch thread count: tracks/s and
   segments/s, best of ``--repeats``.
2. A full evaluation of one checkpoint, no baselines: embeddings + linear and MLP probes at 1, 5, 10,
   20, 25, 100 % x 4 draws + bootstrap, with empty caches.
3. The same evaluation again: embeddings and probe results come from the cache.

    python benchmarks/bench_downstream.py [--presets cpu paper] [--threads 1 2] [--synthetic --tracks 600]

Results on the development machine (2 CPU cores, quiet: load average 0.0-1.0; torch 2.13.0+cpu; the
corpus, default arguments, 2026-11-30):

    preset  threads  tracks  segments  seconds  tracks/s  segments/s
    cpu           1     600      4200     3.84     156.1      1092.9
    cpu           2     600      4200     2.38     251.8      1762.5
    cold  :   82.5 s in all; embeddings 2.6 s (230 tracks/s); probes linear 24 fits 26.5 s, mlp 24 fits 105.0 s
    cached:    0.3 s in all; embeddings from cache; probes from cache (linear, mlp)

The probe times are summed over the fits, which run in one process per core (``probe_workers``):
with the fits one after the other in one process the same cold evaluation took 148.6 s (linear
29.5 s, mlp 115.4 s), with identical scores. With one pool of processes for both probes of a method
(2026-12-03, load average 0.0-1.3): cold 76.3 s (embeddings 335 tracks/s; linear 26.0 s, mlp 97.9 s).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from musicssl.cli import int_in

SAMPLE_RATE = 16000


def write_synthetic(folder: Path, count: int, seconds: float = 30.0) -> Path:
    """``count`` tracks of tones plus noise, each tagged by its pitch class and register."""
    rng = np.random.default_rng(0)
    time_axis = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    lines = ["track_id,path,split,tags"]
    for number in range(count):
        pitch_class = number % 12
        register = int(rng.integers(0, 3))
        frequency = 110.0 * 2 ** (register + pitch_class / 12)
        signal = sum(np.sin(2 * np.pi * frequency * k * time_axis) / k for k in (1, 2, 3))
        signal = 0.2 * signal / np.abs(signal).max() + 0.02 * rng.standard_normal(len(time_axis))
        path = folder / "audio" / f"t{number:04d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, signal.astype(np.float32), SAMPLE_RATE)
        split = "train" if number % 10 < 7 else ("valid" if number % 10 == 7 else "test")
        lines.append(f"t{number:04d},audio/t{number:04d}.flac,{split},pitch---{pitch_class};register---{register}")
    (folder / "tracks.csv").write_text("\n".join(lines) + "\n")
    return folder / "tracks.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu"], help="backbone presets to time (cpu, paper)")
    parser.add_argument("--threads", nargs="+", type=int_in(1), default=None, help="torch thread counts (default: 1 and all)")
    parser.add_argument("--repeats", type=int_in(1), default=2)
    parser.add_argument("--synthetic", action="store_true", help="a synthetic folder dataset instead of the corpus")
    parser.add_argument("--tracks", type=int_in(1), default=600,
                        help="synthetic tracks (with --synthetic; 7 train, 1 valid and 2 test per 10, so a full "
                             "evaluation, whose bootstrap draws 2 of 3 test tracks or more, needs 19 or more)")
    parser.add_argument("--skip-full", action="store_true", help="only time embedding extraction")
    args = parser.parse_args()
    if args.synthetic and not args.skip_full and args.tracks < 19:
        # 2 of each 10 are test tracks; the bootstrap's resamples of half of them need 2 tracks, so 3 test tracks
        parser.error(f"--tracks {args.tracks}: a full evaluation needs 19 or more synthetic tracks (3 test tracks, "
                     "for the bootstrap's resamples of half of them), or pass --skip-full")

    from analysis.downstream import (
        DownstreamConfig, MethodSpec, build_backbone, compute_embeddings, resolve_method, run_downstream,
    )
    from musicssl.data.cache import LogMelConfig
    from musicssl.data.loaders import open_dataset
    from musicssl.data.pipeline import prepare_data

    cores = len(os.sched_getaffinity(0))
    thread_counts = args.threads or sorted({1, cores})
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        if args.synthetic:  # its mel caches go with it (before: a new one in $MUSICSSL_CACHE each run, never reused)
            os.environ["MUSICSSL_CACHE"] = str(scratch_path / "cache")
        dataset = str(write_synthetic(scratch_path / "synthetic", args.tracks)) if args.synthetic else "corpus"
        index = open_dataset(dataset)
        print(f"dataset {dataset}: {len(index)} tracks; {cores} cores; torch {torch.__version__}")

        print("\n1. embedding extraction (batch 256)")
        print("preset  threads  tracks  segments  seconds  tracks/s  segments/s")
        for preset in args.presets:
            spec = resolve_method("random", preset, True)
            data = prepare_data(index, LogMelConfig(n_mels=spec.n_mels), workers=None, verbose=False)
            track_ids = [t for t in index.track_ids if t in data.cache]
            splits = index.tracks.set_index("track_id").loc[track_ids, "split"].tolist()
            backbone = build_backbone(spec)
            rates = {}
            for threads in thread_counts:
                torch.set_num_threads(threads)
                best = None
                for _ in range(args.repeats):
                    with torch.inference_mode():
                        embeddings = compute_embeddings(backbone, data.cache, track_ids, splits, DownstreamConfig())
                    best = embeddings.seconds if best is None else min(best, embeddings.seconds)
                segment, hop = data.cache.settings.segment_frames(4.0), round(4.0 * data.cache.settings.frames_per_second)
                segments = int(embeddings.segment_counts.sum()) + sum(
                    (data.cache.frames(t) - segment) // hop + 1 for t, s in zip(track_ids, splits) if s != "train")
                print(f"{preset:6s}  {threads:7d}  {len(track_ids):6d}  {segments:8d}  {best:7.2f}  "
                      f"{len(track_ids) / best:8.1f}  {segments / best:10.1f}")
                rates[threads] = len(track_ids) / best
            fewest = min(rates)
            for threads in sorted(rates)[1:]:  # against the fewest threads, timed in the same run
                print(f"RESULT {preset} embedding, {threads} threads / {fewest}: {rates[threads] / rates[fewest]:.2f}x "
                      "the tracks per second")

        if args.skip_full:
            return
        torch.set_num_threads(cores)
        print("\n2./3. full evaluation of one checkpoint (cpu preset, no baselines): cold, then cached")
        checkpoint = scratch_path / "checkpoint.pt"
        torch.save(build_backbone(resolve_method("random", "cpu", True, seed=1)).state_dict(), checkpoint)
        spec: MethodSpec = resolve_method(f"checkpoint={checkpoint}", "cpu", True)
        config = DownstreamConfig(dataset=dataset, cache_dir=str(scratch_path / "embeddings"))
        took = {}
        for attempt in ("cold", "cached"):
            started = time.perf_counter()
            result = run_downstream([spec], config, progress=False, index=index)
            seconds = took[attempt] = time.perf_counter() - started
            method = result.summary["methods"][0]
            fits = result.limited.groupby("classifier")["fit_seconds"].agg(["count", "sum"])
            if method["probes_from_cache"]:
                probes = f"probes from cache ({', '.join(method['probes_from_cache'])})"
            else:
                probes = "probes " + ", ".join(f"{name} {int(row['count'])} fits {row['sum']:.1f} s"
                                               for name, row in fits.iterrows())
            embedded = ("from cache" if method["embeddings_from_cache"]
                        else f"{method['embedding_seconds']:.1f} s ({method['tracks_per_second']:.0f} tracks/s)")
            print(f"{attempt:6s}: {seconds:6.1f} s in all; embeddings {embedded}; {probes}")
        print(result.results[["method", "classifier", "roc_auc", "average_precision"]].to_string(index=False))
        print(f"RESULT full evaluation, cached / cold: {took['cached'] / took['cold']:.3f} "
              f"({took['cold']:.1f} s cold, target < 120 s)")


if __name__ == "__main__":
    main()
