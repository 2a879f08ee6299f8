"""Frozen-backbone embeddings of whole tracks: the mean of their segments' embeddings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from musicssl.data.cache import MelCache
from musicssl.data.views import track_segments

__all__ = ["calibrate_batchnorm", "embed_segments", "embed_tracks"]


@torch.no_grad()
def embed_segments(backbone: nn.Module, segments: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Embeddings ``(N, D)`` float32 of mel segments ``(N, n_mels, frames)``, in eval mode, in batches.

    The segments go in on the backbone's device and in its dtype: a backbone held in float64
    (``precision="64-true"``, a search's per-epoch probe) or moved to bf16 refused float32 input."""
    was_training = backbone.training
    backbone.eval()
    weight = next(backbone.parameters())
    try:
        parts = [backbone(segments[i : i + batch_size].to(weight.device, weight.dtype)).float().cpu()
                 for i in range(0, len(segments), batch_size)]
    finally:
        backbone.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, int(backbone.embedding_dim))


@torch.no_grad()
def embed_tracks(
    backbone: nn.Module,
    cache: MelCache,
    track_ids: Sequence[str],
    max_segments: int | None = 4,
    batch_size: int = 256,
) -> np.ndarray:
    """One embedding per track, float32 ``(len(track_ids), D)``: the mean over up to ``max_segments``
    4 s segments spread evenly over the track (consecutive candidates start 125 frames apart and are
    126 long, so neighbours share one frame)."""
    per_track = [track_segments(cache, track_id, max_segments=max_segments) for track_id in track_ids]
    counts = [len(segments) for segments in per_track]
    if min(counts, default=1) == 0:
        short = [track_id for track_id, count in zip(track_ids, counts) if count == 0]
        raise ValueError(f"{len(short)} track(s) shorter than one segment, e.g. {short[:3]}; leave them out")
    embeddings = embed_segments(backbone, torch.cat(per_track), batch_size)
    means = [chunk.mean(dim=0) for chunk in torch.split(embeddings, counts)]
    return torch.stack(means).numpy().astype(np.float32)


def calibrate_batchnorm(backbone: nn.Module, segments: torch.Tensor, batch_size: int, device: torch.device | None = None) -> int:
    """Set every BatchNorm's running mean and variance from ``segments``, leaving all weights as they are.

    An untrained backbone's BatchNorm layers hold mean 0 and variance 1, so in eval mode they do not
    normalise; a trained one holds statistics of real data, whatever it learned. Calibrated, the
    random initialisation is in the state training leaves it in (the fair untrained baseline).

    One pass in train mode with cumulative averaging (:func:`torch.optim.swa_utils.update_bn`): each
    running statistic becomes the average of its per-batch statistics, so the batch sizes matter.
    The segments are cut into ``min(ceil(len / batch_size), len // 2)`` batches of near-equal size:
    ``ceil(len / batch_size)`` as long as that leaves no batch of one (always, for ``batch_size >= 3``),
    else fewer and larger ones, so that every batch has at least two segments.
    Returns the number of batches; the backbone is left in eval mode.
    """
    from torch.optim.swa_utils import update_bn

    if len(segments) < 2:
        raise ValueError(f"need at least 2 segments to measure BatchNorm statistics, got {len(segments)}")
    batches = torch.tensor_split(segments, min(math.ceil(len(segments) / batch_size), len(segments) // 2))
    update_bn(batches, backbone, device=device)
    backbone.eval()
    return len(batches)
