"""What every pretext method provides to the shared trainer.

A method owns the backbone it trains, its heads and (for BYOL and clustering) an EMA teacher. The
trainer only calls the four methods below, so adding a method means writing one module in this
package with a :func:`musicssl.pretext.registry.register`-decorated subclass; nothing else changes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "Progress",
    "PretextMethod",
    "cosine_ema_rate",
    "linear_warmup",
    "forward_views",
    "ema_update_",
    "mean_over_pairs",
    "evaluation_mode",
    "check_backbone",
    "check_projections",
    "check_number",
    "check_whole",
]


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_number(name: str, value: Any, low: float, *, inclusive: bool = True, high: float | None = None) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite number >= ``low`` (> ``low`` when
    not ``inclusive``) and, given ``high``, <= ``high``. NaN fails (a ``value < low`` test lets it
    through, and a NaN weight or temperature makes the first loss NaN)."""
    if _real(value) and (value >= low if inclusive else value > low) and (high is None or value <= high):
        return
    bound = f"in [{low:g}, {high:g}]" if high is not None else f"{'>=' if inclusive else '>'} {low:g}"
    raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_whole(name: str, value: Any, low: int = 1) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a whole number >= ``low``."""
    if _real(value) and value == int(value) and value >= low:
        return
    kind = "a positive integer" if low == 1 else f"at least {low} (a whole number)"
    raise ValueError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class Progress:
    """Where training stands, for schedules: optimiser steps done, total planned, steps per epoch."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))

    @property
    def epoch(self) -> float:
        return self.step / max(1, self.steps_per_epoch)


def cosine_ema_rate(base_rate: float, progress: Progress) -> float:
    """BYOL's schedule: tau = 1 - (1 - base) * (1 + cos(pi k / K)) / 2, from ``base_rate`` at step 0 to 1."""
    return 1.0 - (1.0 - base_rate) * (1.0 + math.cos(math.pi * progress.fraction)) / 2.0


def linear_warmup(start: float, end: float, warmup_epochs: float, progress: Progress) -> float:
    """``start`` at epoch 0, linearly to ``end`` at ``warmup_epochs``, then ``end``."""
    if warmup_epochs <= 0:
        return end
    weight = min(1.0, progress.epoch / warmup_epochs)
    return start + (end - start) * weight


class PretextMethod(nn.Module):
    """Base class: the backbone, the method's heads and loss, and the teacher if any.

    Subclasses set ``name`` (the CLI name) and ``Config`` (a dataclass of the method's own
    hyperparameters, every one of them a plain typed field with the study's default).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    # True where :meth:`collapse_outputs` gives ``"assignment_probs"``: only such a method's runs can show
    # prototype ("cluster", "partial") collapse, which a search's ``--stop-on`` is checked against.
    assigns_prototypes: ClassVar[bool] = False
    # True where a teacher follows the student by EMA steps (BYOL's target, clustering's teacher): steps that
    # half-precision weights round away, which the trainer's precision check says in the method's name.
    ema_teacher: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, config: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config

    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.embedding_dim)

    def training_loss(self, views: Sequence[Tensor], progress: Progress) -> dict[str, Tensor]:
        """Loss on a batch of V >= 2 views (each ``(B, n_mels, frames)``).

        Returns a dict whose ``"loss"`` is the scalar to minimise and whose other entries are its
        terms and the method's scheduled values (e.g. ``"teacher_temperature"``), for logging.
        """
        raise NotImplementedError

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> None:
        """Hook run after each optimiser step (EMA teacher updates, centres). Default: nothing."""

    @torch.no_grad()
    def collapse_outputs(self, mels: Tensor) -> dict[str, Tensor]:
        """What the collapse metrics look at, for a batch of single segments ``(B, n_mels, frames)``.

        Always ``"embedding"`` (backbone output) and ``"projection"`` (head output); clustering adds
        ``"assignment_probs"`` (teacher softmax over prototypes), EMA methods ``"teacher_embedding"``.
        """
        raise NotImplementedError

    def student_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (the teacher, if any, is excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The :meth:`student_parameters` split into ``(parameters, learning-rate scale)`` groups.

        The optimiser gives each group the run's learning rate times its scale (the schedule applies
        to all alike). Default: one group at scale 1.
        """
        return [(self.student_parameters(), 1.0)]


# --------------------------------------------------------------------------------------------------
# Helpers the methods share


def forward_views(network: Callable[[Tensor], Tensor], views: Sequence[Tensor]) -> list[Tensor]:
    """Check a batch of V >= 2 views and run ``network`` on each view separately.

    One pass per view, as in the study's code (and the original BYOL, Barlow Twins and VICReg): in
    training mode the BatchNorm layers normalise each view with its own batch statistics, where one pass
    over the views stacked into one batch would pool them across the views.
    """
    if isinstance(views, Tensor):
        raise TypeError(
            "views must be a sequence of V tensors of shape (B, n_mels, frames), got a single tensor; "
            "pass list(views) if the views are stacked along the first dimension"
        )
    views = list(views)
    if len(views) < 2:
        raise ValueError(f"multi-view methods need at least 2 views per example, got {len(views)}")
    shapes = [tuple(view.shape) for view in views]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"all views must have the same shape (B, n_mels, frames), got {shapes}")
    if len(shapes[0]) < 2 or shapes[0][0] < 2:
        raise ValueError(
            f"views must be batches (B, n_mels, frames) with B >= 2 (batch statistics need two examples), "
            f"got shape {shapes[0]}"
        )
    return [network(view) for view in views]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, rate: float) -> None:
    """In place: ``teacher_param = rate * teacher_param + (1 - rate) * student_param`` for every parameter.

    Buffers (BatchNorm running statistics) are left alone: the teacher runs in the same mode as the
    student and keeps its own statistics, as in BYOL's and DINO's code.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"EMA rate must be in [0, 1], got {rate}")
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different architectures; the teacher must be a copy of the student")
    for teacher_param, student_param in zip(teacher_params, student_params):
        # lerp_(end, w) = self + w * (end - self) = (1 - w) * self + w * end
        teacher_param.lerp_(student_param.detach(), 1.0 - rate)


def mean_over_pairs(pairs: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Average each entry of the per-pair loss dicts; every entry but ``"loss"`` is detached (for logging)."""
    means = {key: torch.stack([pair[key] for pair in pairs]).mean() for key in pairs[0]}
    return {key: value if key == "loss" else value.detach() for key, value in means.items()}


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Run a block in eval mode and restore the previous mode, so that collapse probes use running
    BatchNorm statistics and never update them."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def check_backbone(backbone: nn.Module) -> int:
    """The backbone's ``embedding_dim``, or a clear error if it does not declare one."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
    embedding_dim = getattr(backbone, "embedding_dim", None)
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(
            f"the backbone must have a positive integer attribute embedding_dim (the size of its output), "
            f"got {embedding_dim!r}"
        )
    return embedding_dim


def check_projections(name: str, a: Tensor, b: Tensor, min_batch: int = 1) -> None:
    """Both inputs must be ``(B, D)`` batches of the same shape with at least ``min_batch`` rows."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"{name} expects two (batch, dim) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] < min_batch:
        raise ValueError(f"{name} needs a batch of at least {min_batch} rows, got {a.shape[0]}")
