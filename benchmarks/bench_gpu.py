"""The paper preset's training speed on a CUDA GPU: steps/s of the shared trainer, per method and
precision, against the bare model step measured in the same run.

    python benchmarks/bench_gpu.py [--data corpus] [--methods all] [--steps 60] [--batch-size 64]
                                   [--json FILE]

Needs a CUDA device (exits 2 without one). Two measurements, both with batch B x 2 views of 4 s
(128 mels x 126 frames) and the study's heads:

1. **Model step** (the ceiling): forward, loss, backward, gradient clipping, AdamW and the EMA update
   of the method on one random batch already on the GPU, in float32 and under bf16 autocast, with
   ``cudnn.benchmark`` off (the trainer's setting) and on. Timed with the GPU synchronised at both
   ends, after warm-up steps.
2. **Trainer**: :func:`musicssl.train.train` itself on the data's mel cache, as ``python -m
   musicssl.train METHOD --preset paper`` runs it (views cut by the sampler, copied to the GPU, the
   per-step NaN check and loss logging, the collapse metrics at each epoch end), for 2 epochs of
   ``--steps`` steps. Steps/s is taken over the second epoch's steps, from the end of its first step
   to the end of its last, so start-up, cudnn's first calls and the epoch-end collapse metrics are
   outside it. Every method in bf16-mixed (the default on a GPU); VICReg also in 32-true, with 4
   DataLoader worker processes and with ``cudnn.benchmark`` on.

The ratio trainer / model step says what the data path and Lightning cost on top of the GPU work.
``--skip-model`` / ``--skip-trainer`` run one half (the model steps need no data). Results on an
NVIDIA H200 and what they mean: ``benchmarks/README.md``, section "GPU".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import lightning.pytorch as pl
import torch

from bench_trainer import plain_step  # the same bare step as the CPU trainer benchmark's plain loop
from musicssl.train import TrainConfig, build_method, optimizer_groups, quiet_lightning, train

METHODS = ("contrastive", "byol", "clustering", "barlow_twins", "vicreg")


def model_step_seconds(method_name: str, batch_size: int, bf16: bool, benchmark: bool, steps: int,
                       warmup: int = 10, device: str = "cuda") -> float:
    """Median seconds of one bare training step (see the module docstring), over 3 timed blocks."""
    torch.backends.cudnn.benchmark = benchmark
    torch.manual_seed(0)
    config = TrainConfig(method=method_name, preset="paper", batch_size=batch_size)
    method = build_method(config).to(device).train()
    n_mels = method.backbone.config.n_mels
    optimizer = torch.optim.AdamW(
        optimizer_groups(method, config.learning_rate), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    batch = torch.randn(batch_size, 2, n_mels, 126, device=device) * 10 - 40
    total = warmup + 3 * steps

    def step(number: int) -> None:
        plain_step(method, optimizer, batch, number, total, config.gradient_clip,
                   autocast=lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16))

    for number in range(warmup):
        step(number)
    blocks = []
    for block in range(3):
        synchronize(device)
        started = time.perf_counter()
        for number in range(steps):
            step(warmup + block * steps + number)
        synchronize(device)
        blocks.append((time.perf_counter() - started) / steps)
    torch.backends.cudnn.benchmark = False
    return statistics.median(blocks)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class SecondEpochTimer(pl.Callback):
    """The time at the end of every step of the second epoch."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1:
            synchronize(self.device)
            self.ends.append(time.perf_counter())


