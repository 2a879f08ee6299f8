"""The embedded tagged-music corpus: songs composed with pretty_midi, rendered from a General MIDI
SoundFont, tagged exactly from the factors that generated them.

``python -m musicssl.corpus --tracks N --out DIR`` builds one; :func:`ensure_corpus` returns the
folder of one, building it on first use. See :mod:`musicssl.corpus.tags` for the tag vocabulary.
"""

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
