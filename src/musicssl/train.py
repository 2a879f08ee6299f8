"""The shared trainer: one LightningModule for every pretext method, and a CLI for one run.

``python -m musicssl.train vicreg --max-epochs 5 --set var_weight=1 --set cov_weight=0.1``
``python -m musicssl.train --from runs/vicreg-... --max-epochs 100`` (a search's best trial's settings, for longer)

The method supplies its heads, loss and teacher (see :mod:`musicssl.pretext.base`); this module
supplies the optimiser (AdamW, linear warm-up then cosine decay), the schedules' progress, logging
of every loss term, NaN detection, label-free collapse metrics on a fixed probe set of validation
segments, and the label-based probe score at the end of a run.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (seconds): a Ctrl-C meanwhile is one line
    from musicssl.cli import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting("python -m musicssl.train")

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from musicssl.cli import ArgumentParser, counted
from musicssl.interrupts import Interrupted, exit_code, held_signals, sigterm_interrupts
from musicssl.paths import (
    CLAIM_FILE,
    FolderTaken,
    cache_hint,
    claim_folder,
    free_bytes,
    make_writable_folder,
    size_text,
)

__all__ = [
    "TrainConfig",
    "SSLModule",
    "RunResult",
    "build_method",
    "train",
    "main",
    "ConfigError",
    "apply_overrides",
    "resolve_run_settings",
    "PRESET_SETTINGS",
    "PRESET_RUN_SETTINGS",
    "view_config",
    "collapse_probe_tracks",
]


# Steps per epoch, at most: an epoch's samples (steps x batch) must fit an index (2**63 overflowed in the
# sampler, after the run had started), and 2**31 steps are years of training.
MAX_STEPS_PER_EPOCH = 2**31


class ConfigError(ValueError):
    """A setting is unknown or has the wrong type; the message lists what is accepted."""


@dataclass
class TrainConfig:
    """Everything about one run that is not the method's own hyperparameters."""

    method: str = "vicreg"
    preset: str = "cpu"
    data: str = "corpus"
    # A named dataset's folder (mtat, jamendo-*, msd: its split folder) and, where the audio lies
    # elsewhere, the audio folder (see musicssl.data.loaders.open_dataset_option).
    data_root: str | None = None
    audio_dir: str | None = None
    max_epochs: int = 10
    # An "epoch" is a fixed number of optimiser steps (views are random crops, so a pass over the
    # tracks has no special meaning); None makes it one pass over the training tracks.
    steps_per_epoch: int | None = 100
    # None: the preset's batch size for the method (PRESET_RUN_SETTINGS), else DEFAULT_BATCH_SIZE.
    batch_size: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    n_views: int = 2
    segment_seconds: float = 4.0
    min_gap_seconds: float = 4.0
    max_gap_seconds: float = 16.0
    seed: int = 0
    num_workers: int = 0
    num_threads: int | None = None
    accelerator: str = "auto"
    precision: str = "auto"
    gradient_clip: float | None = 3.0
    # Collapse metrics run at every epoch end and, if set, every N steps in between (0: epoch ends only).
    collapse_every_n_steps: int = 0
    probe_segments: int = 512
    probe_every_epoch: bool = False
    final_probe: bool = True
    probe_segments_per_track: int = 4
    out_dir: str | None = None
    method_params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(value: str, annotation: Any, name: str) -> Any:
    """Convert a ``--set`` string to the field's declared type."""
    text = str(annotation)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("none", "null") and ("None" in text or "Optional" in text):
            return None
        if "bool" in text and lowered in ("true", "false", "1", "0", "yes", "no"):
            return lowered in ("true", "1", "yes")
        if "bool" in text:
            raise ConfigError(f"{name} expects true/false, got {value!r}")
        try:
            if "int" in text and "float" not in text:
                return int(value)
            if "float" in text:
                return float(value)
        except ValueError:
            raise ConfigError(f"{name} expects a number ({text}), got {value!r}") from None
        if "tuple" in text:
            return tuple(int(part) for part in value.split(","))
    return value


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of the dataclass ``config`` with ``overrides`` applied (strings converted)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for name, value in overrides.items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r}; valid: {', '.join(sorted(fields))}")
        changes[name] = _convert(value, fields[name].type, name) if isinstance(value, str) else value
    return dataclasses.replace(config, **changes)


# What each backbone preset changes in the methods' defaults (the run's own ``--set`` values still win).
# "*" applies to every method that has the field: head sizes (the study's heads are sized for its
# 1024-d embedding; on the 256-d CPU backbone they would dominate the step time). A method's name
# applies to that method only: settings chosen on the preset's own short runs, with their measurements
# in the README ("Results on the embedded corpus"): BYOL's predictor learns 10x faster.
PRESET_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "cpu": {
        "*": {
            "hidden_dim": 512,
            "projection_dim": 1024,
            "predictor_hidden_dim": 128,
            "bottleneck_dim": 128,
            "num_prototypes": 1024,
        },
        "byol": {"predictor_lr_scale": 10.0},
    },
}


# Run settings a preset changes for one method where the run leaves them unset (None), chosen like the
# method settings above on the preset's own short runs (README, "Results on the embedded corpus"):
# Barlow Twins' cross-correlation of 1,024 features needs more than 64 samples per step.
PRESET_RUN_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "cpu": {"barlow_twins": {"batch_size": 128}},
}
DEFAULT_BATCH_SIZE = 64
# Probe segments per forward pass of the collapse metrics (the default probe set, 512, is one pass).
COLLAPSE_CHUNK = 512


def resolve_run_settings(config: TrainConfig) -> TrainConfig:
    """``config`` with its unset run settings filled: the preset's value for the method, else the default."""
    if config.batch_size is not None:
        return config
    preset_values = PRESET_RUN_SETTINGS.get(config.preset, {}).get(config.method, {})
    return dataclasses.replace(config, batch_size=int(preset_values.get("batch_size", DEFAULT_BATCH_SIZE)))


def preset_settings(preset: str, method: str) -> dict[str, Any]:
    """The changes ``preset`` makes to ``method``'s defaults (only fields the method has)."""
    from musicssl.pretext.registry import get_method

    names = {f.name for f in dataclasses.fields(get_method(method).Config)}
    settings = PRESET_SETTINGS.get(preset, {})
    merged = {**settings.get("*", {}), **settings.get(method, {})}
    return {name: value for name, value in merged.items() if name in names}


def check_method_fields(method_cls: type) -> None:
    """Refuse a method whose Config has a field named like a training setting: ``--set`` gives such a name to the
    method, a search space to the training (``study_spaces``), and neither could tell which was meant."""
    shared = sorted({f.name for f in dataclasses.fields(method_cls.Config)} & {f.name for f in dataclasses.fields(TrainConfig)})
    if shared:
        raise ConfigError(
            f"{method_cls.__module__}: {method_cls.Config.__name__} has field(s) {shared} named like training settings "
            f"(musicssl.train.TrainConfig), which --set and a search could not tell apart; rename them in the method")


def method_settings(config: TrainConfig) -> Any:
    """The method's config: its defaults, then the preset's changes, then ``config.method_params``."""
    from musicssl.pretext.registry import get_method

    method_cls = get_method(config.method)
    check_method_fields(method_cls)
    defaults = method_cls.Config()
    preset_values = preset_settings(config.preset, config.method)
    return apply_overrides(apply_overrides(defaults, preset_values), config.method_params)


