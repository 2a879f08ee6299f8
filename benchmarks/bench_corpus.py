"""Benchmark: building the default embedded corpus (600 songs x 30 s), and what the note bank buys.

Measured in one run:

1. cold build: the note bank is rendered (into a fresh cache) and the 600 tracks are built;
2. warm build: the same with the bank already cached (what every later build costs);
3. baseline: a handful of the same songs rendered directly with midirenderer, one process, against
   the note-bank path (compose + synthesise + master + write) for the same songs, one process.

Wall seconds depend on what else runs on the machine, so CPU seconds (this process and its workers)
are reported too. Run: ``python benchmarks/bench_corpus.py [--songs 8] [--workers W]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from musicssl.cli import int_in
from musicssl.corpus import CorpusConfig, build_corpus
from musicssl.corpus.build import build_track
from musicssl.corpus.compose import compose_song, draw_factors
from musicssl.corpus.render import (
    NoteBank,
    default_workers,
    render_song_directly,
    soundfont_path,
)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (the build's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def timed_build(out_dir: Path, cache: Path, workers: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, bank wall seconds) of one default-size build."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    report = build_corpus(out_dir, CorpusConfig(), workers=workers, bank_cache_dir=cache, progress=False)
    return time.perf_counter() - wall, cpu_seconds() - cpu, report.bank_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--songs", type=int_in(1), default=8, help="songs for the direct-rendering baseline (default 8)")
    parser.add_argument("--workers", type=int_in(1), default=default_workers(), help="build workers (default: one per CPU)")
    args = parser.parse_args()
    config = CorpusConfig()

    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as scratch:
        scratch = Path(scratch)
        cache = scratch / "cache"
        cold_wall, cold_cpu, bank_wall = timed_build(scratch / "cold", cache, args.workers)
        warm_wall, warm_cpu, _ = timed_build(scratch / "warm", cache, args.workers)
        bank_dir = next(cache.glob("notebank-*"))
        bank_bytes, corpus_bytes = folder_bytes(bank_dir), folder_bytes(scratch / "warm")

        # Baseline: the first few songs of the corpus, rendered directly vs through the note bank.
        soundfont = soundfont_path().read_bytes()
        songs = []
        for number in range(args.songs):
            rng = np.random.default_rng([config.seed, number, 0])
            songs.append(compose_song(draw_factors(rng), config.seconds, rng))
        started = time.process_time()
        for song in songs:
            render_song_directly(song, soundfont)
        direct_per_song = (time.process_time() - started) / args.songs

        bank = NoteBank(bank_dir)
        out = scratch / "one-by-one"
        (out / "audio").mkdir(parents=True)
        (out / "midi").mkdir()
        started = time.process_time()
        for number in range(args.songs):
            build_track(number, config, bank, out, "train")
        bank_per_song = (time.process_time() - started) / args.songs

    tracks = config.tracks
    print(f"machine: {os.cpu_count()} CPUs, {args.workers} workers; corpus {tracks} songs x {config.seconds:g} s (seed {config.seed})")
    print()
    print("| measurement | wall s | CPU s | tracks/s (wall) |")
    print("|---|---|---|---|")
    print(f"| cold build (note bank rendered: {bank_wall:.1f} s wall) | {cold_wall:.1f} | {cold_cpu:.1f} | {tracks / cold_wall:.1f} |")
    print(f"| warm build (note bank cached) | {warm_wall:.1f} | {warm_cpu:.1f} | {tracks / warm_wall:.1f} |")
    print()
    print(f"| per 30 s song, one process ({args.songs} songs) | CPU s | 600 songs, CPU s |")
    print("|---|---|---|")
    print(f"| midirenderer, whole song (dry, to 16 kHz mono; no mix/EQ/reverb/file) | {direct_per_song:.3f} | {direct_per_song * tracks:.0f} |")
    print(f"| note bank: compose + synthesise + EQ/reverb/level + FLAC + MIDI | {bank_per_song:.3f} | {bank_per_song * tracks:.0f} |")
    print(f"| ratio (direct / note bank) | {direct_per_song / bank_per_song:.1f}x | |")
    print()
    print(f"note bank on disk: {bank_bytes / 1e6:.1f} MB; corpus on disk: {corpus_bytes / 1e6:.1f} MB "
          f"({corpus_bytes / tracks / 1e3:.0f} kB per track, FLAC + MIDI + tracks.csv)")


if __name__ == "__main__":
    main()
