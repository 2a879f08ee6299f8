"""The track index: the one table every dataset loader produces and every consumer reads.

A :class:`TrackIndex` is a list of tracks (id, absolute audio path, split, tags) plus the tag
vocabulary. Tags may carry a group prefix in the MTG-Jamendo style (``instrument---piano``); the
groups are used to report metrics per tag group.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from musicssl.corpus.splits import corpus_identity, listed_as_generated

__all__ = [
    "TrackIndex", "TrackIndexError", "file_identity", "split_tag_cells", "SPLITS", "SPLIT_ALIASES", "TAG_SEPARATOR",
    "GROUP_SEPARATOR", "tag_group",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Other names of the splits that tags files and track indexes use (matched case-insensitively).
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
    "test": "test", "testing": "test",
}
TAG_SEPARATOR = ";"
GROUP_SEPARATOR = "---"
REQUIRED_COLUMNS = ("track_id", "path", "split", "tags")
# A tags file's column whose tracks that share a value share a drawn split (musicssl.data.loaders.load_folder:
# an artist's songs, none of them in train and another in test); kept in the index, read as text.
SPLIT_GROUP_COLUMN = "split_group"
# TrackIndex.extra entry of an index read from a generated corpus's tracks.csv: the corpus's
# generator version, seed, tracks and seconds (musicssl.corpus.splits.corpus_identity).
GENERATED_CORPUS_KEY = "generated_corpus"
# A generated corpus's tracks.csv edited by hand (a track renamed or moved to another split), its corpus.json beside
# it: which songs its tracks are (by track number), though not in the generator's splits.
EDITED_CORPUS_KEY = "edited_generated_corpus"


class TrackIndexError(ValueError):
    """A track index or tags file is malformed; the message says what and how to fix it."""


def file_identity(path: str | Path) -> Any:
    """What tells one file from another: a file with several hard links is its device and inode, any other
    its real path (a symbolic link is the file it names); inode numbers alone are not unique everywhere (0
    where a file system has none, repeated on a network share spanning several file systems). A path that
    does not exist is itself without ``..``."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return os.path.normpath(str(path))
    if status.st_nlink > 1 and status.st_ino != 0:
        return status.st_dev, status.st_ino
    return os.path.realpath(path)


