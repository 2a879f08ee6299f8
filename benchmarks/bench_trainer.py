"""Training-step cost of the shared Lightning module against a plain PyTorch loop, and the share of
training time spent on collapse metrics.

    python benchmarks/bench_trainer.py [--method vicreg] [--steps 40] [--repeats 3]

Both loops train the same method (CPU preset, batch 64 x 2 views of 4 s) from the same initial
weights on the same in-memory batches, with the same optimiser and schedule; Lightning runs with
logger, checkpointing, progress bar and collapse metrics off. The two are interleaved and repeated,
and the ratio of medians is reported (this machine is shared and noisy; a ratio measured in one run
is what carries over).

The collapse-metric share is measured on a real run of the default epoch (100 steps) with the
default probe set of 512 validation segments: seconds inside ``evaluate_collapse`` over the run's
training seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset

from musicssl.cli import int_in
from musicssl.pretext.base import Progress
from musicssl.pretext.registry import available_methods
from musicssl.train import SSLModule, TrainConfig, build_method, optimizer_groups, quiet_lightning, warmup_cosine


class RepeatedBatches(Dataset):
    """``steps`` batches drawn once, served in order (so both loops see identical data)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return self.batches[index], torch.zeros(len(self.batches[index]), dtype=torch.long)


def plain_step(method, optimizer, batch: torch.Tensor, step: int, total: int, gradient_clip: float,
               autocast=contextlib.nullcontext) -> None:
    """One training step without Lightning: loss (inside ``autocast()``), backward, clipping, AdamW, EMA."""
    views = list(batch.unbind(dim=1))
    with autocast():
        loss = method.training_loss(views, Progress(step, total, total))["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(method.student_parameters(), gradient_clip)
    optimizer.step()
    method.after_optimizer_step(Progress(step, total, total))  # as the trainer: the update after step k uses k


def plain_loop(method, config: TrainConfig, batches: list[torch.Tensor]) -> float:
    optimizer = torch.optim.AdamW(
        optimizer_groups(method, config.learning_rate), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total = len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 5, total))
    method.train()
    started = time.perf_counter()
    for step, batch in enumerate(batches):
        plain_step(method, optimizer, batch, step, total, config.gradient_clip)
        scheduler.step()
    return (time.perf_counter() - started) / total


def lightning_loop(method, config: TrainConfig, batches: list[torch.Tensor]) -> float:
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.ended = time.perf_counter()

    total = len(batches)
    config = TrainConfig(**{**config.to_dict(), "steps_per_epoch": total, "max_epochs": 1, "warmup_epochs": 5 / total})
    module = SSLModule(method, config, steps_per_epoch=total, probe_mels=None)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
        gradient_clip_val=config.gradient_clip, callbacks=[timer],
    )
    loader = DataLoader(RepeatedBatches(batches), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    # From the start of the first step to the end of the last: per-step cost including Lightning's
    # hooks, closure, gradient clipping, scheduler and data fetching between steps.
    return (timer.ended - timer.started) / total


def collapse_share(method_name: str, threads: int = 1) -> tuple[float, float, float]:
    from musicssl.train import train

    config = TrainConfig(method=method_name, max_epochs=1, num_threads=threads, final_probe=False)
    result = train(config, progress_bar=False)
    train_seconds = result.epochs[-1]["epoch_seconds"]
    return result.final["collapse_seconds"], train_seconds, result.final["collapse_seconds"] / train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="vicreg", choices=available_methods())
    parser.add_argument("--steps", type=int_in(1), default=40)
    parser.add_argument("--repeats", type=int_in(1), default=3)
    parser.add_argument("--threads", type=int_in(1), default=1)
    parser.add_argument("--skip-collapse", action="store_true")
    args = parser.parse_args()
    quiet_lightning()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = TrainConfig(method=args.method, preset="cpu", batch_size=64)
    template = build_method(config)
    n_mels, frames = template.backbone.config.n_mels, 126
    batches = [torch.randn(64, 2, n_mels, frames) * 10 - 40 for _ in range(args.steps)]
    plain, lightning = [], []
    plain_loop(copy.deepcopy(template), config, batches[:1])  # untimed: the process's first-run costs
    for repeat in range(args.repeats):  # alternating which loop goes first
        loops = [(plain, plain_loop), (lightning, lightning_loop)]
        for times, loop in (loops if repeat % 2 == 0 else loops[::-1]):
            times.append(loop(copy.deepcopy(template), config, batches))
    plain_median, lightning_median = statistics.median(plain), statistics.median(lightning)
    print(f"method {args.method}, cpu preset, batch 64 x 2 views, {args.steps} steps x {args.repeats} repeats, "
          f"{args.threads} thread(s)")
    print(f"plain loop     : {plain_median * 1000:7.1f} ms/step  (runs: {', '.join(f'{t * 1000:.0f}' for t in plain)})")
    print(f"Lightning      : {lightning_median * 1000:7.1f} ms/step  (runs: {', '.join(f'{t * 1000:.0f}' for t in lightning)})")
    print(f"ratio Lightning / plain: {lightning_median / plain_median:.3f}  (target <= 1.10)")
    if not args.skip_collapse:
        seconds, total, share = collapse_share(args.method, args.threads)
        print(f"collapse metrics: {seconds:.2f} s of a {total:.1f} s default epoch (100 steps, 512 probe segments): "
              f"{share * 100:.1f}% (target <= 3%)")


if __name__ == "__main__":
    main()
