"""From a dataset name or path to a built mel cache: the one entry point the trainer, the search and
the downstream evaluation share."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from musicssl.data.cache import LogMelConfig, MelCache
from musicssl.data.index import TrackIndex
from musicssl.paths import cache_root

__all__ = ["PreparedData", "prepare_data", "default_mel_cache_dir", "batch_problem"]


@dataclass
class PreparedData:
    """A track index and the mel cache of its usable tracks, with the split's usable track ids."""

    index: TrackIndex
    cache: MelCache

    def track_ids(self, *splits: str) -> list[str]:
        """Ids of the tracks of ``splits`` that made it into the cache (in index order)."""
        return [track_id for track_id in self.index.split(*splits).track_ids if track_id in self.cache]


def default_mel_cache_dir(index: TrackIndex) -> Path:
    """``$MUSICSSL_CACHE/mels/<name>-<hash of the audio folder>``: one cache per dataset and place.

    The hash is of the folder that holds all of the dataset's audio (the deepest one common to every
    listed path, the tracks dropped for missing or empty audio included), so a file that goes
    missing, comes back or is added there keeps the cache, and the next build decodes only what
    changed. The name is the index's ``extra["mel_cache_name"]`` where its loader sets one (datasets
    whose subsets or splits list the same audio under the same track ids: MTG-Jamendo's share one
    cache), else the index's name. A cache named the earlier ways (the index's name with that hash,
    or with the hash of all the paths, which moved whenever one file came or went) is used while it
    exists and no cache of the current name does.
    """
    def safe(name: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "dataset"

    mels = cache_root() / "mels"
    listed = [os.path.abspath(path) for path in index.paths]
    listed += [os.path.abspath(str(track["path"])) for track in index.extra.get("missing", ())]
    folder = os.path.commonpath([os.path.dirname(path) for path in listed]) if listed else ""
    folder_key = hashlib.sha1(folder.encode()).hexdigest()[:10]
    current = mels / f"{safe(str(index.extra.get('mel_cache_name') or index.name))}-{folder_key}"
    # (The low-quality MTG-Jamendo copies had the same earlier name as the full ones, with the same
    # track ids: a cache of that name may hold either, so they do not fall back to it.)
    earlier = [] if index.extra.get("low_quality") else [mels / f"{safe(index.name)}-{folder_key}"]
    earlier.append(mels / f"{safe(index.name)}-{hashlib.sha1(chr(10).join(sorted(index.paths)).encode()).hexdigest()[:10]}")
    if not current.is_dir():
        for candidate in earlier:
            if candidate.is_dir():
                return candidate
    return current


def batch_problem(index: TrackIndex, batch_size: int) -> str | None:
    """Why ``index`` cannot fill a training batch of ``batch_size`` (its listed training tracks; the
    usable ones, known once the cache is built, can only be fewer), or None."""
    listed = len(index.split("train"))
    if listed == 0:  # no batch size helps (before: "lists 0 training tracks ...; lower --batch-size")
        splits = sorted({str(split) for split in index.tracks["split"]})
        return (f"lists no training tracks (its splits: {', '.join(splits) or 'none'}); training uses the tracks "
                "whose split is train: mark some so in its split column")
    if listed < batch_size:
        return f"lists {listed} training tracks, fewer than the batch size {batch_size}"
    return None


def prepare_data(
    data: str | Path | TrackIndex = "corpus",
    front_end: LogMelConfig | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    verbose: bool = True,
    root: str | Path | None = None,
    audio_dir: str | Path | None = None,
    check_index: Callable[[TrackIndex], None] | None = None,
) -> PreparedData:
    """Open the dataset (``corpus`` builds the embedded corpus if missing) and build its mel cache.

    ``data`` is a name understood by :func:`musicssl.data.loaders.open_dataset`, a path to a
    ``tracks.csv`` or a folder, or a ready :class:`TrackIndex`; ``root`` and ``audio_dir`` are the
    named datasets' folders (:func:`~musicssl.data.loaders.open_dataset_option`, the ``--root`` and
    ``--audio-dir`` of the command lines). The cache build is incremental, so calling this again
    costs only the check. ``check_index`` is called with the index before the cache is built, so a
    caller can refuse data that cannot do (too few tracks for its batch) before minutes of decoding.
    """
    from musicssl.data.loaders import open_dataset_option, split_groups_line

    if isinstance(data, TrackIndex):
        if root is not None or audio_dir is not None:
            raise ValueError("root and audio_dir apply to a dataset name, not to a ready TrackIndex")
        index = data
    else:
        # Training is self-supervised: a folder of audio without a tags file, or a table without tags, is used
        # without tags.
        index = open_dataset_option(str(data), root, audio_dir, allow_unlabeled=True)
    if check_index is not None:
        check_index(index)
    groups = split_groups_line(index)
    if groups and verbose:  # (the other ways of splitting are the data's own, or the documented default)
        print(f"data: {groups}", flush=True)
    front_end = front_end or LogMelConfig()
    directory = Path(cache_dir) if cache_dir is not None else default_mel_cache_dir(index)
    cache = MelCache.build(index, directory, front_end, workers=workers, progress=verbose, verbose=verbose,
                           dropped=index.extra.get("missing", ()))
    return PreparedData(index=index, cache=cache)