def build_method(config: TrainConfig):
    """The backbone of ``config.preset`` wrapped by the method ``config.method`` with its parameters."""
    from musicssl.models import Backbone
    from musicssl.pretext.registry import get_method

    method_cls = get_method(config.method)
    method_config = method_settings(config)
    backbone = Backbone(preset=config.preset)
    return method_cls(backbone, method_config)


def optimizer_groups(method, learning_rate: float) -> list[dict[str, Any]]:
    """The method's :meth:`~musicssl.pretext.base.PretextMethod.parameter_groups` as optimiser groups."""
    return [
        {"params": params, "lr": learning_rate * scale} for params, scale in method.parameter_groups() if params
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up from 0 to 1 over ``warmup_steps``, cosine decay to 0 at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / remaining)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _lightning():
    import lightning.pytorch as pl

    return pl


def _epoch_bar():
    """Lightning's progress bar, its epochs counted from 1 of ``max_epochs`` as ``metrics.csv`` and
    ``summary.json`` count them (Lightning's own reads "Epoch 0" for the first). Where standard output is
    not a terminal (a log file), plain lines instead of a bar redrawn at every step: one per epoch, and
    one every :data:`musicssl.progress.LINE_INTERVAL` seconds within a long epoch."""
    from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

    from musicssl.progress import LineProgress, redraws

    class EpochBar(TQDMProgressBar):
        def on_train_epoch_start(self, trainer, *args: Any) -> None:
            # TQDMProgressBar's, but for its description, set before the bar is drawn again (the reset draws it,
            # a line where the output is not a terminal): not the last epoch's number at 0 %, then this one's.
            if getattr(self, "_leave", False):
                self.train_progress_bar = self.init_train_tqdm()
            bar = self.train_progress_bar
            bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", refresh=False)
            bar.reset(total=convert_inf(self.total_train_batches))
            bar.initial = 0

    class EpochLines(ProgressBar):
        def __init__(self) -> None:
            super().__init__()
            self.enabled = True
            self.lines: LineProgress | None = None

        def disable(self) -> None:
            self.enabled = False

        def enable(self) -> None:
            self.enabled = True

        def on_train_epoch_start(self, trainer, *args: Any) -> None:
            self.lines = LineProgress(convert_inf(self.total_train_batches), f"Epoch {trainer.current_epoch + 1}/"
                                      f"{trainer.max_epochs}", "step", disable=not self.enabled, file=sys.stdout)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if self.lines is not None:
                self.lines.update(batch_idx + 1 - self.lines.n)

        def on_train_epoch_end(self, trainer, *args: Any) -> None:
            self._end()

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            self._end()

        def _end(self) -> None:
            if self.lines is not None:
                self.lines.close()
                self.lines = None

    return EpochBar() if redraws(sys.stdout) else EpochLines()


def __getattr__(name: str) -> Any:
    """``SSLModule``, defined on its first use (see :func:`_define_ssl_module`)."""
    if name == "SSLModule":
        return _define_ssl_module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _define_ssl_module() -> type:
    """Define :class:`SSLModule` (once). Its base class is Lightning's, whose import takes seconds (2.5-3 s
    here): a search's driver process, and a command that stops on its arguments or prints its help, never
    train and so never wait for it. ``musicssl.train.SSLModule`` is this class, as a module-level class is
    (also for pickle)."""
    pl = _lightning()

    class SSLModule(pl.LightningModule):
        """The shared training loop for every pretext method.

        Batches are ``(B, V, n_mels, frames)`` tensors of V views per track. Every
        ``collapse_every_n_steps`` optimiser steps (and at the end of every epoch) the collapse metrics
        are computed on ``probe_mels``, a fixed set of validation segments; the latest values and the
        verdict are kept in :attr:`latest_collapse` and appended to :attr:`history`.
        """

        def __init__(
            self,
            method,
            config: TrainConfig,
            steps_per_epoch: int,
            probe_mels: Tensor | None = None,
            epoch_end_hooks: Sequence[Callable[["SSLModule", dict], None]] = (),
            probe_groups: Tensor | None = None,
        ) -> None:
            super().__init__()
            self.method = method
            self.config = config
            self.steps_per_epoch = max(1, int(steps_per_epoch))
            self.total_steps = self.steps_per_epoch * max(1, config.max_epochs)
            self.register_buffer("probe_mels", probe_mels if probe_mels is not None else torch.empty(0), persistent=False)
            self.epoch_end_hooks = list(epoch_end_hooks)
            # Track number of each probe segment, so "mean cosine" compares different tracks only.
            self.probe_groups = probe_groups
            self.history: list[dict[str, Any]] = []
            self.epochs: list[dict[str, Any]] = []
            self.latest_collapse: dict[str, float] = {}
            self.verdict = "none"
            self.diverged_step: int | None = None
            self.collapse_seconds = 0.0
            # The backbone's weights after the last epoch whose weights were all finite (and that epoch): what a run
            # that diverges later keeps (the step that diverges has already updated BatchNorm's statistics in its
            # forward, and a huge finite step before it can leave non-finite weights).
            self.last_finite_backbone: dict[str, Tensor] | None = None
            self.last_finite_epoch = 0
            self._epoch_sums: dict[str, float] = {}
            self._epoch_count = 0
            self._epoch_started = time.perf_counter()

        def progress(self, step: int | None = None):
            from musicssl.pretext.base import Progress

            return Progress(
                step=self.global_step if step is None else step,
                total_steps=self.total_steps,
                steps_per_epoch=self.steps_per_epoch,
            )

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(
                optimizer_groups(self.method, self.config.learning_rate),
                lr=self.config.learning_rate,
                weight_decay=self.config.weight_decay,
            )
            warmup_steps = int(round(self.config.warmup_epochs * self.steps_per_epoch))
            total_steps = self.total_steps
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int):
            views = list(batch[0].unbind(dim=1))  # batch: (views (B, V, n_mels, frames), track positions)
            outputs = self.method.training_loss(views, self.progress())
            loss = outputs["loss"]
            if not torch.isfinite(loss):
                # Stop at once: a NaN step would poison the weights and every metric after it. Returning
                # None skips the optimiser step; the run ends as "diverged" at this step.
                self.diverged_step = int(self.global_step)
                self.verdict = "diverged"
                self._record(kind="step", metrics={"loss": float("nan")}, verdict="diverged")
                self.trainer.should_stop = True
                return None
            for name, value in outputs.items():
                value = float(value.detach()) if isinstance(value, Tensor) else float(value)
                self._epoch_sums[name] = self._epoch_sums.get(name, 0.0) + value
            self._epoch_count += 1
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
            if self.diverged_step is not None:
                return
            # Lightning has counted this step already (global_step is k + 1 after optimiser step k); the
            # update that follows step k uses the schedules at k, as the loss of step k did (BYOL's tau_k).
            self.method.after_optimizer_step(self.progress(int(self.global_step) - 1))
            every = self.config.collapse_every_n_steps
            end_of_epoch = (batch_idx + 1) == self.steps_per_epoch
            if every and self.global_step % every == 0 and self.probe_mels.numel() and not end_of_epoch:
                self.evaluate_collapse(kind="step")

        def on_train_epoch_start(self) -> None:
            self._epoch_sums = {}
            self._epoch_count = 0
            self._epoch_started = time.perf_counter()

        @torch.no_grad()
        def evaluate_collapse(self, kind: str) -> dict[str, float]:
            """Collapse metrics on the probe set; updates :attr:`verdict` and the history."""
            from musicssl.collapse import collapse_metrics, collapse_verdict

            if not self.probe_mels.numel():
                return {}
            started = time.perf_counter()
            was_training = self.method.training
            self.method.eval()
            try:
                # In chunks: the activations of one pass over a large probe set (--probe-segments 100000) took
                # over 16 GB; in eval mode each segment's outputs are its own, so chunks give the same outputs.
                chunks = [self.method.collapse_outputs(chunk) for chunk in self.probe_mels.split(COLLAPSE_CHUNK)]
                outputs = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
            finally:
                self.method.train(was_training)
            groups = self.probe_groups.to(self.probe_mels.device) if self.probe_groups is not None else None
            metrics = collapse_metrics({name: value.float() for name, value in outputs.items()}, groups=groups)
            if self._epoch_count:
                metrics["loss"] = self._epoch_sums.get("loss", 0.0) / self._epoch_count
            self.verdict = str(collapse_verdict(metrics))
            self.latest_collapse = metrics
            self.collapse_seconds += time.perf_counter() - started
            self._record(kind=kind, metrics=metrics, verdict=self.verdict)
            return metrics

        def _record(self, kind: str, metrics: dict[str, float], verdict: str) -> dict[str, Any]:
            # The epoch under way, counted from 1 as metrics.csv counts the epochs it closes.
            row = {"kind": kind, "epoch": int(self.current_epoch) + 1, "step": int(self.global_step), "verdict": verdict}
            row.update({name: float(value) for name, value in metrics.items()})
            self.history.append(row)
            return row

        def on_train_epoch_end(self) -> None:
            if self.diverged_step is not None:
                return
            means = {f"train_{name}": total / max(1, self._epoch_count) for name, total in self._epoch_sums.items()}
            collapse = self.evaluate_collapse(kind="epoch") if self.probe_mels.numel() else {}
            metrics: dict[str, float] = {**means, **{f"collapse_{k}": v for k, v in collapse.items() if k != "loss"}}
            metrics["epoch_seconds"] = time.perf_counter() - self._epoch_started
            metrics["lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"]) if self.trainer.optimizers else 0.0
            record = {"epoch": int(self.current_epoch) + 1, "step": int(self.global_step), "verdict": self.verdict, **metrics}
            for hook in self.epoch_end_hooks:
                hook(self, record)
            self.epochs.append(record)
            state = self.method.backbone.state_dict()
            if finite_state(state):
                self.last_finite_backbone = {name: value.detach().to("cpu", copy=True) for name, value in state.items()}
                self.last_finite_epoch = record["epoch"]

    SSLModule.__qualname__ = SSLModule.__name__
    globals()["SSLModule"] = SSLModule  # from now on a plain attribute of the module
    return SSLModule


