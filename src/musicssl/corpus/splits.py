"""Which split each track of a generated corpus is in, under each generator version, and which test
tracks of one corpus a backbone trained on another has seen.

A corpus track's audio is a function of the corpus seed and the track's number. Since generator
version 2 its split is too (:func:`split_assignment`). Version 1 cut one seeded shuffle of all the
track numbers (:func:`split_assignment_version_1`), so its corpora of two sizes from one seed held the
same songs in different splits, and so do a version-1 and a version-2 corpus of one seed: a backbone
trained on one of them, evaluated on the other, has trained on some of the test tracks.
:func:`seen_test_tracks` counts them. Light on purpose (json at import, numpy where a split is drawn):
the track index reads :func:`corpus_identity` for every ``tracks.csv``, and the search's settings import
:data:`VERSION_1_DEFAULT_CORPUS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SPLITS",
    "SPLIT_BLOCK",
    "SPLIT_BLOCK_COUNTS",
    "SPLIT_FRACTIONS",
    "VERSION_1_DEFAULT_CORPUS",
    "describe_corpus",
    "listed_as_generated",
    "corpus_identity",
    "seen_test_tracks",
    "split_assignment",
    "split_assignment_version_1",
    "splits_of",
    "track_number",
]

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = {"train": 0.7, "valid": 0.1, "test": 0.2}
SPLIT_BLOCK = 10  # track numbers per block; each block holds the fractions exactly
SPLIT_BLOCK_COUNTS = {name: round(fraction * SPLIT_BLOCK) for name, fraction in SPLIT_FRACTIONS.items()}
# What a run or search on `corpus` trained on before it recorded its corpus (2026-12-05): generator
# version 1's default corpus, 600 songs of 30 s from seed 0 (every version before 2 was version 1).
VERSION_1_DEFAULT_CORPUS = {"generator_version": 1, "seed": 0, "tracks": 600, "seconds": 30.0}
_SPLIT_STREAM = 0x53504C4954  # "SPLIT": keeps the split's random stream apart from the tracks'
_TRACK_PREFIX = "track"


def split_assignment(tracks: int, seed: int) -> list[str]:
    """The split of each track number, 70/10/20, and a function of ``(seed, number)`` alone.

    Track numbers go in blocks of :data:`SPLIT_BLOCK` (0-9, 10-19, ...); each block is a seeded shuffle
    of 7 train, 1 valid and 2 test places. A track's audio depends only on ``(seed, number)``, so its
    split must too: corpora of two sizes built from one seed then share their tracks' splits, and a
    backbone trained on one never saw a test track of the other. Every block that is whole holds the
    exact fractions; a last partial block holds the first places of its shuffle.
    """
    import numpy as np

    places = [name for name in SPLITS for _ in range(SPLIT_BLOCK_COUNTS[name])]
    splits: list[str] = []
    for block in range(-(-tracks // SPLIT_BLOCK)):
        order = np.random.default_rng([seed, _SPLIT_STREAM, block]).permutation(SPLIT_BLOCK)
        splits.extend(places[int(place)] for place in order)
    return splits[:tracks]


def split_assignment_version_1(tracks: int, seed: int) -> list[str]:
    """Generator version 1's splits: one seeded shuffle of all ``tracks`` numbers cut 70/10/20 (rounded
    counts), so that a track's split depended on the corpus size. Kept to check old checkpoints."""
    import numpy as np

    counts = {name: int(math.floor(tracks * SPLIT_FRACTIONS[name] + 0.5)) for name in ("train", "valid")}
    counts["test"] = tracks - counts["train"] - counts["valid"]
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(tracks)
    splits = [""] * tracks
    position = 0
    for name in SPLITS:
        for number in order[position : position + counts[name]]:
            splits[int(number)] = name
        position += counts[name]
    return splits


def splits_of(identity: Mapping[str, Any]) -> list[str]:
    """The split of each track number of the corpus ``identity`` describes (see :func:`corpus_identity`)."""
    rule = split_assignment_version_1 if identity["generator_version"] == 1 else split_assignment
    return rule(int(identity["tracks"]), int(identity["seed"]))


def track_number(track_id: str) -> int | None:
    """The number in a corpus track id (``track00042`` -> 42); None for another id."""
    digits = track_id[len(_TRACK_PREFIX):] if track_id.startswith(_TRACK_PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def corpus_identity(folder: str | Path) -> dict[str, Any] | None:
    """What decides a generated corpus's songs and splits: ``{"generator_version", "seed", "tracks",
    "seconds"}`` from ``folder/corpus.json``; None when the folder holds no generated corpus (no
    ``corpus.json``, or one that does not say these)."""
    try:
        info = json.loads((Path(folder) / "corpus.json").read_text())
        config = info["config"]
        identity = {"generator_version": int(info["generator_version"]), "seed": int(config["seed"]),
                    "tracks": int(config["tracks"]), "seconds": float(config["seconds"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return identity


def describe_corpus(identity: Mapping[str, Any]) -> str:
    """``generator version 2, seed 0, 600 tracks of 30 s`` (``generator version 1`` where only that is known)."""
    if identity.get("tracks") is None:
        return f"generator version {identity['generator_version']}"
    return (f"generator version {identity['generator_version']}, seed {identity['seed']}, {identity['tracks']} tracks "
            f"of {float(identity['seconds']):g} s")


def listed_as_generated(identity: Mapping[str, Any], track_ids: Iterable[str], splits: Iterable[str]) -> bool:
    """Whether these tracks are the corpus's own, each in the split the generator gave it (a ``tracks.csv``
    that lists fewer of them still is); False once any was renamed or moved to another split by hand."""
    generated = splits_of(identity)
    for track_id, split in zip(track_ids, splits):
        number = track_number(str(track_id))
        if number is None or number >= len(generated) or generated[number] != split:
            return False
    return True


def seen_test_tracks(trained_on: Mapping[str, Any], evaluated_on: Mapping[str, Any], test_ids: Iterable[str]) -> list[str]:
    """The ``test_ids`` of corpus ``evaluated_on`` that were training tracks of corpus ``trained_on``
    (identities as :func:`corpus_identity` gives them): same seed, same track number (the same song;
    a corpus of other ``seconds`` holds the same songs at another length), train split there.
    Empty for corpora of two seeds, which share no song."""
    if int(trained_on["seed"]) != int(evaluated_on["seed"]):
        return []
    training = splits_of(trained_on)
    seen = []
    for track_id in test_ids:
        number = track_number(str(track_id))
        if number is not None and number < len(training) and training[number] == "train":
            seen.append(str(track_id))
    return seen
