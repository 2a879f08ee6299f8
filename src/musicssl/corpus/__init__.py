"""The embedded tagged-music corpus: songs composed with pretty_midi, rendered from a General MIDI
SoundFont, tagged exactly from the factors that generated them.

``python -m musicssl.corpus --tracks N --out DIR`` builds one; :func:`ensure_corpus` returns the
folder of one, building it on first use. See :mod:`musicssl.corpus.tags` for the tag vocabulary.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from musicssl.corpus.build import (
        BuildReport,
        CorpusConfig,
        CorpusError,
        build_corpus,
        cache_dir,
        default_corpus_dir,
        ensure_corpus,
        split_assignment,
    )
    from musicssl.corpus.compose import Song, SongFactors, compose_song, draw_factors
    from musicssl.corpus.tags import TAG_NAMES

# Imported on first use (PEP 562): the package itself loads nothing heavy, so that
# ``python -m musicssl.corpus`` can take over Ctrl-C before numpy, scipy and pretty_midi load.
_HOME = {
    **dict.fromkeys(("BuildReport", "CorpusConfig", "CorpusError", "build_corpus", "cache_dir",
                     "default_corpus_dir", "ensure_corpus", "split_assignment"), "musicssl.corpus.build"),
    **dict.fromkeys(("Song", "SongFactors", "compose_song", "draw_factors"), "musicssl.corpus.compose"),
    "TAG_NAMES": "musicssl.corpus.tags",
}
_SUBMODULES = ("build", "compose", "render", "tags")

if not TYPE_CHECKING:  # to a type checker the names are the imports above, and a typo stays an error

    def __getattr__(name: str):
        if name in _SUBMODULES:  # musicssl.corpus.build and the like, as after an eager import
            return _importlib.import_module(f"{__name__}.{name}")
        if name not in _HOME:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_HOME, *_SUBMODULES})


__all__ = [
    "BuildReport",
    "CorpusConfig",
    "CorpusError",
    "Song",
    "SongFactors",
    "TAG_NAMES",
    "build_corpus",
    "cache_dir",
    "compose_song",
    "default_corpus_dir",
    "draw_factors",
    "ensure_corpus",
    "split_assignment",
]
