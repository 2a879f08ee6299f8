"""Track index, dataset loaders, mel cache and view sampling."""

from musicssl.data.cache import LogMelConfig, MelCache, MelCacheError
from musicssl.data.index import TrackIndex, TrackIndexError
from musicssl.data.loaders import (
    DatasetError, load_folder, load_jamendo, load_msd, load_mtat, open_dataset,
    open_dataset_option,
)
from musicssl.data.views import EpochSampler, ViewConfig, ViewDataset, fixed_segments, track_segments

__all__ = [
    "TrackIndex",
    "TrackIndexError",
    "DatasetError",
    "load_folder",
    "load_jamendo",
    "load_msd",
    "load_mtat",
    "open_dataset",
    "open_dataset_option",
    "LogMelConfig",
    "MelCache",
    "MelCacheError",
    "ViewConfig",
    "ViewDataset",
    "EpochSampler",
    "fixed_segments",
    "track_segments",
]
