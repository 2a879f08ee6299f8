"""Frozen-backbone embeddings of whole tracks: the mean of their segments' embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from musicssl.data.cache import MelCache
from musicssl.data.views import track_segments

__all__ = ["embed_segments", "embed_tracks"]


@torch.no_grad()
def embed_segments(backbone: nn.Module, segments: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Embeddings ``(N, D)`` of mel segments ``(N, n_mels, frames)``, in eval mode, in batches."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    try:
        parts = [backbone(segments[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(segments), batch_size)]
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
    non-overlapping 4 s segments spread evenly over the track."""
    per_track = [track_segments(cache, track_id, max_segments=max_segments) for track_id in track_ids]
    counts = [len(segments) for segments in per_track]
    if min(counts, default=1) == 0:
        short = [track_id for track_id, count in zip(track_ids, counts) if count == 0]
        raise ValueError(f"{len(short)} track(s) shorter than one segment, e.g. {short[:3]}; leave them out")
    embeddings = embed_segments(backbone, torch.cat(per_track), batch_size)
    means = [chunk.mean(dim=0) for chunk in torch.split(embeddings, counts)]
    return torch.stack(means).numpy().astype(np.float32)
