"""Clustering (DINO-like self-distillation onto K prototypes), the study's "Clustering" method.

Student and teacher share the architecture backbone -> clustering head (hidden -> hidden ->
bottleneck -> K logits); the teacher is an EMA copy. Loss (Caron et al. 2021, facebookresearch/dino
``DINOLoss``): cross-entropy between the teacher's ``softmax((t - center) / T_t)`` (no gradient) and
the student's ``log_softmax(s / T_s)``, over pairs of different views only. The centre is an EMA of
the teacher's mean logits (momentum 0.9) and, with the low teacher temperature (sharpening), is what
keeps one prototype from taking everything.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musicssl.models.heads import clustering_head
from musicssl.pretext.base import (
    PretextMethod,
    Progress,
    check_backbone,
    check_number,
    check_whole,
    cosine_ema_rate,
    ema_update_,
    evaluation_mode,
    forward_views,
    linear_warmup,
    mean_over_pairs,
)
from musicssl.pretext.registry import register

__all__ = ["dino", "Clustering", "ClusteringConfig"]


def _entropy(probs: Tensor, log_probs: Tensor) -> Tensor:
    return -(probs * log_probs).sum(dim=-1).mean()


def _head_outside_autocast(head: nn.Module, embedding: Tensor) -> Tensor:
    """``head(embedding)`` with autocast disabled, the input cast to the head's own dtype.

    Under bf16 autocast (float32 weights) only the backbone should round: the K logits are divided by
    a teacher temperature of 0.02-0.04, which would magnify bf16's rounding of the logits 25-50 times.
    A head whose weights are bf16 themselves (a model moved to bf16) runs in bf16, as before.
    """
    dtype = next(head.parameters()).dtype
    with torch.autocast(device_type=embedding.device.type, enabled=False):
        return head(embedding.to(dtype))


def dino(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> dict[str, Tensor]:
    """DINO's cross-entropy for ONE pair of (different) views: ``(B, K)`` logits, ``center`` of shape ``(K,)``.

    ``loss = mean_b sum_k -softmax((t_b - center) / teacher_temp)_k * log_softmax(s_b / student_temp)_k``,
    with no gradient into the teacher logits or the centre. Returns ``{"loss", "teacher_entropy",
    "student_entropy"}``: the loss and the mean per-sample entropies of the two distributions (the
    teacher's reaches ln K under uniform collapse and 0 under one-hot collapse). Computed in float32
    even under autocast.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "dino expects student and teacher logits of the same shape (batch, prototypes), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    num_prototypes = student_logits.shape[1]
    if center.numel() != num_prototypes:
        raise ValueError(
            f"dino's center must have one entry per prototype ({num_prototypes}), got shape {tuple(center.shape)}"
        )
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"dino temperatures must be > 0, got student {student_temp}, teacher {teacher_temp}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        centred = teacher_logits.detach().float() - center.detach().float().reshape(1, -1)
        teacher_log_probs = F.log_softmax(centred / teacher_temp, dim=-1)
        teacher_probs = teacher_log_probs.exp()
        student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        loss = -(teacher_probs * student_log_probs).sum(dim=-1).mean()
        return {
            "loss": loss,
            "teacher_entropy": _entropy(teacher_probs, teacher_log_probs),
            "student_entropy": _entropy(student_log_probs.detach().exp(), student_log_probs.detach()),
        }


@dataclass
class ClusteringConfig:
    """The clustering method's hyperparameters (the study's defaults).

    The head defaults to the study's 1024 -> 1024 -> 1024 -> 256 -> K; for a small backbone scale
    ``hidden_dim`` with it (e.g. 512 for a 256-d embedding). Teacher temperatures above ~0.07 are
    unstable per DINO's authors. The warm-up is linear in fractional epochs
    (:func:`~musicssl.pretext.base.linear_warmup`), reaching ``teacher_temperature`` at
    ``teacher_warmup_epochs``; DINO steps it once per epoch and reaches it one epoch earlier.
    """

    num_prototypes: int = 4096  # K
    hidden_dim: int = 1024
    bottleneck_dim: int = 256
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04  # reached after the warm-up
    teacher_temperature_start: float = 0.02
    teacher_warmup_epochs: float = 10.0
    center_momentum: float = 0.9
    base_ema_rate: float = 0.996  # teacher EMA rate; cosine schedule from here to 1
    use_centering: bool = True  # False removes the centre: the collapsing (one-hot) variant

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "bottleneck_dim"):
            check_whole(name, getattr(self, name))
        check_whole("num_prototypes", self.num_prototypes, low=2)
        for name in ("student_temperature", "teacher_temperature", "teacher_temperature_start"):
            check_number(name, getattr(self, name), 0, inclusive=False)
        check_number("teacher_warmup_epochs", self.teacher_warmup_epochs, 0)
        for name in ("center_momentum", "base_ema_rate"):
            check_number(name, getattr(self, name), 0, high=1)


