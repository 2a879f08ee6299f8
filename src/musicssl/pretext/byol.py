"""BYOL: an online network with a predictor regresses an EMA target network's projection.

Loss (Grill et al. 2020), per ordered pair of views: ``2 - 2 cos(p_online(view_i), stopgrad(z_target(view_j)))``.
The target (teacher) is a deep copy of backbone + projector whose weights follow the online ones with
``tau_k = 1 - (1 - tau_base) (1 + cos(pi k / K)) / 2`` (:func:`~musicssl.pretext.base.cosine_ema_rate`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musicssl.models.heads import byol_predictor, projector
from musicssl.pretext.base import (
    PretextMethod,
    Progress,
    check_backbone,
    check_number,
    check_projections,
    check_whole,
    cosine_ema_rate,
    ema_update_,
    evaluation_mode,
    forward_views,
    mean_over_pairs,
)
from musicssl.pretext.registry import register

__all__ = [
    "byol",
    "BYOL",
    "BYOLConfig",
]


def byol(p_a: Tensor, z_b: Tensor) -> dict[str, Tensor]:
    """BYOL's loss in one direction: ``mean_i (2 - 2 cos(p_a[i], z_b[i]))`` with no gradient into ``z_b``.

    ``p_a`` is the online prediction of one view, ``z_b`` the target projection of another. The
    symmetric BYOL loss is the sum (original) or mean (here, in :class:`BYOL`) of both directions.
    Returns ``{"loss", "cosine_similarity"}`` (the mean cosine, 1 when aligned).
    """
    check_projections("byol", p_a, z_b)
    with torch.autocast(device_type=p_a.device.type, enabled=False):
        prediction = F.normalize(p_a.float(), dim=1)
        target = F.normalize(z_b.detach().float(), dim=1)
        cosine = (prediction * target).sum(dim=1).mean()
        return {"loss": 2.0 - 2.0 * cosine, "cosine_similarity": cosine}


# --------------------------------------------------------------------------------------------------
# Method


@dataclass
class BYOLConfig:
    """BYOL's hyperparameters; heads default to the study's sizes (1024 -> 1024 -> 1024 -> 2048 -> 256 -> 2048).

    For a small backbone scale the heads with it (e.g. ``hidden_dim=512, projection_dim=1024`` for a
    256-d embedding).
    """

    base_ema_rate: float = 0.996  # tau_base; the teacher rate follows a cosine from here to 1
    hidden_dim: int = 1024  # projector hidden width
    projection_dim: int = 2048  # projector output size
    predictor_hidden_dim: int = 256
    use_predictor: bool = True  # False gives the predictor-free variant, which collapses
    # The predictor's learning rate relative to the run's (SimSiam's and DirectPred's remedy for a
    # predictor that lags behind the encoder: 10).
    predictor_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        check_number("base_ema_rate", self.base_ema_rate, 0, high=1)
        check_number("predictor_lr_scale", self.predictor_lr_scale, 0, inclusive=False)
        for name in ("hidden_dim", "projection_dim", "predictor_hidden_dim"):
            check_whole(name, getattr(self, name))


@register
class BYOL(PretextMethod):
    """Online backbone -> projector -> predictor; target (teacher) backbone -> projector by EMA.

    With V views the loss is the mean over the V (V - 1) ordered pairs (i, j), i != j, of
    ``byol(predictor(z_i), z_target_j)``; for two views that is the mean of the two directions (half of
    the original symmetric sum, so values lie in [0, 4]).
    """

    name = "byol"
    ema_teacher = True
    Config = BYOLConfig

    def __init__(self, backbone: nn.Module, config: BYOLConfig | None = None) -> None:
        config = BYOLConfig() if config is None else config
        if not isinstance(config, BYOLConfig):
            raise TypeError(f"BYOL needs a BYOLConfig, got {type(config).__name__}")
        super().__init__(backbone, config)
        embedding_dim = check_backbone(backbone)
        self.projector = projector(embedding_dim, config.hidden_dim, config.projection_dim)
        self.predictor: nn.Module = nn.Identity()
        if config.use_predictor:
            self.predictor = byol_predictor(config.projection_dim, config.predictor_hidden_dim)
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def student_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the teacher (explicit, so unfreezing the module cannot leak it in)."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("teacher_")]

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The predictor at ``predictor_lr_scale`` times the learning rate, the rest of the student at 1."""
        predictor = {id(p) for p in self.predictor.parameters()}
        student = self.student_parameters()
        rest = [p for p in student if id(p) not in predictor]
        own = [p for p in student if id(p) in predictor]
        return [(rest, 1.0), (own, float(self.config.predictor_lr_scale))] if own else [(rest, 1.0)]

    def ema_rate(self, progress: Progress) -> float:
        """The teacher's EMA rate at ``progress``: cosine from ``base_ema_rate`` to 1."""
        return cosine_ema_rate(self.config.base_ema_rate, progress)

    def training_loss(self, views: Sequence[Tensor], progress: Progress) -> dict[str, Tensor]:
        views = views if isinstance(views, Tensor) else list(views)  # read twice (student, teacher)
        predictions = forward_views(lambda view: self.predictor(self.projector(self.backbone(view))), views)
        with torch.no_grad():
            targets = forward_views(lambda view: self.teacher_projector(self.teacher_backbone(view)), views)
        pairs = permutations(range(len(views)), 2)
        result = mean_over_pairs([byol(predictions[i], targets[j]) for i, j in pairs])
        result["ema_rate"] = torch.tensor(self.ema_rate(progress), device=result["loss"].device)
        return result

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> None:
        """Move the teacher towards the student with the scheduled rate at ``progress``."""
        rate = self.ema_rate(progress)
        ema_update_(self.teacher_backbone, self.backbone, rate)
        ema_update_(self.teacher_projector, self.projector, rate)

    @torch.no_grad()
    def collapse_outputs(self, mels: Tensor) -> dict[str, Tensor]:
        """``embedding``, ``projection`` (online projector), ``teacher_embedding``; computed in eval mode."""
        with evaluation_mode(self):
            embedding = self.backbone(mels)
            return {
                "embedding": embedding,
                "projection": self.projector(embedding),
                "teacher_embedding": self.teacher_backbone(mels),
            }
