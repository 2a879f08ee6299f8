"""Cost of the collapse metrics, as a fraction of training time.

Times :func:`musicssl.collapse.collapse_metrics` on one probe batch the size the trainer uses
(512 segments: 256-d embeddings, 1024-d projections, assignment probabilities over 4096
prototypes), each metric group on its own, and, for the ratio, one training step of ``--method`` on
the "cpu" preset (its loss on 32 pairs of views, forward + backward, as in bench_trainer.py without the
optimiser) and the probe forward pass that the trainer runs before the metrics: the method's
``collapse_outputs`` on 512 segments in eval mode (backbone and head, and for BYOL and clustering the
teacher too). Medians over ``--repeats`` calls after one warm-up call.

    python benchmarks/bench_collapse.py [--threads 1] [--repeats 9] [--every 25] [--no-model]
                                        [--method vicreg]

Results on the development machine (2 CPU cores, quiet: load average 0.4-1.4; torch 2.13.0+cpu,
1 thread, default arguments; 2026-12-06):

    collapse_metrics, all outputs         36-45 ms
      embedding only                       5 ms      (RankMe via 256x256 float64 eigvalsh, L2 std,
                                                      uniformity, mean cosine)
      projection only                     20-21 ms   (RankMe via 512x512 float64 eigvalsh, L2 std)
      assignment_probs only               10 ms      (checks, argmax, two entropies over 2M entries)
    training step (64 spectrograms)      142 ms (vicreg), 161 ms (byol), 165 ms (clustering)
    probe forward (eval mode)            294 ms (vicreg), 577 ms (byol), 662 ms (clustering)

    metrics / training step:  0.23-0.30
    metrics every 25 steps:   0.9-1.2% of training time (within the 3% budget)
    metrics + probe forward every 25 steps: 9.5 % (vicreg), 15-17 % (byol, clustering: their teacher
    doubles the forward); staying within 3% with the forward pass included takes an evaluation every
    ~80 steps (vicreg) or ~130-140 (byol, clustering), or a smaller probe set.
    (Before 2026-12-06 both sides of the ratio were the backbone's alone, whatever the method: a
    172-232 ms step and a 549-739 ms forward at a load average of 4.5-5.3, "14-15 %" and "every ~120
    steps".)

Where the time goes (cProfile, 1 thread): the two float64 eigvalsh calls are ~45% of
collapse_metrics, the float64 Gram matrices ~15%; the alternatives are slower (float32 svdvals of
512 x 1024: 60 ms) or less exact on collapsed inputs (a float32 Gram matrix puts a noise floor of
up to ~3e-4 s_max under the singular values: RankMe of rank-one 2048 x 512 data is 1.14 with it,
1.0008 here).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from musicssl.cli import int_in
from musicssl.collapse import collapse_metrics
from musicssl.pretext.registry import available_methods


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``function()`` over ``repeats`` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_batch(samples: int, embedding_dim: int, projection_dim: int, prototypes: int) -> dict[str, torch.Tensor]:
    """Healthy-looking synthetic outputs of the given sizes (the cost does not depend on values)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "embedding": torch.randn(samples, embedding_dim, generator=generator),
        "projection": torch.randn(samples, projection_dim, generator=generator),
        "assignment_probs": torch.softmax(3.0 * torch.randn(samples, prototypes, generator=generator), dim=1),
    }


def model_seconds(samples: int, pairs: int, repeats: int, method: str) -> tuple[float, float]:
    """(training step, probe forward) seconds of ``method`` on the "cpu" backbone preset: the step is its
    training loss on ``pairs`` pairs of views and the backward pass (heads, and the teacher's forward for
    BYOL and clustering, included; no optimiser); the probe forward is its ``collapse_outputs`` on the
    probe set in eval mode, as the trainer's ``evaluate_collapse`` runs it."""
    from musicssl.pretext.base import Progress
    from musicssl.train import COLLAPSE_CHUNK, TrainConfig, build_method

    module = build_method(TrainConfig(method=method, preset="cpu"))
    config = module.backbone.config
    generator = torch.Generator().manual_seed(0)
    views = list(torch.randn(pairs, 2, config.n_mels, config.n_frames, generator=generator).unbind(dim=1))
    probe = torch.randn(samples, config.n_mels, config.n_frames, generator=generator)

    def training_step() -> None:
        module.train()
        module.zero_grad(set_to_none=True)
        module.training_loss(views, Progress(0, 100, 100))["loss"].backward()

    def probe_forward() -> None:
        module.eval()
        with torch.no_grad():
            for chunk in probe.split(COLLAPSE_CHUNK):
                module.collapse_outputs(chunk)

    return median_seconds(training_step, repeats), median_seconds(probe_forward, max(3, repeats // 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int_in(1), default=1)
    parser.add_argument("--repeats", type=int_in(1), default=9)
    parser.add_argument("--samples", type=int_in(2), default=512)
    parser.add_argument("--embedding-dim", type=int_in(1), default=256)
    parser.add_argument("--projection-dim", type=int_in(1), default=1024)
    parser.add_argument("--prototypes", type=int_in(2), default=4096)
    parser.add_argument("--every", type=int_in(1), default=25, help="training steps between collapse evaluations")
    parser.add_argument("--pairs", type=int_in(1), default=32, help="view pairs per training step")
    parser.add_argument("--no-model", action="store_true", help="skip timing the backbone")
    parser.add_argument("--method", default="vicreg", choices=available_methods(),
                        help="whose collapse_outputs the probe forward runs (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    outputs = probe_batch(args.samples, args.embedding_dim, args.projection_dim, args.prototypes)
    rows = [
        ("collapse_metrics, all outputs", lambda: collapse_metrics(outputs)),
        ("  embedding only", lambda: collapse_metrics({"embedding": outputs["embedding"]})),
        ("  projection only", lambda: collapse_metrics({"projection": outputs["projection"]})),
        ("  assignment_probs only", lambda: collapse_metrics({"assignment_probs": outputs["assignment_probs"]})),
    ]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); probe batch {args.samples} x "
        f"(embedding {args.embedding_dim}, projection {args.projection_dim}, probs {args.prototypes})"
    )
    metrics_seconds = 0.0
    for name, function in rows:
        seconds = median_seconds(function, args.repeats)
        metrics_seconds = metrics_seconds or seconds
        print(f"{name:<34} {1000 * seconds:8.1f} ms")
    if args.no_model:
        return
    step, forward = model_seconds(args.samples, args.pairs, args.repeats, args.method)
    print(f"{'cpu-preset training step':<34} {1000 * step:8.1f} ms  ({2 * args.pairs} spectrograms, {args.method}'s "
          "loss, fwd + bwd)")
    print(f"{'probe forward (eval mode)':<34} {1000 * forward:8.1f} ms  ({args.samples} segments, "
          f"{args.method}'s collapse_outputs)")
    interval = args.every * step
    print(f"metrics / training step:            {metrics_seconds / step:8.3f}")
    print(f"metrics every {args.every} steps:             {100 * metrics_seconds / interval:7.2f} % of training time")
    print(f"metrics + probe forward every {args.every}:   {100 * (metrics_seconds + forward) / interval:7.2f} %")
    for budget in (0.03,):
        print(
            f"evaluate at most every {(metrics_seconds + forward) / (budget * step):.0f} steps to keep metrics + "
            f"probe forward within {100 * budget:.0f}% (metrics alone: every {metrics_seconds / (budget * step):.0f})"
        )


if __name__ == "__main__":
    main()