def finite_state(state: Mapping[str, Tensor]) -> bool:
    """Whether every floating-point tensor of a ``state_dict`` is finite (one device sync)."""
    checks = [torch.isfinite(value).all() for value in state.values() if value.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


@dataclass
class RunResult:
    """What one training run produced; also written to ``out_dir`` (see :func:`train`)."""

    config: TrainConfig
    epochs: list[dict[str, Any]]
    history: list[dict[str, Any]]
    verdict: str
    diverged_step: int | None
    final: dict[str, Any]
    seconds: float
    out_dir: Path | None
    backbone: Any = field(repr=False, default=None)  # on the CPU, in float32
    device: Any = field(repr=False, default=None)  # the torch.device it trained on


# What the trainer passes to Lightning (auto: see resolve_precision / resolve_accelerator).
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def _has_ema_teacher(method: str) -> bool:
    """Whether ``method``'s teacher follows its student by EMA steps (its class says so); False for a name that
    is no method (said by the check of the method)."""
    from musicssl.pretext.registry import UnknownMethodError, get_method

    try:
        return bool(get_method(method).ema_teacher)
    except UnknownMethodError:
        return False


def resolve_precision(config: TrainConfig, accelerator: str, native_bf16: bool | None = None) -> str:
    """The precision ``config`` trains in on ``accelerator``: its own, or for ``auto`` bf16 autocast on a GPU that
    computes bfloat16 in hardware (``native_bf16``, default :func:`gpu_computes_bf16`: Ampere and later), and
    float32 elsewhere, a GPU before Ampere included (V100, T4: bfloat16 only emulated there)."""
    if config.precision != "auto":
        return config.precision
    if accelerator not in ("gpu", "cuda"):
        return "32-true"
    return "bf16-mixed" if (gpu_computes_bf16() if native_bf16 is None else native_bf16) else "32-true"


def gpu_computes_bf16() -> bool:
    """Whether the current CUDA device computes bfloat16 in hardware, not emulated; False without one."""
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    except (RuntimeError, AssertionError):  # a driver that cannot be asked: as without a GPU
        return False


def view_config(config: TrainConfig):
    """The views a run of ``config`` trains on (:class:`musicssl.data.views.ViewConfig`): a ValueError or
    TypeError names settings that cannot make them."""
    from musicssl.data.views import ViewConfig

    return ViewConfig(n_views=config.n_views, segment_seconds=config.segment_seconds,
                      min_gap_seconds=config.min_gap_seconds, max_gap_seconds=config.max_gap_seconds)


def collapse_probe_tracks(data) -> list[str]:
    """The tracks whose fixed segments the collapse metrics (and RankMe) are measured on: the valid ones, the
    training ones where fewer than 2 are valid (the metrics compare segments of different tracks: one valid
    track has no such pair)."""
    valid_ids = data.track_ids("valid")
    return valid_ids if len(valid_ids) >= 2 else data.track_ids("train")


def check_config(config: TrainConfig, devices: bool = True, names: Mapping[str, str] | None = None) -> None:
    """Refuse run settings that would fail (or silently misbehave) later, naming the setting.

    Run before any data is prepared, so that a typo costs seconds, not a corpus build and a run.
    ``devices=False`` skips the check that a requested GPU exists (a search's driver may have none
    while its trials run where there are). ``names`` gives settings the names their user gave them
    (the command line's flags, :data:`FLAG_OF_SETTING`); the others go by their field's name.
    """
    problems = []
    names = names or {}

    def number(name: str, low: float, *, inclusive: bool = True, optional: bool = False, whole: bool = False,
               below: float = math.inf, hint: str = "") -> None:
        value = getattr(config, name)
        if value is None and optional:
            return
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        bad = bad or (value < low if inclusive else value <= low) or value >= below or (whole and value != int(value))
        if bad:
            kind = "a whole number " if whole else ""
            problems.append(f"{names.get(name, name)} must be {kind}{'>=' if inclusive else '>'} {low:g}{hint}, "
                            f"got {value!r}")

    number("max_epochs", 1, whole=True)
    number("batch_size", 2, optional=True, whole=True)
    if "steps_per_epoch" in names:  # the command line's 0 (one pass) is None here
        number("steps_per_epoch", 0, optional=True, whole=True, below=MAX_STEPS_PER_EPOCH,
               hint=" and < 2**31 (0: one pass over the training tracks)")
    else:
        number("steps_per_epoch", 1, optional=True, whole=True, below=MAX_STEPS_PER_EPOCH,
               hint=" and < 2**31 (for one pass over the training tracks: --steps-per-epoch 0, or None in a "
                    "TrainConfig)")
    number("learning_rate", 0, inclusive=False)
    number("weight_decay", 0)
    number("warmup_epochs", 0)
    number("num_workers", 0, whole=True)
    number("num_threads", 1, optional=True, whole=True,
           hint=" (for torch's choice: leave out --threads)" if "num_threads" in names else
           " (for torch's choice: leave out --threads, or None in a TrainConfig)")
    number("gradient_clip", 0, inclusive=False, optional=True, hint=" (none: no clipping)")
    number("collapse_every_n_steps", 0, whole=True)
    # 0 turns the collapse metrics off; 1 segment has no spread to measure.
    if config.probe_segments != 0:
        number("probe_segments", 2, whole=True, hint=" (0: no collapse metrics)")
    number("probe_segments_per_track", 1, whole=True)
    number("seed", 0, whole=True, below=2**32, hint=" and < 2**32 (numpy's and Optuna's range)")
    try:  # the views' own rules (two views or more, gaps that fit), now rather than after the data
        view_config(config)
    except (TypeError, ValueError) as error:
        problems.append(str(error))
    from musicssl.models import PRESETS

    if config.preset not in PRESETS:  # before: a traceback once the run folder was made
        problems.append(f"{names.get('preset', 'preset')} must be one of {', '.join(sorted(PRESETS))}, "
                        f"got {config.preset!r}")
    if config.precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    elif config.precision == "16-true":
        # Weights and AdamW's moments in float16, whose smallest number (6e-8) is above AdamW's eps (1e-8) and the
        # squares of small gradients: the step divides by 0 where a gradient is below about 8e-3, and the run
        # diverges in its first steps (vicreg and contrastive on the cpu preset, at any learning rate).
        problems.append("precision=16-true holds the weights and AdamW's state in float16, which cannot hold its eps "
                        "(1e-8) or the squares of small gradients: runs diverge in their first steps; use 16-mixed "
                        "or bf16-mixed (float32 weights)")
    elif config.precision == "bf16-true":
        # bfloat16 keeps 8 bits of mantissa: a weight moves only by a step above half its rounding step (0.2-0.4 % of
        # it), and AdamW's steps are about the learning rate. Measured on the cpu preset, 12 steps: at 1e-4, 67 % of
        # the weights never moved, at 1e-3, 3 % (float32: none). The EMA teacher's moves, (1 - rate) *
        # (student - teacher) with rate 0.996 to 1, are smaller still: the teacher stays put.
        teacher = f" and {config.method}'s EMA teacher" if _has_ema_teacher(config.method) else ""
        problems.append(f"precision=bf16-true holds the weights{teacher} in bfloat16, where AdamW's small steps round "
                        "away (a weight near 1 ignores any step below 0.002; at learning rate 1e-4, two thirds of the "
                        "cpu preset's weights never move); use bf16-mixed, which keeps the weights in float32 (or "
                        "32-true)")
    if config.accelerator not in ACCELERATORS:
        problems.append(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {config.accelerator!r}")
    elif devices and config.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(f"accelerator={config.accelerator} but torch sees no CUDA device; use accelerator=auto or cpu")
    elif devices and config.accelerator == "mps" and not torch.backends.mps.is_available():
        problems.append("accelerator=mps but torch sees no MPS device (Apple silicon); use accelerator=auto or cpu")
    if problems:
        raise ConfigError("; ".join(problems))


def resolve_accelerator(config: TrainConfig) -> str:
    if config.accelerator != "auto":
        return config.accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


def _probe_inputs(data, tracks: str = "usable") -> tuple[list[str], list[str], Any, Any, str | None]:
    """Train and valid ids, their label rows, and why the probe cannot score them (``None`` when it can);
    ``tracks`` names the tracks in the messages (``usable``, or ``listed`` before the cache is built)."""
    train_ids, valid_ids = data.track_ids("train"), data.track_ids("valid")
    labels = data.index.labels()
    row = {track_id: position for position, track_id in enumerate(data.index.track_ids)}
    train_y, valid_y = labels[[row[t] for t in train_ids]], labels[[row[t] for t in valid_ids]]
    problem = None
    if not train_ids or not valid_ids:
        problem = (f"the linear probe needs {tracks} tracks in both the train and the valid split, and there are "
                   f"{len(train_ids)} and {len(valid_ids)}")
    elif labels.shape[1] == 0:
        unlabeled = (" (a folder of audio without a tags file, or a table of tracks without tags, is used without tags)"
                     if data.index.extra.get("unlabeled") else "")
        problem = f"the linear probe cannot be scored: the data has no tags{unlabeled}"
    elif not (valid_y.any(axis=0) & ~valid_y.all(axis=0)).any():
        problem = (f"the linear probe cannot be scored: no tag has both a positive and a negative among the "
                   f"{len(valid_ids)} {tracks} valid track(s)")
    return train_ids, valid_ids, train_y, valid_y, problem


def probe_problem(data) -> str | None:
    """Why :func:`probe_score` cannot score ``data`` (``None`` when it can): it needs usable tracks in
    the train and the valid split, and a tag with a positive and a negative among the valid tracks."""
    return _probe_inputs(data)[-1]


def listed_probe_problem(index) -> str | None:
    """:func:`probe_problem` on the tracks a :class:`~musicssl.data.index.TrackIndex` lists, before its
    mel cache is built: the usable tracks can only be fewer, so a problem found here stays."""
    from types import SimpleNamespace

    listed = SimpleNamespace(index=index, track_ids=lambda split: index.split(split).track_ids)
    return _probe_inputs(listed, "listed")[-1]


def probe_score(backbone, data, max_segments: int, seed: int = 0, device: Any = None) -> dict[str, float]:
    """Linear probe on frozen track embeddings: train split -> valid split (macro ROC-AUC and mAP). The tracks
    are embedded where the backbone is, or on ``device`` (the one a run trained on: a copy of the backbone
    is moved there, the backbone given stays where it is)."""
    import copy

    from musicssl.embeddings import embed_tracks
    from musicssl.probe import fit_linear_probe

    train_ids, valid_ids, train_y, valid_y, problem = _probe_inputs(data)
    if problem:
        raise ValueError(problem)
    if device is not None and torch.device(device) != next(backbone.parameters()).device:
        backbone = copy.deepcopy(backbone).to(device)
    train_x = embed_tracks(backbone, data.cache, train_ids, max_segments=max_segments)
    valid_x = embed_tracks(backbone, data.cache, valid_ids, max_segments=max_segments)
    result = fit_linear_probe(train_x, train_y, valid_x, valid_y, seed=seed)
    return {"probe_auc": float(result.roc_auc), "probe_map": float(result.average_precision)}


def quiet_lightning() -> None:
    """Silence Lightning's start-up chatter (accelerator lines, tips) and a known deprecation warning
    from its internals, so the console shows our progress and results."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # A diverged step returns None on purpose (the optimiser step is skipped and the run stops).
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """``rows`` as CSV; with no row, a header of ``columns`` (a file of one empty line, which pandas
    cannot read, was written for a run that diverged in its first epoch or measured no collapse)."""
    import pandas as pd

    pd.DataFrame(rows, columns=None if rows else list(columns)).to_csv(path, index=False)


def _check_batch(index, config: TrainConfig) -> None:
    """Refuse data that cannot fill a batch before its mel cache is built."""
    from musicssl.data.pipeline import batch_problem

    problem = batch_problem(index, config.batch_size)
    if problem:  # lowering the batch size helps where there are training tracks
        raise ConfigError(f"the data {problem}" + ("; lower --batch-size" if len(index.split("train")) else ""))


def train(
    config: TrainConfig,
    data=None,
    epoch_end_hooks: Sequence[Callable[[Any, dict], None]] = (),
    progress_bar: bool = True,
    callbacks: Sequence[Any] = (),
    trained_from: str | None = None,
) -> RunResult:
    """Train one run of ``config`` and return its metrics.

    ``data`` is a :class:`musicssl.data.pipeline.PreparedData` (built from ``config.data`` when not
    given). ``epoch_end_hooks`` are called with ``(module, record)`` after every epoch; a hook may
    add entries to ``record`` (the search reports it) or set ``module.trainer.should_stop``.
    With ``config.out_dir`` set, writes there: ``config.json``, ``metrics.csv`` (one row per epoch),
    ``collapse.csv`` (collapse metrics every ``collapse_every_n_steps``), ``summary.json`` and
    ``backbone.pt`` (a plain ``state_dict``, loadable with ``torch.load(weights_only=True)``).
    ``trained_from`` (the configuration ``--from`` read, and what it was) goes into ``config.json``.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from musicssl.data.cache import LogMelConfig
    from musicssl.data.index import GENERATED_CORPUS_KEY
    from musicssl.data.loaders import read_audio_alone, split_by_groups
    from musicssl.data.pipeline import prepare_data
    from musicssl.data.views import EpochSampler, ViewDataset, fixed_segments, probe_positions

    started = time.perf_counter()
    quiet_lightning()
    config = resolve_run_settings(config)
    check_config(config)
    if data is None:
        from musicssl.data.loaders import check_dataset_option

        check_dataset_option(config.data, config.data_root, config.audio_dir)  # before any work
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir is not None:
        # Made now: a folder that cannot be written should fail before the run, not after it.
        try:
            make_writable_folder(out_dir)
        except OSError as error:
            raise ConfigError(f"cannot write the run folder {out_dir} ({error}); give another --out") from None
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    pl.seed_everything(config.seed, workers=True, verbose=False)
    method = build_method(config)
    backbone_config = method.backbone.config
    front_end = LogMelConfig(n_mels=backbone_config.n_mels)
    if data is None:
        data = prepare_data(config.data, front_end, verbose=progress_bar, root=config.data_root,
                            audio_dir=config.audio_dir, check_index=lambda index: _check_batch(index, config))
    if data.cache.n_mels != backbone_config.n_mels:
        raise ConfigError(
            f"the mel cache has {data.cache.n_mels} mels but preset {config.preset!r} expects {backbone_config.n_mels}"
        )
    dataset = ViewDataset(data.cache, data.track_ids("train"), view_config(config), seed=config.seed,
                          verbose=progress_bar)
    if len(dataset) < config.batch_size:
        raise ConfigError(
            f"only {len(dataset)} usable training tracks for batch_size {config.batch_size}; lower --batch-size"
        )
    steps_per_epoch = config.steps_per_epoch or len(dataset) // config.batch_size
    sampler = EpochSampler(len(dataset), shuffle=True, seed=config.seed, num_samples=steps_per_epoch * config.batch_size,
                           batch_size=config.batch_size)  # (no batch holds a track twice)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=True,
        persistent_workers=config.num_workers > 0,
        worker_init_fn=_leave_sigterm_to_the_parent if config.num_workers > 0 else None,
    )
    # Found now, not after the run: asked for every epoch, the probe is refused; the final one (on by
    # default, also for unlabelled data) is left out with a note.
    unprobed = probe_problem(data) if config.final_probe or config.probe_every_epoch else None
    if unprobed and config.probe_every_epoch:
        raise ConfigError(f"probe_every_epoch: {unprobed}; give the dataset valid tracks with tags, or leave it off")
    if unprobed:
        print(f"note: no final probe score: {unprobed}", file=sys.stderr)
    probe_mels = groups = None
    valid_ids = collapse_probe_tracks(data)
    if config.probe_segments:
        probe_mels = fixed_segments(data.cache, valid_ids, config.probe_segments, seed=config.seed)
        positions = probe_positions(data.cache, valid_ids, config.probe_segments, seed=config.seed)
        track_number = {track_id: n for n, track_id in enumerate(dict.fromkeys(t for t, _ in positions))}
        groups = torch.tensor([track_number[t] for t, _ in positions])

    hooks = list(epoch_end_hooks)
    if config.probe_every_epoch:
        hooks.insert(0, lambda module, record: record.update(
            probe_score(module.method.backbone, data, config.probe_segments_per_track, config.seed)))
    module = _define_ssl_module()(method, config, steps_per_epoch, probe_mels=probe_mels, epoch_end_hooks=hooks, probe_groups=groups)
    accelerator = resolve_accelerator(config)
    precision = resolve_precision(config, accelerator)
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=config.gradient_clip,
        callbacks=[*callbacks, *([_epoch_bar()] if progress_bar and not any(
            isinstance(callback, pl.callbacks.ProgressBar) for callback in callbacks) else [])],
        deterministic=False,
    )
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, train_dataloaders=loader)
    except SystemExit as stop:
        # Lightning ends a Ctrl-C with sys.exit(1), after its shutdown, and leaves Ctrl-C ignored; a SIGTERM
        # with its SIGTERMException (a SystemExit without a code): raise them as the stop they were, with
        # Ctrl-C handled as before. Any other SystemExit (e.g. Ray Tune's sys.exit(0) when it stops a trial
        # in a report) goes on as it is.
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        sigterm = isinstance(stop, SIGTERMException)
        if not (sigterm or isinstance(stop.__context__, KeyboardInterrupt)):
            raise
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler if ctrl_c is None else ctrl_c)
        # A KeyboardInterrupt raised for a SIGTERM (the CLI's handler, which Lightning calls after its own) keeps its signal.
        signum = signal.SIGTERM if sigterm else getattr(stop.__context__, "signum", signal.SIGINT)
        raise Interrupted(signum) from None

    trained_on = trainer.strategy.root_device  # (the final probe embeds there, not on the CPU)
    backbone = method.backbone.cpu().float()
    final: dict[str, Any] = {"verdict": module.verdict, "diverged_step": module.diverged_step}
    # The epoch whose weights the backbone holds: the last; for a run that diverged (or whose weights are not
    # all finite), the last epoch before, or none (0) where that was its first: it then has no backbone.pt.
    final["backbone_epoch"] = len(module.epochs)
    if module.diverged_step is not None or not finite_state(backbone.state_dict()):
        final["backbone_epoch"] = module.last_finite_epoch
        if module.last_finite_backbone is not None:
            backbone.load_state_dict(module.last_finite_backbone)
    if module.epochs:
        final.update({k: v for k, v in module.epochs[-1].items() if k not in ("epoch", "step", "verdict")})
    if module.diverged_step is None and config.final_probe and not unprobed:
        if not config.probe_every_epoch or not module.epochs:
            final.update(probe_score(backbone, data, config.probe_segments_per_track, config.seed, trained_on))
    if unprobed:
        final["probe_skipped"] = unprobed
    final["epochs_run"] = len(module.epochs)
    # Lightning counts the skipped step of a diverged run; the steps that trained are those before it.
    final["steps"] = int(trainer.global_step) if module.diverged_step is None else module.diverged_step
    final["collapse_seconds"] = module.collapse_seconds
    # The precision Lightning trained in: it may differ from the one asked for (16-mixed on the CPU is bf16-mixed).
    final["accelerator"], final["precision"] = accelerator, str(trainer.precision)
    final["device"] = device_name(trainer.strategy.root_device)
    seconds = time.perf_counter() - started
    final["seconds"] = seconds
    if out_dir is not None:
        # All of the run or none of it: a Ctrl-C or SIGTERM that comes here takes effect once it is written.
        with held_signals():
            _write_run(out_dir, {
                # with the method's settings as the run used them (defaults, the preset's changes, --set)
                "config.json": lambda path: path.write_text(json.dumps(
                    {**config.to_dict(), "method_config": dataclasses.asdict(method_settings(config)),
                     # a generated corpus's version, seed and size: which songs the backbone trained on
                     "training_corpus": data.index.extra.get(GENERATED_CORPUS_KEY),
                     # whether it read a folder's audio alone (no tags file): its splits are drawn from the paths
                     "training_data_unlabeled": read_audio_alone(data.index),
                     # whether its tags file's split_group column drew the splits (a column added later does not)
                     "training_split_groups": split_by_groups(data.index),
                     # the settings it started from (--from), if any
                     "trained_from": trained_from},
                    indent=2, default=str)),
                "metrics.csv": lambda path: _write_csv(path, module.epochs, ("epoch", "step", "verdict")),
                "collapse.csv": lambda path: _write_csv(path, module.history, ("kind", "epoch", "step", "verdict")),
                **({"backbone.pt": lambda path: torch.save(backbone.state_dict(), path)}
                   if final["backbone_epoch"] else {}),  # no epoch with finite weights: no backbone to keep
                "summary.json": lambda path: path.write_text(json.dumps(final, indent=2, default=_json_default)),
            })
    return RunResult(
        config=config,
        epochs=module.epochs,
        history=module.history,
        verdict=module.verdict,
        diverged_step=module.diverged_step,
        final=final,
        seconds=seconds,
        out_dir=out_dir,
        backbone=backbone,
        device=trained_on,
    )