def trainer_run(method_name: str, data, batch_size: int, steps: int, precision: str, workers: int,
                benchmark: bool = False, device: str = "cuda") -> dict:
    timer = SecondEpochTimer(device)
    # Lightning's Trainer(benchmark=None) keeps the session's cudnn.benchmark.
    torch.backends.cudnn.benchmark = benchmark
    config = TrainConfig(
        method=method_name, preset="paper", batch_size=batch_size, max_epochs=2, steps_per_epoch=steps,
        precision=precision, accelerator="gpu" if device == "cuda" else "cpu", num_workers=workers,
        final_probe=False, seed=0,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        result = train(config, data=data, progress_bar=False, callbacks=[timer])
    finally:
        torch.backends.cudnn.benchmark = False
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    ends = timer.ends
    seconds_per_step = (ends[-1] - ends[0]) / (len(ends) - 1)
    return {
        "method": method_name, "precision": precision, "workers": workers, "cudnn_benchmark": benchmark,
        "steps_per_s": 1.0 / seconds_per_step, "ms_per_step": 1000 * seconds_per_step,
        "run_seconds": result.seconds, "verdict": result.verdict,
        "first_epoch_loss": result.epochs[0].get("train_loss"), "last_epoch_loss": result.epochs[-1].get("train_loss"),
        "rankme": result.epochs[-1].get("collapse_rankme_embedding"), "peak_gib": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="corpus", help="dataset for the trainer runs (default: the embedded corpus)")
    parser.add_argument("--methods", default="all", help="comma-separated methods, or 'all'")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement (default 60)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-model", action="store_true", help="only the trainer runs")
    parser.add_argument("--skip-trainer", action="store_true", help="only the model steps (no data needed)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--cpu", action="store_true", help="dry run of the script on the CPU (tiny --steps)")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if args.steps < 2 or args.batch_size < 2:
        print("bench_gpu: --steps and --batch-size must be at least 2 (a rate needs two step ends; batch "
              "statistics need two samples)", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible to torch; run it on a machine with a GPU (or --cpu for a dry run)",
              file=sys.stderr)
        return 2
    methods = METHODS if args.methods == "all" else tuple(m.strip() for m in args.methods.split(","))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"bench_gpu: unknown method(s) {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    quiet_lightning()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    print(f"GPU: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
          f"paper preset, batch {args.batch_size} x 2 views of 128 mels x 126 frames", flush=True)
    results: dict = {"device": name, "torch": torch.__version__, "batch_size": args.batch_size, "model": [], "trainer": []}

    if not args.skip_model:
        print("\nmodel step (random batch on the GPU; median of 3 blocks):", flush=True)
        # cudnn.benchmark on and off for VICReg only: the convolutions are the same for every method.
        settings = [(m, bf16, False) for m in methods for bf16 in (False, True)]
        settings += [("vicreg", bf16, True) for bf16 in (False, True) if "vicreg" in methods]
        for method_name, bf16, benchmark in settings:
            seconds = model_step_seconds(method_name, args.batch_size, bf16, benchmark, args.steps, device=device)
            row = {"method": method_name, "precision": "bf16" if bf16 else "fp32",
                   "cudnn_benchmark": benchmark, "ms_per_step": 1000 * seconds, "steps_per_s": 1 / seconds}
            results["model"].append(row)
            print(f"  {method_name:13s} {row['precision']:5s} cudnn.benchmark={str(benchmark):5s} "
                  f"{row['ms_per_step']:7.2f} ms/step  {row['steps_per_s']:7.1f} steps/s", flush=True)

    if args.skip_trainer:
        methods = ()
    from musicssl.data.cache import LogMelConfig
    from musicssl.data.pipeline import prepare_data

    data = None if args.skip_trainer else prepare_data(args.data, LogMelConfig(n_mels=128), verbose=True)
    if data is not None:
        print(f"\ntrainer (musicssl.train.train on {args.data!r}: {len(data.track_ids('train'))} training tracks; "
              f"second epoch of {args.steps} steps):", flush=True)
    runs = [(m, "bf16-mixed", 0, False) for m in methods]
    if "vicreg" in methods:
        runs += [("vicreg", "32-true", 0, False), ("vicreg", "bf16-mixed", 4, False), ("vicreg", "bf16-mixed", 0, True)]
    for method_name, precision, workers, benchmark in runs:
        row = trainer_run(method_name, data, args.batch_size, args.steps, precision, workers, benchmark, device)
        model = [r for r in results["model"] if r["method"] == method_name and r["cudnn_benchmark"] == benchmark
                 and r["precision"] == ("bf16" if precision == "bf16-mixed" else "fp32")]
        if model:
            row["trainer_over_model"] = row["ms_per_step"] / model[0]["ms_per_step"]
        results["trainer"].append(row)
        ratio = f"  trainer/model {row['trainer_over_model']:.2f}" if model else ""
        peak = row["peak_gib"]
        print(f"  {method_name:13s} {precision:10s} workers={workers} cudnn.benchmark={str(benchmark):5s} "
              f"{row['ms_per_step']:7.2f} ms/step  "
              f"{row['steps_per_s']:6.1f} steps/s{ratio}  (run {row['run_seconds']:.1f} s, loss "
              f"{row['first_epoch_loss']:.4g} -> {row['last_epoch_loss']:.4g}, verdict {row['verdict']}, peak {peak:.1f} GiB)", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
