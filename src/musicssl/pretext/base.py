"""What every pretext method provides to the shared trainer.

A method owns the backbone it trains, its heads and (for BYOL and clustering) an EMA teacher. The
trainer only calls the four methods below, so adding a method means writing one module in this
package with a :func:`musicssl.pretext.registry.register`-decorated subclass; nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Progress", "PretextMethod", "cosine_ema_rate", "linear_warmup"]


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