@register
class Clustering(PretextMethod):
    """DINO-like clustering with an EMA teacher, a centre and a teacher-temperature warm-up.

    With V views the loss is the mean over the V (V - 1) ordered pairs (teacher view i, student view
    j), i != j, of :func:`dino` (DINO averages over its n_loss_terms the same way).

    The centre update: ``training_loss`` in training mode records the batch mean of the teacher's
    logits (over all views), and :meth:`after_optimizer_step` applies
    ``center = m * center + (1 - m) * recorded_mean``. The next step therefore sees the updated centre,
    as in DINO, while loss evaluations outside training (eval mode) never move it. The trainer does
    not accumulate gradients and calls :meth:`after_optimizer_step` after every batch, so each update
    uses that one batch's mean; were ``training_loss`` called several times in training mode before
    it, the recorded means would be averaged.

    Under bf16 autocast (the GPU default) the heads, student and teacher, run in float32 with
    autocast disabled: their logits are divided by a teacher temperature of 0.02-0.04, which would
    magnify bf16's rounding 25-50 times. Only the backbones run in bf16 (their own rounding remains).
    """

    name = "clustering"
    assigns_prototypes = True
    ema_teacher = True
    Config = ClusteringConfig

    center: Tensor
    current_teacher_temperature: Tensor

    def __init__(self, backbone: nn.Module, config: ClusteringConfig | None = None) -> None:
        config = ClusteringConfig() if config is None else config
        if not isinstance(config, ClusteringConfig):
            raise TypeError(f"Clustering needs a ClusteringConfig, got {type(config).__name__}")
        super().__init__(backbone, config)
        self.head = clustering_head(
            check_backbone(backbone), config.hidden_dim, config.bottleneck_dim, config.num_prototypes
        )
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        # Buffers, so that checkpoints restore them and .to(device) moves them.
        self.register_buffer("center", torch.zeros(config.num_prototypes))
        self.register_buffer(
            "current_teacher_temperature", torch.tensor(self.teacher_temperature(Progress(0, 1, 1)))
        )
        self._pending_center_sum: Tensor | None = None
        self._pending_center_count = 0

    def student_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the teacher (explicit, so unfreezing the module cannot leak it in)."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("teacher_")]

    def teacher_temperature(self, progress: Progress) -> float:
        """Linear warm-up from ``teacher_temperature_start`` to ``teacher_temperature`` over the warm-up epochs."""
        config = self.config
        return linear_warmup(
            config.teacher_temperature_start, config.teacher_temperature, config.teacher_warmup_epochs, progress
        )

    def ema_rate(self, progress: Progress) -> float:
        """The teacher's EMA rate at ``progress``: cosine from ``base_ema_rate`` to 1."""
        return cosine_ema_rate(self.config.base_ema_rate, progress)

    def _effective_center(self) -> Tensor:
        return self.center if self.config.use_centering else torch.zeros_like(self.center)

    def training_loss(self, views: Sequence[Tensor], progress: Progress) -> dict[str, Tensor]:
        views = views if isinstance(views, Tensor) else list(views)  # read twice (student, teacher)
        teacher_temperature = self.teacher_temperature(progress)
        self.current_teacher_temperature.fill_(teacher_temperature)
        student_logits = forward_views(lambda view: _head_outside_autocast(self.head, self.backbone(view)), views)
        with torch.no_grad():
            teacher_logits = forward_views(
                lambda view: _head_outside_autocast(self.teacher_head, self.teacher_backbone(view)), views
            )
        n_views = len(teacher_logits)
        center = self._effective_center()
        pairs = [
            dino(student_logits[j], teacher_logits[i], center, self.config.student_temperature, teacher_temperature)
            for i, j in permutations(range(n_views), 2)
        ]
        if self.training and self.config.use_centering:
            batch_mean = torch.cat(teacher_logits).float().mean(dim=0)
            if self._pending_center_sum is not None:
                batch_mean = batch_mean + self._pending_center_sum
            self._pending_center_sum = batch_mean
            self._pending_center_count += 1
        result = mean_over_pairs(pairs)
        device = result["loss"].device
        result["teacher_temperature"] = torch.tensor(teacher_temperature, device=device)
        result["ema_rate"] = torch.tensor(self.ema_rate(progress), device=device)
        return result

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> None:
        """EMA the teacher towards the student at the scheduled rate, then update the centre."""
        rate = self.ema_rate(progress)
        ema_update_(self.teacher_backbone, self.backbone, rate)
        ema_update_(self.teacher_head, self.head, rate)
        if self._pending_center_sum is not None:
            batch_center = self._pending_center_sum / self._pending_center_count
            momentum = self.config.center_momentum
            self.center.mul_(momentum).add_(batch_center.to(self.center.dtype), alpha=1.0 - momentum)
            self._pending_center_sum = None
            self._pending_center_count = 0

    @torch.no_grad()
    def collapse_outputs(self, mels: Tensor) -> dict[str, Tensor]:
        """``embedding``, ``projection`` (the student's K logits), ``teacher_embedding`` and
        ``assignment_probs`` (teacher softmax of centred logits at the current teacher temperature),
        computed in eval mode."""
        with evaluation_mode(self):
            embedding = self.backbone(mels)
            teacher_embedding = self.teacher_backbone(mels)
            teacher_logits = _head_outside_autocast(self.teacher_head, teacher_embedding)
            centred = teacher_logits - self._effective_center().reshape(1, -1)
            return {
                "embedding": embedding,
                "projection": _head_outside_autocast(self.head, embedding),
                "teacher_embedding": teacher_embedding,
                "assignment_probs": F.softmax(centred / self.current_teacher_temperature, dim=-1),
            }