def _leave_sigterm_to_the_parent(worker_id: int) -> None:
    """In a DataLoader worker: let the first SIGTERM pass, which the training process handles (it stops, and
    ends its workers). A SIGTERM to the whole process group (``timeout``, ``scancel``, ``kill -TERM -PGID``)
    killed the workers too, and torch's check of them then raised "DataLoader worker ... is killed by
    signal: Terminated" over the stop: a traceback and exit 1 instead of "interrupted" and exit 143. A second
    SIGTERM (torch's or multiprocessing's ``terminate()`` of a worker that does not end) ends the worker."""
    signal.signal(signal.SIGTERM, _sigterm_once)


def _sigterm_once(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


RUN_FILES_MARGIN = 1_000_000  # a run's files besides its checkpoint (collapse.csv, history, summary): a few kB


def _room_problem(config: TrainConfig) -> str | None:
    """Why the disk of the run's folder cannot take the run (None while it can): it writes its files
    when it ends, and a full disk then would lose the training."""
    from musicssl.models import checkpoint_bytes

    free = free_bytes(config.out_dir)
    need = int(1.05 * checkpoint_bytes(config.preset)) + RUN_FILES_MARGIN
    if free is None or free >= need:
        return None
    return f"only {size_text(free)} free on its disk, and the run writes about {size_text(need)} when it ends"


def _write_run(out_dir: Path, writers: Mapping[str, Callable[[Path], Any]]) -> None:
    """Each file by its writer, all of them or none: each is written under a temporary name first and
    renamed into place once every one is whole (``summary.json`` last). Before, a full disk or a size
    limit left a ``summary.json`` that said the run was complete next to a truncated ``backbone.pt``,
    and the folder, not empty, refused a new run. A failed write removes what it wrote and raises
    OSError naming the file (torch.save raises RuntimeError for a full disk)."""
    partial = {name: out_dir / f".{name}.partial" for name in writers}
    try:
        for name, write in writers.items():
            try:
                write(partial[name])
            except (OSError, RuntimeError) as error:
                raise OSError(f"could not write {out_dir / name} ({error}); no run written there: make room (or "
                              "make the folder writable) or choose another --out, and run again") from None
        for name in writers:
            os.replace(partial[name], out_dir / name)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)


