"""Backbone size and training-step cost per preset, thread count and memory layout.

One step is what the trainer does per batch for the backbone: forward of 32 pairs of 4 s views
(64 log-mel spectrograms), a scalar loss, backward. Heads and the optimiser are not included.
Timings are medians over ``--repeats`` steps after one warm-up step; the ratios are what carries over
to other machines.

    python benchmarks/bench_models.py [--threads 1 2] [--repeats 7] [--pairs 32]

Results on the development machine (2 CPU cores shared with other work, torch 2.13.0+cpu, load
average 0.4-0.8 during the run; default arguments):

    preset  mels x frames     params      trunk       pool         layout threads  step s
    paper       128 x 126  2,800,392  1,480,456  1,319,936  channels_last       1   0.701
    paper       128 x 126  2,800,392  1,480,456  1,319,936  channels_last       2   0.416
    paper       128 x 126  2,800,392  1,480,456  1,319,936     contiguous       1   0.915
    paper       128 x 126  2,800,392  1,480,456  1,319,936     contiguous       2   0.521
    cpu          64 x 126    486,580    221,620    264,960  channels_last       1   0.113
    cpu          64 x 126    486,580    221,620    264,960  channels_last       2   0.102
    cpu          64 x 126    486,580    221,620    264,960     contiguous       1   0.171
    cpu          64 x 126    486,580    221,620    264,960     contiguous       2   0.097

    paper / cpu preset: 6.2x on 1 thread, 4.1x on 2. Channels-last (the backbone's layout) vs
    contiguous: 1.3x faster for paper, 1.5-1.6x for cpu on 1 thread, about even for cpu on 2.
    A second thread gives 1.7x for paper but only 1.1x for cpu: for searches with the cpu preset,
    run one single-threaded trial per core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from musicssl.cli import int_in
from musicssl.models import PRESETS, Backbone, parameter_counts


def step_seconds(backbone: Backbone, pairs: int, repeats: int) -> float:
    """Median wall time of forward + backward on ``2 * pairs`` spectrograms of the configured size."""
    config = backbone.config
    generator = torch.Generator().manual_seed(0)
    views = torch.randn(2 * pairs, config.n_mels, config.n_frames, generator=generator)
    backbone.train()
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        backbone.zero_grad(set_to_none=True)
        loss = backbone(views).square().mean()
        loss.backward()
        elapsed = time.perf_counter() - start
        if index > 0:  # the first step pays for oneDNN's kernel selection and allocations
            times.append(elapsed)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int_in(1), nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int_in(1), default=7)
    parser.add_argument("--pairs", type=int_in(1), default=32, help="view pairs per batch (the batch holds twice as many)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = parser.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.2f}, "
        f"batch {2 * args.pairs} spectrograms"
    )
    print()
    header = (
        f"{'preset':7s} {'mels x frames':>13s} {'params':>10s} {'trunk':>10s} {'pool':>10s} "
        f"{'layout':>14s} {'threads':>7s} {'step s':>7s}"
    )
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, str, int], float] = {}
    for name in args.presets:
        torch.manual_seed(0)
        backbone = Backbone(preset=name)
        counts = parameter_counts(backbone)
        for layout in ("channels_last", "contiguous"):
            # The backbone keeps its trunk channels-last; "contiguous" shows what that choice buys.
            memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            backbone.trunk.to(memory_format=memory_format)
            for threads in args.threads:
                torch.set_num_threads(threads)
                seconds = step_seconds(backbone, args.pairs, args.repeats)
                results[(name, layout, threads)] = seconds
                size = f"{backbone.config.n_mels} x {backbone.config.n_frames}"
                print(
                    f"{name:7s} {size:>13s} {counts['total']:>10,d} {counts['trunk']:>10,d} "
                    f"{counts['attention_pool']:>10,d} {layout:>14s} {threads:>7d} {seconds:>7.3f}",
                    flush=True,
                )

    print()
    print("ratios of step times")
    ratios: list[tuple[str, float]] = []
    first_threads = args.threads[0]
    if "paper" in args.presets and "cpu" in args.presets:
        for threads in args.threads:
            ratio = results[("paper", "channels_last", threads)] / results[("cpu", "channels_last", threads)]
            ratios.append((f"paper / cpu preset, {threads} thread(s)", ratio))
    for name in args.presets:
        for threads in args.threads:
            ratio = results[(name, "contiguous", threads)] / results[(name, "channels_last", threads)]
            ratios.append((f"{name}: contiguous / channels-last, {threads} thread(s)", ratio))
        for threads in args.threads[1:]:
            ratio = results[(name, "channels_last", first_threads)] / results[(name, "channels_last", threads)]
            ratios.append((f"{name}: {first_threads} thread(s) / {threads} threads", ratio))
    width = max(len(label) for label, _ in ratios) if ratios else 0
    for label, ratio in ratios:
        print(f"  {label:<{width}s}  {ratio:5.2f}x")

if __name__ == "__main__":
    main()