# A tags cell that holds one of these alone is an empty one as R (NA), pandas (nan, None, <NA>) or a spreadsheet
# (#N/A) writes it: read as no tags. pandas' own list of missing values (read_csv's na_values), and None.
MISSING_MARKS = frozenset({"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                           "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def split_tag_cells(cells: Sequence[Any], lines: Sequence[int], source: str | Path,
                    separator: str | None = None, *, index: bool = False) -> list[tuple[str, ...]]:
    """Each cell's tags, stripped of spaces, once each, in order: joined by ``separator`` where given; in a
    ``tracks.csv`` index (``index``), by ``;``; in any other table (a tags file, or a file with an index's four
    columns under another name, read the same way as a file or in its folder), by ``;``, or by ``,`` where no
    cell holds a ``;``. A tag may hold a ``,`` (Discogs' ``Folk, World, & Country``), so a cell with a ``,``
    and no ``;``, read as one tag where ``;`` joins the tags, is named in a warning (``lines``: each cell's
    line in ``source``): a ``,`` there may have been meant to join tags. A cell that holds only a missing value's
    mark (:data:`MISSING_MARKS`: ``NA``, ``nan``, ...) has no tags, with a warning."""
    texts = ["" if cell is None else str(cell) for cell in cells]
    missing = [(line, text.strip()) for line, text in zip(lines, texts) if text.strip() in MISSING_MARKS]
    if missing:  # before: a tag "NA" (R's write.table of an empty cell), which the probes then scored
        logger.warning("%s: %d row(s) hold %s as their tags, a missing value as R, pandas or a spreadsheet writes an "
                       "empty cell: read as no tags (e.g. line %d)", source, len(missing),
                       " or ".join(repr(mark) for mark in dict.fromkeys(text for _, text in missing)), missing[0][0])
        texts = ["" if text.strip() in MISSING_MARKS else text for text in texts]
    if separator is None:
        joined = any(";" in text for text in texts)
        separator = ";" if index or joined else ","
        ambiguous = [(line, text.strip()) for line, text in zip(lines, texts) if "," in text and ";" not in text]
        if separator == ";" and ambiguous:
            logger.warning(
                "%s: %d row(s) hold a ',' and no ';' in their tags, each read as one tag (e.g. line %d: %r), as %s; "
                "if a ',' joins tags there, join them with ';'", source, len(ambiguous), ambiguous[0][0], ambiguous[0][1],
                "other rows join their tags with ';'" if joined else "a tracks.csv joins its tags with ';'")
    return [tuple(dict.fromkeys(tag.strip() for tag in text.split(separator) if tag.strip())) for text in texts]


def tag_group(tag: str) -> str:
    """The group of a tag: the part before ``---`` (``instrument---piano`` -> ``instrument``), else ``all``."""
    return tag.split(GROUP_SEPARATOR, 1)[0] if GROUP_SEPARATOR in tag else "all"


@dataclass
class TrackIndex:
    """Tracks with their audio paths, splits and tags.

    ``tracks`` has at least the columns ``track_id`` (str), ``path`` (str, absolute), ``split`` (one of
    ``train``/``valid``/``test``) and ``tags`` (tuple of str); other columns (duration, generator
    factors) are kept as they are. ``tag_names`` fixes the order of the label columns.
    """

    tracks: pd.DataFrame
    tag_names: list[str]
    name: str = "custom"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [column for column in REQUIRED_COLUMNS if column not in self.tracks.columns]
        if missing:
            raise TrackIndexError(f"track index {self.name!r} lacks column(s) {missing}; needs {list(REQUIRED_COLUMNS)}")
        bad_splits = sorted(set(self.tracks["split"]) - set(SPLITS))
        if bad_splits:
            raise TrackIndexError(f"track index {self.name!r} has unknown split(s) {bad_splits}; use {list(SPLITS)}")
        duplicated = self.tracks["track_id"][self.tracks["track_id"].duplicated()].tolist()
        if duplicated:
            raise TrackIndexError(f"track index {self.name!r} repeats track_id(s) {duplicated[:5]}")
        self.tracks = self.tracks.reset_index(drop=True)
        self.tag_names = list(self.tag_names)
        unknown = sorted({tag for tags in self.tracks["tags"] for tag in tags} - set(self.tag_names))
        if unknown:
            raise TrackIndexError(f"track index {self.name!r} uses tags missing from its vocabulary: {unknown[:10]}")

    @classmethod
    def from_records(
        cls, records: Iterable[dict], tag_names: Sequence[str] | None = None, name: str = "custom"
    ) -> "TrackIndex":
        """Build from dicts with ``track_id, path, split, tags`` (tags: iterable of str)."""
        frame = pd.DataFrame(list(records))
        if frame.empty:
            raise TrackIndexError(f"track index {name!r} is empty: no tracks were found")
        frame["track_id"] = frame["track_id"].astype(str)
        frame["path"] = frame["path"].astype(str)
        frame["tags"] = [tuple(tags) for tags in frame["tags"]]
        if tag_names is None:
            tag_names = sorted({tag for tags in frame["tags"] for tag in tags})
        return cls(frame, list(tag_names), name=name)

    def __len__(self) -> int:
        return len(self.tracks)

    @property
    def paths(self) -> list[str]:
        return self.tracks["path"].tolist()

    @property
    def track_ids(self) -> list[str]:
        return self.tracks["track_id"].tolist()

    @property
    def tag_groups(self) -> dict[str, list[str]]:
        """Tag names by group (prefix before ``---``), in vocabulary order."""
        groups: dict[str, list[str]] = {}
        for tag in self.tag_names:
            groups.setdefault(tag_group(tag), []).append(tag)
        return groups

    def labels(self) -> np.ndarray:
        """Multi-hot labels, shape ``(len(self), len(self.tag_names))``, float32."""
        column = {tag: position for position, tag in enumerate(self.tag_names)}
        labels = np.zeros((len(self), len(self.tag_names)), dtype=np.float32)
        for row, tags in enumerate(self.tracks["tags"]):
            for tag in tags:
                labels[row, column[tag]] = 1.0
        return labels

    def split(self, *names: str) -> "TrackIndex":
        """The tracks of the given split(s), same vocabulary."""
        for split_name in names:
            if split_name not in SPLITS:
                raise TrackIndexError(f"unknown split {split_name!r}; use one of {list(SPLITS)}")
        subset = self.tracks[self.tracks["split"].isin(names)]
        return TrackIndex(subset.copy(), self.tag_names, name=f"{self.name}[{'+'.join(names)}]", extra=self.extra)

    def select(self, positions: Sequence[int] | np.ndarray) -> "TrackIndex":
        """The tracks at the given row positions, same vocabulary."""
        return TrackIndex(self.tracks.iloc[list(positions)].copy(), self.tag_names, name=self.name, extra=self.extra)

    def to_csv(self, path: str | Path) -> None:
        """Write ``tracks.csv``: paths relative to the file's folder where possible, tags joined by ``;``."""
        path = Path(path)
        frame = self.tracks.copy()
        base = path.parent.resolve()
        relative = []
        for track_path in frame["path"]:
            resolved = Path(track_path).resolve()
            try:
                relative.append(str(resolved.relative_to(base)))
            except ValueError:
                relative.append(str(resolved))
        frame["path"] = relative
        frame["tags"] = [TAG_SEPARATOR.join(tags) for tags in frame["tags"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)

    @classmethod
    def from_csv(cls, path: str | Path, name: str | None = None) -> "TrackIndex":
        """Read a ``tracks.csv`` (``track_id, path, split, tags`` with tags joined by ``;``; a file of these
        columns under another name joins them as a tags file does, by ``;``, or by ``,`` where no cell holds a
        ``;``, so that it gives the same tags read in its folder: :func:`split_tag_cells`).

        Relative audio paths are resolved against the CSV's folder. Tags are stripped of surrounding
        spaces (``rock; guitar`` is ``rock`` and ``guitar``), splits may use the other names of
        :data:`SPLIT_ALIASES` (``validation``, ``TEST``, ...). The vocabulary is every tag used.
        """
        path = Path(path)
        if not path.is_file():
            raise TrackIndexError(f"{path}: no such track index; build one with `python -m musicssl.corpus --out DIR`")
        # Spaces after the commas (``track_id, path, ...`` and ``001, a.wav, ...``) are dropped, and the four
        # columns are read as text under their names as written (``001`` stays ``001``, not 1), as is a tags file's
        # split_group, kept by load_folder (groups ``1`` and ``1.0`` stay two).
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            header = next(csv.reader(handle, skipinitialspace=True), [])
        text = {name: str for name in header if name.strip() in (*REQUIRED_COLUMNS, SPLIT_GROUP_COLUMN)}
        try:
            frame = pd.read_csv(path, dtype=text, keep_default_na=False, skipinitialspace=True)
        except pd.errors.EmptyDataError:
            raise TrackIndexError(f"{path}: the file is empty; a track index needs a header "
                                  f"({','.join(REQUIRED_COLUMNS)}) and one row per track") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise TrackIndexError(f"{path}: not a readable CSV track index ({str(error).strip()})") from None
        frame.columns = [str(column).strip() for column in frame.columns]  # ``track_id, path, ...``
        missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
        if missing:
            raise TrackIndexError(
                f"{path}: missing column(s) {missing}; a track index needs {list(REQUIRED_COLUMNS)} "
                f"(found {list(frame.columns)})"
            )
        blank = [line for line, cell in zip(range(2, len(frame) + 2), frame["path"]) if not str(cell).strip()]
        if blank:
            more = f" (and {len(blank) - 1} more)" if len(blank) > 1 else ""
            raise TrackIndexError(f"{path}, line {blank[0]}: empty 'path'{more}; give each track's audio file")
        base = path.parent.resolve()
        # ``~/music/x.wav`` is the user's, as in a tags file (before: read as a folder named ``~`` here).
        listed = [Path(p).expanduser() if str(p).startswith("~") else Path(p) for p in frame["path"]]
        frame["path"] = [str(p) if p.is_absolute() else str(base / p) for p in listed]
        # One file in two rows (also as ``a/../a/x.wav``, or under a link's name) would be two tracks, perhaps one
        # in train and one in test.
        rows_of: dict[Any, tuple[str, list[int]]] = {}
        for line, track_path in zip(range(2, len(frame) + 2), frame["path"]):
            rows_of.setdefault(file_identity(track_path), (os.path.normpath(track_path), []))[1].append(line)
        repeated = [(track_path, lines) for track_path, lines in rows_of.values() if len(lines) > 1]
        if repeated:
            shown = "; ".join(f"{track_path} on lines {', '.join(map(str, lines))}" for track_path, lines in repeated[:3])
            more = f" (and {len(repeated) - 3} more)" if len(repeated) > 3 else ""
            raise TrackIndexError(f"{path}: lists the same audio file more than once: {shown}{more}; "
                                  "keep one row per file")
        frame["tags"] = split_tag_cells(frame["tags"], range(2, len(frame) + 2), path,
                                        index=path.name == "tracks.csv")
        frame["split"] = [SPLIT_ALIASES.get(str(split).strip().lower(), split) for split in frame["split"]]
        tag_names = sorted({tag for tags in frame["tags"] for tag in tags})
        index = cls(frame, tag_names, name=name or path.parent.name)
        # A generated corpus (what decides its songs and splits), unless its tracks.csv was edited: a track
        # renamed or moved to another split is no longer in the split the generator's rule says.
        identity = corpus_identity(path.parent)
        if identity is not None and listed_as_generated(identity, index.track_ids, index.tracks["split"]):
            index.extra[GENERATED_CORPUS_KEY] = identity
        elif identity is not None:
            index.extra[EDITED_CORPUS_KEY] = identity
        return index
