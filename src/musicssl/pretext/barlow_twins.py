"""Barlow Twins: drive the cross-correlation matrix of two views' standardised projections to identity.

The loss follows facebookresearch/barlowtwins (``main.py``, current version): ``c = bn(z1)^T bn(z2) / B``
with a BatchNorm without affine parameters (batch mean, biased batch variance, eps 1e-5), then
``sum_i (c_ii - 1)^2 + lambd * sum_{i != j} c_ij^2``, with no further scaling. As in the original
and the study's code, each view goes through the backbone and projector on its own, so their
BatchNorm layers (in training mode) normalise each view with its own batch statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor, nn

from musicssl.models.heads import projector
from musicssl.pretext.base import (
    PretextMethod,
    Progress,
    check_backbone,
    check_number,
    check_projections,
    check_whole,
    evaluation_mode,
    forward_views,
    mean_over_pairs,
)
from musicssl.pretext.registry import register

__all__ = ["barlow_twins", "BarlowTwins", "BarlowTwinsConfig"]

_BATCH_NORM_EPSILON = 1e-5  # nn.BatchNorm1d's default, which the authors' code uses


def _standardise(z: Tensor) -> Tensor:
    """What ``nn.BatchNorm1d(D, affine=False)`` does in training mode."""
    mean = z.mean(dim=0)
    variance = z.var(dim=0, unbiased=False)
    return (z - mean) / torch.sqrt(variance + _BATCH_NORM_EPSILON)


def barlow_twins(z_a: Tensor, z_b: Tensor, lambd: float = 0.0051) -> dict[str, Tensor]:
    """Barlow Twins loss between two ``(B, D)`` batches of projections (B >= 2).

    Returns ``{"loss", "on_diagonal", "off_diagonal"}``: ``on_diagonal = sum_i (c_ii - 1)^2``,
    ``off_diagonal = sum_{i != j} c_ij^2`` (unweighted), ``loss = on_diagonal + lambd * off_diagonal``.
    Computed in float32 even under autocast.
    """
    check_projections("barlow_twins", z_a, z_b, min_batch=2)
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a, b = _standardise(z_a.float()), _standardise(z_b.float())
        correlation = (a.T @ b) / a.shape[0]
        diagonal = torch.diagonal(correlation)
        on_diagonal = (diagonal - 1.0).pow(2).sum()
        off_diagonal = correlation.pow(2).sum() - diagonal.pow(2).sum()
        return {"loss": on_diagonal + lambd * off_diagonal, "on_diagonal": on_diagonal, "off_diagonal": off_diagonal}


@dataclass
class BarlowTwinsConfig:
    """Barlow Twins' hyperparameters; projector defaults to the study's 1024 -> 1024 -> 1024 -> 2048.
    For a small backbone scale the heads with it (e.g. ``hidden_dim=512, projection_dim=1024``).
    The original's lambd is 0.0051, tuned for its 8192-d projections (about 42/D there)."""

    lambd: float = 0.0051  # weight of the off-diagonal (redundancy reduction) term
    hidden_dim: int = 1024
    projection_dim: int = 2048

    def __post_init__(self) -> None:
        check_number("lambd", self.lambd, 0)
        for name in ("hidden_dim", "projection_dim"):
            check_whole(name, getattr(self, name))


@register
class BarlowTwins(PretextMethod):
    """Backbone -> projector -> :func:`barlow_twins`; with V views, the mean over the V (V - 1) / 2
    unordered pairs (swapping the views transposes c and leaves the loss unchanged)."""

    name = "barlow_twins"
    Config = BarlowTwinsConfig

    def __init__(self, backbone: nn.Module, config: BarlowTwinsConfig | None = None) -> None:
        config = BarlowTwinsConfig() if config is None else config
        if not isinstance(config, BarlowTwinsConfig):
            raise TypeError(f"BarlowTwins needs a BarlowTwinsConfig, got {type(config).__name__}")
        super().__init__(backbone, config)
        self.projector = projector(check_backbone(backbone), config.hidden_dim, config.projection_dim)

    def training_loss(self, views: Sequence[Tensor], progress: Progress) -> dict[str, Tensor]:
        projections = forward_views(lambda view: self.projector(self.backbone(view)), views)
        pairs = [
            barlow_twins(projections[i], projections[j], self.config.lambd)
            for i, j in combinations(range(len(projections)), 2)
        ]
        return mean_over_pairs(pairs)

    @torch.no_grad()
    def collapse_outputs(self, mels: Tensor) -> dict[str, Tensor]:
        """``embedding`` and ``projection``, computed in eval mode (running BatchNorm statistics)."""
        with evaluation_mode(self):
            embedding = self.backbone(mels)
            return {"embedding": embedding, "projection": self.projector(embedding)}
