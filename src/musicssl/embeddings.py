"""Frozen-backbone embeddings of whole tracks: the mean of their segments' embeddings."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from musicssl.data.cache import MelCache
from musicssl.data.views import track_segment_count, track_segments

__all__ = ["calibrate_batchnorm", "calibrate_batchnorm_on_tracks", "embed_segments", "embed_tracks",
           "track_segment_batches"]


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


def track_segment_batches(cache: MelCache, track_ids: Sequence[str], max_segments: int | None,
                          sizes: Iterable[int]) -> Iterator[torch.Tensor]:
    """The segments of ``track_ids`` (:func:`~musicssl.data.views.track_segments`, in order) in batches of
    ``sizes``, as ``torch.cat`` of them all cut at those sizes would give, reading the tracks as the batches
    need them: only a batch and a track's segments are held at once, whatever the number of tracks."""
    tracks = iter(track_ids)
    held: list[torch.Tensor] = []
    count = 0
    for size in sizes:
        while count < size:
            track_id = next(tracks, None)
            if track_id is None:
                break
            segments = track_segments(cache, track_id, max_segments=max_segments)
            held.append(segments)
            count += len(segments)
        if count == 0:
            return
        joined = torch.cat(held) if len(held) > 1 else held[0]
        yield joined[:size]
        rest = joined[size:]
        held, count = ([rest], len(rest)) if len(rest) else ([], 0)


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
    126 long, so neighbours share one frame).

    The tracks are read as they are embedded, ``batch_size`` segments at a time: memory does not grow with
    the number of tracks (a dataset's whole training split, gathered first, needed gigabytes). The batches
    are those of all the segments one after another, so the result is that of embedding them at once."""
    counts = [track_segment_count(cache, track_id, max_segments=max_segments) for track_id in track_ids]
    if min(counts, default=1) == 0:
        short = [track_id for track_id, count in zip(track_ids, counts) if count == 0]
        raise ValueError(f"{len(short)} track(s) shorter than one segment, e.g. {short[:3]}; leave them out")
    means = np.empty((len(counts), int(backbone.embedding_dim)), dtype=np.float32)
    pending = torch.empty(0, int(backbone.embedding_dim))  # embedded segments of tracks not yet averaged
    track = 0
    # Batches of batch_size while the tracks last (the last one shorter), as embed_segments cuts all of them.
    for batch in track_segment_batches(cache, track_ids, max_segments, itertools.repeat(batch_size)):
        pending = torch.cat([pending, embed_segments(backbone, batch, batch_size)])
        while track < len(counts) and counts[track] <= len(pending):
            means[track] = pending[: counts[track]].mean(dim=0).numpy()
            pending = pending[counts[track]:]
            track += 1
    if track != len(counts):  # the cache changed under us: a track gave fewer segments than its length said
        raise RuntimeError(f"{len(counts) - track} track(s) gave fewer segments than their length in the mel cache says")
    return means


def calibrate_batchnorm_on_tracks(backbone: nn.Module, cache: MelCache, track_ids: Sequence[str],
                                  max_segments: int | None, batch_size: int, device: torch.device | None = None) -> int:
    """:func:`calibrate_batchnorm` on the segments of ``track_ids`` (``track_segments`` with ``max_segments``), read
    a batch at a time: the same batches, and so the same statistics, as on all of them gathered first, without
    holding them all (two segments of every training track of a large dataset are gigabytes)."""
    from torch.optim.swa_utils import update_bn

    total = sum(track_segment_count(cache, track_id, max_segments=max_segments) for track_id in track_ids)
    if total < 2:
        raise ValueError(f"need at least 2 segments to measure BatchNorm statistics, got {total}")
    sizes = _split_sizes(total, batch_size)
    update_bn(track_segment_batches(cache, track_ids, max_segments, sizes), backbone, device=device)
    backbone.eval()
    return len(sizes)


def _split_sizes(total: int, batch_size: int) -> list[int]:
    """The sizes of the batches :func:`calibrate_batchnorm` cuts ``total`` segments into: ``torch.tensor_split``'s
    near-equal pieces (the first ``total % pieces`` one larger), ``min(ceil(total / batch_size), total // 2)`` of
    them."""
    pieces = min(math.ceil(total / batch_size), total // 2)
    return [total // pieces + (1 if number < total % pieces else 0) for number in range(pieces)]


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
    batches = torch.tensor_split(segments, len(_split_sizes(len(segments), batch_size)))
    update_bn(batches, backbone, device=device)
    backbone.eval()
    return len(batches)
