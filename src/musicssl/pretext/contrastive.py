"""Contrastive learning with SimCLR's NT-Xent loss (normalised temperature-scaled cross-entropy).

For N pairs there are 2N rows; each row's positive is the other view of the same example and the
other 2N - 2 rows are its negatives; logits are cosine similarities divided by the temperature; the
loss is the cross-entropy averaged over the 2N rows (the common convention; TensorFlow's original
sums the two directions, i.e. twice this).
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

__all__ = ["nt_xent", "Contrastive", "ContrastiveConfig"]


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float = 0.1) -> dict[str, Tensor]:
    """NT-Xent between two ``(N, D)`` batches where ``z_a[i]`` and ``z_b[i]`` are positives (N >= 2).

    Returns ``{"loss", "positive_similarity", "negative_similarity"}``: the mean cross-entropy over
    the 2N rows, the mean cosine of positive pairs and the mean cosine over the 2N (2N - 2)
    row-negative pairs. Computed in float32 even under autocast.
    """
    check_projections("nt_xent", z_a, z_b, min_batch=2)
    if temperature <= 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        n = z_a.shape[0]
        z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
        cosine = z @ z.T
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        # row i's positive is row i + N and vice versa
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        logits = (cosine / temperature).masked_fill(self_mask, float("-inf"))
        loss = F.cross_entropy(logits, positives)
        positive_cosine = cosine[torch.arange(2 * n, device=z.device), positives]
        negative_mask = ~self_mask
        negative_mask[torch.arange(2 * n, device=z.device), positives] = False
        return {
            "loss": loss,
            "positive_similarity": positive_cosine.mean(),
            "negative_similarity": cosine[negative_mask].mean(),
        }


@dataclass
class ContrastiveConfig:
    """Contrastive (SimCLR) hyperparameters; projector defaults to the study's 1024 -> 1024 -> 1024 -> 2048.
    For a small backbone scale the heads with it (e.g. ``hidden_dim=512, projection_dim=1024``)."""

    temperature: float = 0.1
    hidden_dim: int = 1024
    projection_dim: int = 2048

    def __post_init__(self) -> None:
        check_number("temperature", self.temperature, 0, inclusive=False)
        for name in ("hidden_dim", "projection_dim"):
            check_whole(name, getattr(self, name))


@register
class Contrastive(PretextMethod):
    """Backbone -> projector -> :func:`nt_xent`; with V views, the mean of the pairwise NT-Xent over
    the V (V - 1) / 2 unordered pairs (each pair's loss is already symmetric). Other views of the same
    example are not used as extra negatives."""

    name = "contrastive"
    Config = ContrastiveConfig

    def __init__(self, backbone: nn.Module, config: ContrastiveConfig | None = None) -> None:
        config = ContrastiveConfig() if config is None else config
        if not isinstance(config, ContrastiveConfig):
            raise TypeError(f"Contrastive needs a ContrastiveConfig, got {type(config).__name__}")
        super().__init__(backbone, config)
        self.projector = projector(check_backbone(backbone), config.hidden_dim, config.projection_dim)

    def training_loss(self, views: Sequence[Tensor], progress: Progress) -> dict[str, Tensor]:
        projections = forward_views(lambda view: self.projector(self.backbone(view)), views)
        pairs = [
            nt_xent(projections[i], projections[j], self.config.temperature)
            for i, j in combinations(range(len(projections)), 2)
        ]
        return mean_over_pairs(pairs)

    @torch.no_grad()
    def collapse_outputs(self, mels: Tensor) -> dict[str, Tensor]:
        """``embedding`` and ``projection``, computed in eval mode (running BatchNorm statistics)."""
        with evaluation_mode(self):
            embedding = self.backbone(mels)
            return {"embedding": embedding, "projection": self.projector(embedding)}
