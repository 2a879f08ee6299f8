"""VICReg: invariance (MSE between views), variance (hinge on per-dimension std) and covariance terms.

The loss formula follows facebookresearch/vicreg (``main_vicreg.py``, ``VICReg.forward``) exactly,
including the 1/2 on the variance term (solo-learn omits it) and ``std = sqrt(var + 1e-4)``. As in
the original and the study's code, each view goes through the backbone and projector on its own, so
their BatchNorm layers (in training mode) normalise each view with its own batch statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
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

__all__ = ["vicreg", "VICReg", "VICRegConfig"]

_STD_EPSILON = 1e-4  # inside the square root, as in the authors' code


def _off_diagonal_sum_of_squares(matrix: Tensor) -> Tensor:
    return matrix.pow(2).sum() - torch.diagonal(matrix).pow(2).sum()


def vicreg(
    z_a: Tensor, z_b: Tensor, inv_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0
) -> dict[str, Tensor]:
    """VICReg loss between two ``(B, D)`` batches of projections (B >= 2).

    - invariance: ``mse(z_a, z_b)`` (mean over batch and dimensions);
    - variance: ``mean(relu(1 - std_a)) / 2 + mean(relu(1 - std_b)) / 2`` with
      ``std = sqrt(var + 1e-4)`` per dimension (unbiased variance);
    - covariance: for each of a and b, the centred covariance ``x^T x / (B - 1)``, its off-diagonal
      sum of squares divided by D; the two are added.

    Returns ``{"loss", "invariance", "variance", "covariance"}``: the terms unweighted, ``loss`` their
    weighted sum. Computed in float32 even under autocast.
    """
    check_projections("vicreg", z_a, z_b, min_batch=2)
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        x, y = z_a.float(), z_b.float()
        batch_size, dim = x.shape
        invariance = F.mse_loss(x, y)
        x = x - x.mean(dim=0)
        y = y - y.mean(dim=0)
        std_x = torch.sqrt(x.var(dim=0) + _STD_EPSILON)
        std_y = torch.sqrt(y.var(dim=0) + _STD_EPSILON)
        variance = torch.mean(F.relu(1.0 - std_x)) / 2 + torch.mean(F.relu(1.0 - std_y)) / 2
        cov_x = (x.T @ x) / (batch_size - 1)
        cov_y = (y.T @ y) / (batch_size - 1)
        covariance = _off_diagonal_sum_of_squares(cov_x) / dim + _off_diagonal_sum_of_squares(cov_y) / dim
        loss = inv_weight * invariance + var_weight * variance + cov_weight * covariance
        return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


@dataclass
class VICRegConfig:
    """VICReg's hyperparameters (the original's 25/25/1 weights); projector defaults to the study's
    1024 -> 1024 -> 1024 -> 2048. For a small backbone scale the heads with it (e.g. ``hidden_dim=512,
    projection_dim=1024`` for a 256-d embedding)."""

    inv_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0
    hidden_dim: int = 1024
    projection_dim: int = 2048

    def __post_init__(self) -> None:
        for name in ("inv_weight", "var_weight", "cov_weight"):
            check_number(name, getattr(self, name), 0)
        for name in ("hidden_dim", "projection_dim"):
            check_whole(name, getattr(self, name))


@register
class VICReg(PretextMethod):
    """Backbone -> projector -> :func:`vicreg`; with V views, the mean over the V (V - 1) / 2 unordered
    pairs (the loss is symmetric in its two arguments)."""

    name = "vicreg"
    Config = VICRegConfig

    def __init__(self, backbone: nn.Module, config: VICRegConfig | None = None) -> None:
        config = VICRegConfig() if config is None else config
        if not isinstance(config, VICRegConfig):
            raise TypeError(f"VICReg needs a VICRegConfig, got {type(config).__name__}")
        super().__init__(backbone, config)
        self.projector = projector(check_backbone(backbone), config.hidden_dim, config.projection_dim)

    def training_loss(self, views: Sequence[Tensor], progress: Progress) -> dict[str, Tensor]:
        projections = forward_views(lambda view: self.projector(self.backbone(view)), views)
        config = self.config
        pairs = [
            vicreg(projections[i], projections[j], config.inv_weight, config.var_weight, config.cov_weight)
            for i, j in combinations(range(len(projections)), 2)
        ]
        return mean_over_pairs(pairs)

    @torch.no_grad()
    def collapse_outputs(self, mels: Tensor) -> dict[str, Tensor]:
        """``embedding`` and ``projection``, computed in eval mode (running BatchNorm statistics)."""
        with evaluation_mode(self):
            embedding = self.backbone(mels)
            return {"embedding": embedding, "projection": self.projector(embedding)}