def device_name(device: torch.device) -> str:
    """Where a run trained, for its records: ``cpu (AVX512)``, the CPU's instruction set that torch's
    kernels use (``AVX2`` on a CPU without AVX-512, or where ``ATEN_CPU_CAPABILITY`` says so: runs on
    the two differ in the last bits, and then take other paths), or ``cuda:N (the GPU's name)``, N as
    this process sees it (Ray and ``CUDA_VISIBLE_DEVICES`` renumber the GPUs a process is given)."""
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


# The training settings that have a flag of their own: --set refuses them, so that a command line
# cannot give one setting two values (before, --set silently won over the flag).
FLAG_OF_SETTING = {
    "preset": "--preset", "data": "--data", "data_root": "--root", "audio_dir": "--audio-dir",
    "max_epochs": "--max-epochs", "steps_per_epoch": "--steps-per-epoch", "batch_size": "--batch-size",
    "learning_rate": "--lr", "weight_decay": "--weight-decay", "seed": "--seed", "num_workers": "--workers",
    "num_threads": "--threads", "out_dir": "--out",
}


# What a setting's None is on the command line, for the settings with a flag that can be None.
_NONE_BY_FLAG = {
    "steps_per_epoch": "for one pass over the training tracks, use --steps-per-epoch 0",
    "batch_size": "for the default batch size, leave out --batch-size",
    "num_threads": "for torch's choice of threads, leave out --threads",
    "data_root": "leave out --root",
    "audio_dir": "leave out --audio-dir",
    "out_dir": "for the default run folder, leave out --out",
}


