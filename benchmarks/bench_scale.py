"""How the probe objective's memory and the folder loader's time grow with the number of tracks.

For each size in ``--tracks`` a synthetic dataset is written (``bench_downstream.py``'s tones of ``--seconds``,
70 % train, 10 % valid, 20 % test) and its 64-mel cache built; then, in a fresh process per size:

- ``probe_score`` (a search's objective: 2 segments per track, a linear probe train -> valid) of a random
  cpu-preset backbone, one thread: its seconds, and the peak growth of the process's anonymous memory
  (``RssAnon``, sampled every 5 ms) while it runs. The mel cache is memory-mapped: the pages it reads count in
  the resident size but are the file's, which the kernel takes back under pressure, so they are left out;
- the folder loader on a tags table that names ``.m4a`` files (a format not read here) by ``track_id``, one row
  per track: its seconds per row.

Each is reported per track, and the ``RESULT`` lines give the largest size's per-track cost over the smallest's
(1 where the cost is linear in the tracks; below 1 where a fixed part dominates; above 1 where it grows faster).

    python benchmarks/bench_scale.py [--tracks 600 3000] [--seconds 10] [--keep DIR]

Results (2026-12-07, this machine, load average about 1; 600 and 3,000 tracks of 10 s, 420 and 2,100 of them
training tracks), today's code against the code before that day's change (run with ``PYTHONPATH`` set to a copy
of the earlier ``src/``), two runs each:

    what                                            420 / 600      2,100 / 3,000    RESULT ratio
    probe_score anonymous memory growth, today      87 MB          78 MB            0.18 (a fixed part)
    probe_score anonymous memory growth, before     87 MB          178-191 MB       0.39 (+64 KB per track)
    folder loader per .m4a row, today               0.07 ms        0.08-0.11 ms     1.45
    folder loader per .m4a row, before              4.6 ms         27.4-28.2 ms     5.89 (quadratic)

Before, the probe gathered the 2 segments of every track of a split (64 x 126 float32 each: 64 KB per track)
before embedding them, and the loader scanned every ``.m4a`` file per row. probe_score took 3.9-4.5 s at 2,100
training tracks either way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_downstream import write_synthetic  # the same synthetic tagged tracks (7 train, 1 valid, 2 test per 10)
from musicssl.cli import int_in


def write_m4a_folder(folder: Path, tracks: int) -> Path:
    """``tracks`` small .m4a files in 16 sub-folders and a tags table naming each by its track_id."""
    rows = ["track_id,tags"]
    for number in range(tracks):
        name = f"{number % 16:x}/m{number:06d}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(16))
        rows.append(f"{name},rock")
    (folder / "tags.csv").write_text("\n".join(rows) + "\n")
    return folder


def anonymous_kb(pid: int | str = "self") -> int:
    """The anonymous resident memory of process ``pid`` (default: this one) in KB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status (Linux only)")


def measure(tags: str, cache_dir: str, m4a_folder: str) -> dict:
    """In this process: probe_score's seconds and peak anonymous memory growth, the loader's seconds."""
    import logging

    import torch

    from musicssl.data.cache import LogMelConfig
    from musicssl.data.loaders import open_dataset
    from musicssl.data.pipeline import prepare_data
    from musicssl.models import Backbone
    from musicssl.train import probe_score

    torch.set_num_threads(1)
    data = prepare_data(tags, LogMelConfig(n_mels=64), cache_dir=cache_dir, workers=0, verbose=False)
    torch.manual_seed(0)
    backbone = Backbone(preset="cpu")
    probe_score(backbone, data, 2)  # warm-up: thread pools, first allocations
    peak, running = [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], anonymous_kb())
            time.sleep(0.005)

    before = anonymous_kb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    probe_score(backbone, data, 2)
    probe_seconds = time.perf_counter() - started
    running[0] = False
    sampler.join()
    logging.disable(logging.WARNING)  # the loader warns of the .m4a files, as it should
    started = time.perf_counter()
    index = open_dataset(m4a_folder)
    loader_seconds = time.perf_counter() - started
    return {"train_tracks": len(data.track_ids("train")), "probe_seconds": probe_seconds,
            "probe_growth_mb": max(peak[0] - before, 0) / 1024, "loader_rows": len(index),
            "loader_seconds": loader_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracks", type=int_in(20), nargs="+", default=[600, 3000],
                        help="dataset sizes, in tracks, at least 20 each (default 600 3000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each track (default 10, at least 8)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the datasets and caches here and keep them (default: a temporary folder, removed)")
    parser.add_argument("--measure", nargs=3, metavar=("TAGS", "CACHE", "M4A"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    if not 8.0 <= args.seconds <= 600.0:
        parser.error(f"argument --seconds: expected 8 to 600 (two 4 s segments per track), got {args.seconds:g}")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        root = args.keep or Path(scratch)
        results = []
        for tracks in sorted(set(args.tracks)):
            folder = root / f"tracks-{tracks}"
            print(f"{tracks} tracks: writing the dataset and the .m4a folder ...", file=sys.stderr, flush=True)
            tags = write_synthetic(folder / "audio", tracks, args.seconds)
            m4a = write_m4a_folder(folder / "m4a", tracks)
            done = subprocess.run([sys.executable, __file__, "--measure", str(tags), str(folder / "mels"), str(m4a)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"{tracks:>7} tracks: probe_score {result['probe_seconds']:.1f} s, anonymous memory growth "
                  f"{result['probe_growth_mb']:.0f} MB ({result['train_tracks']} training tracks); folder loader "
                  f"{1000 * result['loader_seconds'] / result['loader_rows']:.2f} ms per .m4a row")
    if len(results) > 1:
        small, large = results[0], results[-1]
        memory = ((large["probe_growth_mb"] / large["train_tracks"]) / max(small["probe_growth_mb"] / small["train_tracks"],
                                                                           1e-9))
        loader = (large["loader_seconds"] / large["loader_rows"]) / (small["loader_seconds"] / small["loader_rows"])
        print(f"RESULT probe_score anonymous memory growth per training track, {large['train_tracks']} / "
              f"{small['train_tracks']} tracks: {memory:.2f} (1: linear in the tracks; below: a fixed part)")
        print(f"RESULT folder loader seconds per .m4a row, {large['loader_rows']} / {small['loader_rows']} rows: "
              f"{loader:.2f} (1: linear; the number of rows times this: quadratic)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
