"""Track index, dataset loaders, mel cache and view sampling."""

from musicssl.data.index import TrackIndex, TrackIndexError
from musicssl.data.loaders import DatasetError, load_folder, load_jamendo, load_msd, load_mtat, open_dataset

__all__ = [
    "TrackIndex",
    "TrackIndexError",
    "DatasetError",
    "load_folder",
    "load_jamendo",
    "load_msd",
    "load_mtat",
    "open_dataset",
]
