"""How much memory ``analysis.downstream``'s probe fits take, against the training embeddings they fit on.

A synthetic evaluation's embeddings (``--segments`` training segments of ``--dim`` float32 values, 25 per
training track, plus valid and test track means, ``--tags`` tags) are written to an embedding cache file as
``analysis.downstream`` writes them. Then, in a fresh process per ``--workers`` value, they are read back
(``load_embeddings``) and one probe is fitted on the limited-data subsets (``--fractions``, ``--draws``) as an
evaluation fits them (``_fit_probes``; short fits: 2 checks of one epoch each), in that process (0) or in that
many probe processes. The process tree's anonymous memory (``RssAnon``: the parent and the probe processes,
sampled every 5 ms; file pages, which the kernel takes back under pressure, are not counted) is measured from
before the read to the end of the fits; the probe processes are started, and have imported torch, before.

``RESULT`` lines give the peak growth over the size of the training segments' embeddings (the baseline, in
the same run): about 1 means one copy of them is held at the worst moment.

    python benchmarks/bench_probe_memory.py [--segments 200000] [--dim 256] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_scale import anonymous_kb  # (RssAnon of a process, Linux)
from musicssl.cli import int_in

SEGMENTS_PER_TRACK = 25


def _anonymous_kb(pid: int) -> int:
    try:
        return anonymous_kb(pid)
    except OSError:  # a process that has just ended
        return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux: /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                pass
    return found


def _tree_kb() -> tuple[int, int]:
    """(this process's, its descendants') anonymous memory in KB."""
    pids = _tree(os.getpid())
    return _anonymous_kb(pids[0]), sum(_anonymous_kb(pid) for pid in pids[1:])


def synthetic(folder: Path, segments: int, dim: int, tags: int, seed: int = 0) -> Path:
    """An embedding cache file of ``segments`` training segments (and 1 valid, 2 test tracks per 7 training
    tracks), written by ``save_embeddings``; its labels beside it, in ``labels.npy``."""
    import numpy as np

    from analysis.downstream import Embeddings, save_embeddings

    rng = np.random.default_rng(seed)
    train_tracks = max(segments // SEGMENTS_PER_TRACK, 7)
    valid_tracks, test_tracks = max(train_tracks // 7, 2), max(2 * train_tracks // 7, 4)
    splits = np.asarray(["train"] * train_tracks + ["valid"] * valid_tracks + ["test"] * test_tracks)
    counts = np.where(splits == "train", SEGMENTS_PER_TRACK, 0)
    labels = rng.random((len(splits), tags)) < 0.2
    labels[:3] = True  # every tag has a positive among the training tracks
    # A little signal in the embeddings, so that the probes learn something.
    directions = rng.standard_normal((tags, dim)).astype(np.float32)
    means = (labels @ directions).astype(np.float32) + rng.standard_normal((len(splits), dim), dtype=np.float32)
    rows = np.repeat(np.arange(len(splits)), counts)
    train_segments = means[rows] + rng.standard_normal((len(rows), dim), dtype=np.float32)
    path = folder / "embeddings.npz"
    save_embeddings(path, Embeddings([f"t{i}" for i in range(len(splits))], splits, means, counts, train_segments), {})
    np.save(folder / "labels.npy", labels.astype(np.float32))
    return path


def measure(path: str, workers: int, fractions: list[float], draws: int) -> dict:
    """In this process: the peak anonymous memory growth of reading the embeddings and fitting one probe."""
    import numpy as np
    import torch

    from analysis import downstream as ds

    torch.set_num_threads(1)
    labels = np.load(Path(path).parent / "labels.npy")
    classifier = ds.ClassifierConfig(check_every_steps=1, max_checks=2, patience=1)
    config = ds.DownstreamConfig(fractions=tuple(fractions), draws=draws, probe_workers=workers, classifier=classifier)
    device = torch.device("cpu")

    def positions(splits: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.flatnonzero(splits == name) for name in ("train", "valid", "test")}

    def subsets(train_labels: np.ndarray) -> dict:
        return ds.limited_data_subsets(train_labels, config.fractions, config.draws, config.seed)

    processes = ds._probe_processes(config, device, 2 * workers) if workers else None
    try:
        # Warm-up, on a small part: the probe processes start and import torch; first allocations.
        small = ds.load_embeddings(Path(path))
        keep = np.flatnonzero(np.cumsum(small.segment_counts) <= 2000)
        keep = np.concatenate([keep, np.flatnonzero(small.splits != "train")])
        rows, _ = ds.segment_rows(small.segment_counts, keep)
        tiny = ds.Embeddings([small.track_ids[p] for p in keep], small.splits[keep], small.track_means[keep],
                             small.segment_counts[keep], np.array(small.segments[rows]))
        del small
        split_positions = positions(tiny.splits)
        ds._fit_probes("linear", tiny, labels[keep], split_positions,
                       subsets(labels[keep][split_positions["train"]]), config, device, processes)
        del tiny
        own, children = _tree_kb()
        before, peak, running = own + children, [own + children, own, children], [True]

        def sample() -> None:
            while running[0]:
                own, children = _tree_kb()
                if own + children > peak[0]:
                    peak[:] = [own + children, own, children]
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        embeddings = ds.load_embeddings(Path(path))
        split_positions = positions(embeddings.splits)
        rows, _ = ds._fit_probes("linear", embeddings, labels, split_positions,
                                 subsets(labels[split_positions["train"]]), config, device, processes)
        seconds = time.perf_counter() - started
        running[0] = False
        sampler.join()
        size_mb = embeddings.segments.nbytes / 2**20
    finally:
        if processes is not None:
            processes.end()
    return {"workers": workers, "fits": len(rows), "seconds": seconds, "segments_mb": size_mb,
            "growth_mb": (peak[0] - before) / 1024, "parent_mb": peak[1] / 1024, "children_mb": peak[2] / 1024}


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int_in(SEGMENTS_PER_TRACK * 7), default=200_000,
                        help="training segments (default 200000)")
    parser.add_argument("--dim", type=int_in(1), default=256, help="embedding size (default 256)")
    parser.add_argument("--tags", type=int_in(2), default=50, help="tags (default 50)")
    parser.add_argument("--workers", type=int_in(0), nargs="+", default=[0, 2],
                        help="probe processes, one measurement each (0: in the measuring process; default 0 2)")
    parser.add_argument("--fractions", type=_fraction, nargs="+", default=[0.5, 1.0],
                        help="limited-data fractions (default 0.5 1.0)")
    parser.add_argument("--draws", type=int_in(1), default=2, help="draws per fraction (default 2)")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.fractions, args.draws)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-probe-memory-") as folder:
        started = time.perf_counter()
        path = synthetic(Path(folder), args.segments, args.dim, args.tags)
        print(f"wrote {args.segments} training segments of {args.dim} values ({path.stat().st_size / 2**20:.0f} MB "
              f"file) in {time.perf_counter() - started:.1f} s", flush=True)
        for workers in args.workers:
            command = [sys.executable, __file__, "--measure", str(path), str(workers), "--draws", str(args.draws),
                       "--fractions", *map(str, args.fractions)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(f"{workers} probe processes: {result['fits']} fits in {result['seconds']:.1f} s; peak growth "
                  f"{result['growth_mb']:.0f} MB (at the peak: this process {result['parent_mb']:.0f} MB, the probe "
                  f"processes {result['children_mb']:.0f} MB) for {result['segments_mb']:.0f} MB of segments",
                  flush=True)
            print(f"RESULT probe_memory_over_segments workers={workers} "
                  f"{result['growth_mb'] / result['segments_mb']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
