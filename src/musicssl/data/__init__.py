"""Track index, dataset loaders, mel cache and view sampling."""

from musicssl.data.index import TrackIndex, TrackIndexError

__all__ = ["TrackIndex", "TrackIndexError"]