def _parse_set(pairs: Sequence[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set takes name=value, got {pair!r}")
        name, value = (part.strip() for part in pair.split("=", 1))
        if name in FLAG_OF_SETTING:
            instead = f"use {FLAG_OF_SETTING[name]} {value or 'VALUE'}"
            if value.lower() in ("none", "null"):  # the flags take no "none": say what gives it
                instead = _NONE_BY_FLAG.get(name, f"use {FLAG_OF_SETTING[name]} VALUE")
            raise ConfigError(f"--set {name}= is given by its own flag: {instead}")
        if name in values and values[name] != value:
            raise ConfigError(f"--set gives {name} twice ({values[name]!r} and {value!r}): give it once")
        values[name] = value
    return values


def _preset_batch_sizes() -> str:
    """'; 128 for barlow_twins with the cpu preset' and the like, from PRESET_RUN_SETTINGS."""
    cases = [f"{values['batch_size']} for {method} with the {preset} preset"
             for preset, methods in PRESET_RUN_SETTINGS.items() for method, values in methods.items()
             if "batch_size" in values]
    return "".join(f"; {case}" for case in cases)


def build_parser() -> argparse.ArgumentParser:
    from musicssl.pretext.registry import available_methods

    defaults = TrainConfig()
    parser = ArgumentParser(
        prog="python -m musicssl.train",
        description="Train one self-supervised run on the embedded corpus (built if missing) or a dataset.",
    )
    parser.add_argument("method", nargs="?", default=None,
                        help=f"pretext method: {', '.join(available_methods())} (with --from: the one it names)")
    parser.add_argument(
        "--from", dest="source", default=None, metavar="RUN_OR_SEARCH",
        help="train with the settings of a run folder (its config.json), a search folder (its best trial's, "
             "best_config.json) or such a file; the flags and --set given here change them",
    )
    parser.add_argument("--preset", default=defaults.preset, help="backbone preset: cpu (small, fast) or paper (default: %(default)s)")
    parser.add_argument("--data", default=defaults.data, help="'corpus' (default), mtat, jamendo-*, msd (with --root), a tracks.csv or a folder")
    parser.add_argument("--max-epochs", type=int, default=defaults.max_epochs, help="epochs to train (default: %(default)s)")
    parser.add_argument(
        "--steps-per-epoch", type=int, default=defaults.steps_per_epoch,
        help="optimiser steps per epoch (default: %(default)s; 0: one pass over the training tracks)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help=f"tracks per step (default: {DEFAULT_BATCH_SIZE}{_preset_batch_sizes()})",
    )
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak AdamW learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help="AdamW weight decay, on every parameter (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the weights, the views and the probe, 0 to 2**32 - 1 (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.num_workers,
                        help="DataLoader worker processes (default: %(default)s: in this process)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads, >= 1 (default: torch's choice)")
    parser.add_argument("--root", default=None, help="a named dataset's folder (mtat, jamendo-*; msd: the split "
                        "folder; corpus: where it is or is built)")
    parser.add_argument("--audio-dir", default=None, help="the audio folder of mtat, jamendo-* or msd when it is "
                        "not under --root (msd: required)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/train/<method>-<time>)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="set a method hyperparameter (e.g. var_weight=1) or any other training setting; repeatable",
    )
    return parser


# The settings --from does not take from its file: where and how the new run runs and writes, and its probes
# (a search's trials leave theirs to the search).
NOT_FROM_SOURCE = ("out_dir", "num_workers", "num_threads", "accelerator", "probe_every_epoch", "final_probe")
# The settings beside a run's TrainConfig in its config.json.
_RUN_RECORDS = ("method_config", "training_corpus", "training_data_unlabeled", "training_split_groups",
                "trained_from")


@dataclass(frozen=True)
class RunSource:
    """The settings of an earlier run, or of a search's best trial, that ``--from`` trains with."""

    path: Path  # the configuration file read
    settings: dict[str, Any]  # TrainConfig's fields as that run had them
    what: str  # "the run", or "trial #N of the search"

    def describe(self) -> str:
        return f"{self.what} ({self.path})"


def read_run_source(spec: str | os.PathLike) -> RunSource:
    """The training settings recorded in a run folder (``config.json``), a search folder (its best trial's:
    ``best_config.json``, with the data its ``search.json`` names: a trial's settings name no folders) or
    such a file. ConfigError names what is missing or wrong."""
    if not str(spec).strip():
        raise ConfigError("--from is empty; give a run folder, a search folder or its config file")
    path = Path(spec).expanduser().absolute()  # as the run's config.json records it (trained_from)
    if path.is_dir():
        found = next((path / name for name in ("best_config.json", "config.json") if (path / name).is_file()), None)
        if found is None:
            why = ("a search with no complete trial yet (no best_config.json)" if (path / "search.json").is_file()
                   else "not a run folder (config.json) or a search folder (best_config.json)")
            raise ConfigError(f"--from {spec}: {why}")
        path = found
    elif not path.exists():
        raise ConfigError(f"--from {spec}: no such file or folder")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"--from {spec}: cannot read {path} ({error})") from None
    trial = isinstance(document, dict) and isinstance(document.get("train_config"), dict)
    settings = dict(document["train_config"]) if trial else document
    if not isinstance(settings, dict) or not isinstance(settings.get("method"), str):
        raise ConfigError(f"--from {spec}: {path} is not a run's configuration (config.json) or a search's best "
                          "trial's (best_config.json)")
    if not trial:
        settings = {name: value for name, value in settings.items() if name not in _RUN_RECORDS}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:  # another version's settings: leaving them out would train another run
        raise ConfigError(f"--from {spec}: {path} holds settings this version does not know ({', '.join(unknown)}); "
                          "it was written by another version of musicssl")
    what = "the run"
    if trial:
        what = f"trial #{document.get('trial', '?')} of the search"
        search = path.parent / "search.json"
        if path.name == "best_config.json" and search.is_file():
            try:
                recorded = json.loads(search.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise ConfigError(f"--from {spec}: cannot read {search} ({error})") from None
            if isinstance(recorded, dict) and isinstance(recorded.get("data"), str):
                settings.update(data=recorded["data"], data_root=recorded.get("root"),
                                audio_dir=recorded.get("audio_dir"))
    return RunSource(path, settings, what)


def given_options(argv: Sequence[str] | None) -> set[str]:
    """The ``dest`` of each argument the command line gives (not left to its default)."""
    quiet = build_parser()
    for action in quiet._actions:  # (not set_defaults: the parser's own defaults are set whatever they are)
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def _from_source(config: TrainConfig, source: RunSource, given: set[str]) -> TrainConfig:
    """``config`` with ``source``'s settings where the command line gave none (its flags' ``dest``s: ``given``)."""
    from musicssl.data.loaders import dataset_name

    dest = {name: flag[2:].replace("-", "_") for name, flag in FLAG_OF_SETTING.items()}
    changes = {name: value for name, value in source.settings.items()
               if name not in (*NOT_FROM_SOURCE, "method", "method_params") and dest.get(name) not in given}
    if "data" in given:  # the folders it was read from belong to the source's data
        changes = {name: value for name, value in changes.items() if name not in ("data_root", "audio_dir")}
    for name in ("data", "data_root", "audio_dir"):
        value = changes.get(name)
        if (isinstance(value, str) and value.strip() and not Path(value).expanduser().is_absolute()
                and not (name == "data" and dataset_name(value) is not None)):
            raise ConfigError(f"--from: {source.describe()} trained on {value!r} ({name}), a path relative to where it "
                              f"ran; give {FLAG_OF_SETTING[name]} (with --root and --audio-dir where it needs them)")
    return apply_overrides(config, changes)


def config_from_args(args: argparse.Namespace, given: set[str] = frozenset(),
                     source: RunSource | None = None) -> TrainConfig:
    """The run's settings from the command line; with ``--from`` (``source``, read here if not given), those of the
    run it names where the command line gives none (``given``: the ``dest`` of each argument it gives,
    :func:`given_options`)."""
    from musicssl.pretext.registry import available_methods, get_method

    from musicssl.data.loaders import dataset_name

    def absolute(path: str | None) -> str | None:
        # config.json names the data wherever it is read from (a path as given is relative to the cwd).
        # An empty one stays empty (not the cwd), for check_dataset_option to refuse.
        return None if path is None else str(Path(path).expanduser().absolute()) if path.strip() else path

    if source is None and getattr(args, "source", None) is not None:
        source = read_run_source(args.source)
    method = args.method
    if source is not None:
        if method is not None and method != source.settings["method"]:
            raise ConfigError(f"--from: {source.describe()} trained {source.settings['method']}, not {method}; "
                              "leave METHOD out (or give the one it trained)")
        method = source.settings["method"]
    if method is None:
        raise ConfigError(f"give the pretext METHOD ({', '.join(available_methods())}), or --from a run or search "
                          "folder to train with its settings")
    method_cls = get_method(method)
    if args.out is not None and not args.out.strip():  # an unset shell variable: not the default folder, silently
        raise ConfigError(f"--out is empty; give a folder for the run, or leave the flag out for "
                          f"runs/train/{method}-<time>")
    config = TrainConfig(
        method=method,
        preset=args.preset,
        data=args.data if dataset_name(args.data) is not None else absolute(args.data),
        data_root=absolute(args.root),
        audio_dir=absolute(args.audio_dir),
        max_epochs=args.max_epochs,
        steps_per_epoch=args.steps_per_epoch or None,  # 0 is the flag's "one pass"; below 0, check_config says so
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        num_workers=args.workers,
        num_threads=args.threads,
        out_dir=args.out or str(Path("runs") / "train" / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"),
    )
    method_fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method_params", "method", *FLAG_OF_SETTING}
    method_params, train_overrides = {}, {}
    if source is not None:
        config = _from_source(config, source, given)
        recorded = source.settings.get("method_params") or {}
        if not isinstance(recorded, dict):
            raise ConfigError(f"--from: {source.describe()} holds method_params that are not name: value pairs")
        method_params.update(recorded)  # the method's settings it was given (not its preset's: --preset may change)
    for name, value in _parse_set(args.set).items():
        if name in method_fields:
            method_params[name] = value
        elif name in train_fields:
            train_overrides[name] = value
        else:
            raise ConfigError(
                f"unknown setting {name!r} for {method}; method settings: {', '.join(sorted(method_fields))}; "
                f"training settings: {', '.join(sorted(train_fields))}"
            )
    config = apply_overrides(config, train_overrides)
    config.method_params = method_params
    method_settings(config)  # validate names, types and values now, not mid-run
    check_config(config, names=FLAG_OF_SETTING)
    return config


def schedule_notes(config: TrainConfig) -> list[str]:
    """Warnings about schedules the run is too short to finish (the run itself is still valid)."""
    notes = []
    settings = method_settings(config)
    warmup = getattr(settings, "teacher_warmup_epochs", 0.0)
    if warmup > 0 and warmup >= config.max_epochs:
        final = settings.teacher_temperature
        notes.append(
            f"the teacher temperature warm-up ({warmup:g} epoch{'' if warmup == 1 else 's'}) is not shorter than the "
            f"run ({counted(config.max_epochs, 'epoch')}): the teacher never reaches teacher_temperature {final:g}; "
            f"raise --max-epochs or lower it with --set teacher_warmup_epochs=N"
        )
    return notes


def _run_folder_taken(folder: Path) -> str | None:
    """Why ``folder`` cannot take a run (a file, or a folder with files: a run never overwrites another)."""
    if folder.exists() and not folder.is_dir():
        return "is a file; give a folder for the run"
    if folder.is_dir() and any(child.name != CLAIM_FILE for child in folder.iterdir()):
        return "exists and is not empty; a run never overwrites another: give another --out"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from musicssl.pretext.registry import UnknownMethodError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # the data's modules load here (pandas, soundfile: a second on a loaded machine)
        source = read_run_source(args.source) if args.source is not None else None
        config = config_from_args(args, given_options(argv) if source is not None else frozenset(), source)
    except (ConfigError, UnknownMethodError, ValueError, TypeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:  # one line, as one while the command loads
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return 130
    if source is not None:
        print(f"{parser.prog}: training with the settings of {source.describe()}")
        threads = source.settings.get("num_threads")
        if threads is not None and args.threads is None and threads != torch.get_num_threads():
            print(f"{parser.prog}: note: it trained on {counted(threads, 'torch thread')}, this run on torch's choice "
                  f"({torch.get_num_threads()}): give --threads {threads} to repeat it step for step", file=sys.stderr)
    out = Path(config.out_dir)
    try:  # locked until the run is written, so that two runs never write into one folder
        claim = claim_folder(out, _run_folder_taken, numbered=not args.out)  # the default name: -2 if taken
    except FolderTaken as taken:
        parser.exit(2, f"{parser.prog}: error: --out {out}: {taken}\n")
    except OSError as error:
        parser.exit(2, f"{parser.prog}: error: cannot write the run folder {out} ({error.strerror or error}); "
                       "give another --out\n")
    out = claim.path
    config.out_dir = str(out)
    from musicssl.data.cache import MelCacheError

    try:  # the claim's lock goes with any ending, an unexpected error's too (and a Ctrl-C from here on)
        try:
            room = _room_problem(config)
            if room:  # before the training, not after it (the run is written when it ends)
                print(f"{parser.prog}: error: --out {out}: {room}; free some space or give another --out",
                      file=sys.stderr)
                return 2
            for note in schedule_notes(config):
                print(f"{parser.prog}: note: {note}", file=sys.stderr)
            with sigterm_interrupts():  # also while the data are prepared and the final probe runs
                result = train(config, trained_from=source.describe() if source is not None else None)
        except (ConfigError, ValueError, OSError, MelCacheError) as error:
            claim.release(remove_if_unused=True)  # the run folder (and its new parents), left empty by the failure
            hint = cache_hint(error) if isinstance(error, OSError) else ""
            print(f"{parser.prog}: error: {error}{hint}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:  # one line; exit 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
            claim.release(remove_if_unused=True)
            if (out / "summary.json").is_file():  # the signal came as the run was written (summary.json last): whole
                print(f"\n{parser.prog}: interrupted as the run ended; it was written to {out}", file=sys.stderr)
            else:
                print(f"\n{parser.prog}: interrupted; no run written (a run writes its files when it ends)",
                      file=sys.stderr)
            return exit_code(stop)
    finally:
        claim.release(remove_if_unused=True)  # also an unexpected error's empty folder
    final = result.final
    shown = ", ".join(
        f"{key} {final[key]:.4f}" for key in ("train_loss", "collapse_rankme_embedding", "probe_map", "probe_auc")
        if isinstance(final.get(key), float)
    )
    print(f"{config.method}: {counted(final['epochs_run'], 'epoch')}, {counted(final['steps'], 'step')} in "
          f"{result.seconds:.1f} s; "
          f"verdict {result.verdict}{'; ' + shown if shown else ''}")
    if result.diverged_step is not None:
        kept = (f"backbone.pt holds the weights after epoch {final['backbone_epoch']}, the last before"
                if final["backbone_epoch"] else "no backbone.pt, as no epoch ended before")
        print(f"{config.method}: it diverged at step {result.diverged_step}; {kept}")
    elif final["backbone_epoch"] != final["epochs_run"]:
        kept = (f"backbone.pt holds those after epoch {final['backbone_epoch']}, the last whose were"
                if final["backbone_epoch"] else "no backbone.pt, as no epoch's were")
        print(f"{config.method}: its weights after epoch {final['epochs_run']} are not all finite; {kept}")
    print(f"wrote {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
