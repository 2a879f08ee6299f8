"""Dataset loaders: read a dataset's own annotation files and return a :class:`TrackIndex`.

Every loader returns absolute audio paths, the splits ``train``/``valid``/``test`` and tag tuples
(with a ``group---`` prefix where the dataset has one, as MTG-Jamendo does). None of them decodes
audio; with ``check_audio=True`` (the default) they drop tracks whose audio file is missing or empty,
log how many, and list them in ``index.extra["missing"]`` as dicts with ``track_id``, ``path``,
``split`` and ``reason``. When no track is left they raise :class:`DatasetError` saying where the
audio was expected.

- :func:`load_folder`: your own folder of audio plus a CSV/TSV of tags.
- :func:`load_mtat`: MagnaTagATune, top-50 tags, the standard split (Won et al.).
- :func:`load_jamendo`: MTG-Jamendo autotagging splits (top50, instrument, moodtheme, genre).
- :func:`load_msd`: Million Song Dataset top-50 (Won et al. split; pickles, loaded restrictively).
- :func:`open_dataset`: one entry point by name or path.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
import math
import os
import pickle
import re
import stat
import unicodedata
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from musicssl.audio import CONVERT_HINT, UNSUPPORTED_AUDIO_EXTENSIONS
from musicssl.data.index import (
    SPLIT_ALIASES, SPLIT_GROUP_COLUMN, TrackIndex, TrackIndexError, file_identity, split_tag_cells,
)

__all__ = [
    "read_audio_alone",
    "AUDIO_EXTENSIONS",
    "DATASET_NAMES",
    "DatasetError",
    "JAMENDO_SUBSETS",
    "MSD_AUDIO_PATTERN",
    "MSD_TRAIN_SIZE",
    "MTAT_SPLIT_BY_FOLDER",
    "assign_splits",
    "load_folder",
    "load_jamendo",
    "load_msd",
    "load_mtat",
    "open_dataset",
    "open_dataset_option",
    "canonical_dataset_spec",
    "check_dataset_option",
    "dataset_name",
    "folder_table",
    "split_by_groups",
    "split_groups_line",
    "split_position",
]

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff")

# A table in these formats named like a tags file (labels.txt, tags.xlsx) is refused rather than ignored;
# other files so named (metadata.json from a downloader, a track named tags.wav) are not tables of tags.
UNREAD_TABLE_SUFFIXES = (".txt", ".tab", ".dat", ".xls", ".xlsx", ".ods")
# Tag files load_folder looks for when none is named, in this order.
DEFAULT_TAG_FILES = (
    "tags.csv", "tags.tsv", "labels.csv", "labels.tsv", "annotations.csv", "annotations.tsv",
    "metadata.csv", "metadata.tsv",
)
# The split_rule of a folder whose splits its tags file's split_group column drew (split_by_groups).
_GROUPED_RULE = f"assign_splits by {SPLIT_GROUP_COLUMN}"
# Columns load_folder keeps as per-track metadata rather than reading them as tags.
METADATA_COLUMNS = ("duration", "artist", "artist_id", "album", "album_id", "title")
BINARY_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}

# MagnaTagATune: the audio folder (first character of mp3_path) decides the split (Won et al. 2020).
MTAT_SPLIT_BY_FOLDER = {
    **{folder: "train" for folder in "0123456789ab"},
    "c": "valid",
    **{folder: "test" for folder in "def"},
}
MTAT_ANNOTATIONS = "annotations_final.csv"

# MTG-Jamendo subset names (ours -> the one in the split file names).
JAMENDO_SUBSETS = {
    "top50": "top50tags",
    "top50tags": "top50tags",
    "instrument": "instrument",
    "moodtheme": "moodtheme",
    "genre": "genre",
}
JAMENDO_HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")
JAMENDO_SPLIT_FILES = (("train", "train"), ("validation", "valid"), ("test", "test"))

# MSD top-50 (Won et al.): the first 201,680 ids of filtered_list_train.cP are train, the rest valid.
MSD_TRAIN_SIZE = 201_680
# MSD's own layout: the 3rd, 4th and 5th characters of the id name the folders
# (TRBCDEF128F1234567 -> B/C/D/TRBCDEF128F1234567.mp3), as in Won et al.'s loader.
MSD_AUDIO_PATTERN = "{id[2]}/{id[3]}/{id[4]}/{id}.mp3"
MSD_FILES = {
    "train": "filtered_list_train.cP",
    "test": "filtered_list_test.cP",
    "tags": "msd_id_to_tag_vector.cP",
    "tag_names": "50tagList.txt",
}
# The 7digital preview clips, the audio most MSD users have ("8/9/8947470.clip.mp3"), and the two
# dictionaries of the same split folder that find a track's clip: MSD id -> 7digital id -> path.
MSD_7DIGITAL = "7digital"
MSD_7DIGITAL_FILES = ("MSD_id_to_7D_id.pkl", "7D_id_to_path.pkl")

DATASET_NAMES = (
    "corpus", "mtat", "jamendo-top50", "jamendo-instrument", "jamendo-mood", "jamendo-genre", "msd",
)
_JAMENDO_NAMES = {
    "jamendo-top50": "top50",
    "jamendo-instrument": "instrument",
    "jamendo-mood": "moodtheme",
    "jamendo-genre": "genre",
}
# ``jamendo-top50`` is split 0 of MTG-Jamendo's five; ``jamendo-top50-split3`` names split 3, and a
# ``-low`` suffix (``jamendo-top50-low``, ``jamendo-top50-split3-low``) the ``.low.mp3`` copies.
_JAMENDO_SPLIT = re.compile(r"^(jamendo-(?:top50|instrument|mood|genre))(?:-split(\d+))?(-low)?$")
# MTG-Jamendo's own split files and folders (data/splits/split-0/autotagging_top50tags-train.tsv).
_JAMENDO_SPLIT_FILE = re.compile(r"^autotagging_\w+-(train|validation|test)\.tsv$")
_JAMENDO_SPLIT_DIR = re.compile(r"^split-\d+$")
# What a dataset given as a file may be: a table, read by _read_table (.tab as TSV, the others by their header).
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt")


def dataset_name(spec: str | Path) -> str | None:
    """The named dataset that ``spec`` names (case-insensitive; ``jamendo-top50-split3`` and
    ``jamendo-top50-low`` name ``jamendo-top50``), or None when ``spec`` is a path."""
    key = str(spec).strip().lower()
    if key in DATASET_NAMES:
        return key
    match = _JAMENDO_SPLIT.match(key)
    return match.group(1) if match else None


def canonical_dataset_spec(spec: str | Path) -> str:
    """One spelling per dataset: a named dataset lower-cased, its split 0 by the bare name
    (``Jamendo-Top50-Split0`` is ``jamendo-top50``, ``jamendo-top50-split0-low`` is
    ``jamendo-top50-low``); a path as given."""
    name = dataset_name(spec)
    if name is None:
        return str(spec)
    match = _JAMENDO_SPLIT.match(str(spec).strip().lower())
    if match is None:
        return name
    split = match.group(2)
    return name + (f"-split{int(split)}" if split and int(split) != 0 else "") + (match.group(3) or "")


class DatasetError(ValueError):
    """A dataset's files are missing or malformed; the message says what was expected and how to fix it."""


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _audio_state(path: str) -> str | None:
    """``None`` when ``path`` is a non-empty regular file, else why not (``missing``, ``unreadable``, ``a folder``
    or ``empty``)."""
    try:
        status = os.stat(path)
    except PermissionError:  # a folder on the way that may not be entered
        return "unreadable"
    except OSError:
        return "missing"
    if stat.S_ISDIR(status.st_mode):
        return "a folder"
    if not stat.S_ISREG(status.st_mode):
        return "missing"
    return "empty" if status.st_size == 0 else None


def _drop_missing_audio(records: list[dict], dataset: str, hint: str) -> tuple[list[dict], list[dict]]:
    """Split records into those whose audio file exists (non-empty) and a report of the others."""
    kept: list[dict] = []
    missing: list[dict] = []
    for record in records:
        reason = record.pop("_unresolved", None) or _audio_state(record["path"])
        if reason is None:
            kept.append(record)
        else:
            missing.append(
                {"track_id": record["track_id"], "path": record["path"], "split": record["split"], "reason": reason}
            )
    if not kept:
        first = missing[0]["path"] if missing else "(no tracks listed)"
        raise DatasetError(
            f"{dataset}: none of the {len(missing)} listed audio files exists or is non-empty "
            f"(the first was expected at {first}); {hint}"
        )
    if missing:
        reasons = pd.Series([entry["reason"] for entry in missing]).value_counts().to_dict()
        logger.warning(
            "%s: dropped %d of %d tracks whose audio file is unusable (%s), e.g. %s; "
            "each is listed, with its reason, in the mel cache's skipped.csv (in Python: index.extra['missing'])",
            dataset, len(missing), len(records), ", ".join(f"{count} {reason}" for reason, count in reasons.items()),
            missing[0]["path"],
        )
    return kept, missing


def _build_index(
    records: list[dict],
    tag_names: Sequence[str] | None,
    name: str,
    extra: dict,
    check_audio: bool,
    audio_hint: str,
    said_as: str | None = None,
) -> TrackIndex:
    """Apply the audio check, then build the index with the report in ``extra``. ``said_as``: the dataset's
    name in what this says, where it is not the index's ``name``."""
    said_as = said_as or name
    if not records:
        raise DatasetError(f"{said_as}: no tracks were listed")
    missing: list[dict] = []
    if check_audio:
        records, missing = _drop_missing_audio(records, said_as, audio_hint)
    else:
        unresolved = [record for record in records if record.get("_unresolved")]
        if unresolved:
            raise DatasetError(
                f"{said_as}: no audio file found for track(s) {[r['track_id'] for r in unresolved[:5]]}; "
                "add them or load with check_audio=True to drop them"
            )
    try:
        index = TrackIndex.from_records(records, tag_names=tag_names, name=name)
    except TrackIndexError as error:  # e.g. a track listed in two splits: report it as a dataset problem
        raise DatasetError(f"{name}: {error}") from error
    index.extra = {**extra, "audio_checked": check_audio, "missing": missing}
    return index


def _tags_from_matrix(matrix: np.ndarray, tag_names: Sequence[str]) -> list[tuple[str, ...]]:
    """The tags of each row of a 0/1 matrix, in vocabulary order (one np.nonzero for all rows)."""
    per_row: list[list[str]] = [[] for _ in range(matrix.shape[0])]
    rows, columns = np.nonzero(matrix)
    for row, column in zip(rows.tolist(), columns.tolist()):
        per_row[row].append(tag_names[column])
    return [tuple(tags) for tags in per_row]


def _ordered_unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def split_position(track_id: str, seed: int = 0) -> float:
    """Where a track falls in [0, 1) for :func:`assign_splits`: a function of ``(track_id, seed)`` only.

    The first 8 bytes of SHA-256 of ``f"{seed}:{track_id}"`` (UTF-8), big-endian, top 53 bits over
    ``2**53``. The same in every process and Python version (unlike ``hash``, which is salted).
    """
    digest = hashlib.sha256(f"{int(seed)}:{track_id}".encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) * 2.0**-53


def assign_splits(
    track_ids: Sequence[str], fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0,
    *, what: str = "tracks",
) -> dict[str, str]:
    """Deterministic train/valid/test assignment: ``{track_id: split}``.

    Each track's split is a function of its own id, ``seed`` and ``fractions`` only: with
    ``u = split_position(track_id, seed)``, it is ``train`` if ``u < fractions[0]``, ``valid`` if
    ``u < fractions[0] + fractions[1]``, else ``test``. So adding or removing tracks (or dropping one
    whose audio is missing) never moves another track between splits, and the order of the ids does
    not matter. The fractions hold in expectation, not exactly: each split's count is binomial (of
    1,000 tracks, valid gets 100 +- 9.5 at one standard deviation), and a handful of tracks can leave
    a split empty, which is logged as a warning (``what`` names the ids there: ``tracks``, ``groups``).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DatasetError(f"split fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
    train_end = fractions[0]
    valid_end = fractions[0] + fractions[1]
    splits = {}
    for track_id in track_ids:
        position = split_position(track_id, seed)
        splits[track_id] = "train" if position < train_end else ("valid" if position < valid_end else "test")
    counts = Counter(splits.values())
    empty = [name for name, fraction in zip(("train", "valid", "test"), fractions) if fraction > 0 and not counts[name]]
    if splits and empty:
        logger.warning(
            "assign_splits: none of the %d %s fell in split(s) %s (fractions %s, seed %d); a split drawn for "
            "each keeps splits stable as tracks come and go, at the price of exact counts on small sets",
            len(splits), what, empty, tuple(fractions), seed,
        )
    return splits


# --------------------------------------------------------------------------------------------------
# A folder of audio plus a tags file


def _files_under(root: Path, unreadable: list[OSError] | None = None) -> Iterator[Path]:
    """Every file under ``root``, following symbolic links to folders (audio linked into a dataset's
    folder is common on shared machines; ``Path.rglob`` does not follow them), each folder once. The
    folders it cannot read are added to ``unreadable``, where given."""
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True,
                                             onerror=None if unreadable is None else unreadable.append):
        try:
            status = os.stat(folder)
        except OSError:
            subfolders[:] = []
            continue
        if (status.st_dev, status.st_ino) in seen:  # a link back up the tree, or a second link to one folder
            subfolders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        subfolders.sort()
        for name in files:
            yield Path(folder) / name


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a name's undecodable bytes, which Python keeps as lone surrogates
        return False
    return True


def _regular_file(path: Path, unreadable: list[OSError]) -> bool:
    try:
        return path.is_file()
    except OSError as error:  # a folder that can be listed but not entered (no x permission)
        unreadable.append(error)
        return False


def _list_audio_files(root: Path, other_formats: list[Path] | None = None) -> list[Path]:
    """The audio files under ``root``, in path order; files of audio formats that are not read here (an .m4a) are
    added to ``other_formats``, where given."""
    unreadable: list[OSError] = []
    found = []
    for path in _files_under(root, unreadable):
        suffix = path.suffix.lower()
        if path.name.startswith(".") or suffix not in (*AUDIO_EXTENSIONS, *UNSUPPORTED_AUDIO_EXTENSIONS):
            continue
        if suffix in AUDIO_EXTENSIONS:
            if _regular_file(path, unreadable):
                found.append(path)
        elif other_formats is not None:
            other_formats.append(path)
    found.sort()
    # A file system's own lost+found (root's, at a mount point) is no folder of the user's to warn of.
    unreadable = [error for error in unreadable if Path(str(error.filename)).name != "lost+found"]
    # A name that is not UTF-8 (files from an old zip archive: Latin-1 bytes) is no track id, and no line of a
    # CSV or a log: such files are left out by name (before, the first one ended the whole run).
    not_utf8 = [path for path in found if not _utf8(path.relative_to(root).as_posix())]
    if not_utf8:
        found = [path for path in found if _utf8(path.relative_to(root).as_posix())]
        logger.warning("%s: %d audio file(s) whose names are not UTF-8 were left out, e.g. %s; rename them to UTF-8 "
                       "(e.g. convmv -f latin1 -t utf8 -r --notest FOLDER)", root, len(not_utf8),
                       os.fsencode(not_utf8[0].relative_to(root)).decode("ascii", "backslashreplace"))
    if unreadable:  # before: left out without a word (os.walk passes over a folder it cannot list)
        first = unreadable[0]
        folders = {os.path.dirname(str(error.filename)) if error.filename and not os.path.isdir(str(error.filename))
                   else str(error.filename) for error in unreadable}
        logger.warning("%s: %d folder(s) could not be read and were left out, e.g. %s (%s)%s", root, len(folders),
                       min(folders), first.strerror or first,
                       "; make them readable (chmod a+rx)" if isinstance(first, PermissionError) else "")
    return found


def _find_tags_file(root: Path) -> Path | None:
    named = [root / name for name in DEFAULT_TAG_FILES if (root / name).is_file()]
    if len(named) > 1:
        raise DatasetError(
            f"{root}: several tag files found ({[p.name for p in named]}); pass the one to use as tags_file= "
            "(on the command lines: give its path as the dataset)"
        )
    if named:
        return named[0]
    tables = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".tsv"))
    if len(tables) == 1:
        return tables[0]
    if len(tables) > 1:
        raise DatasetError(
            f"{root}: several CSV/TSV files found ({[p.name for p in tables]}) and none is named "
            f"{list(DEFAULT_TAG_FILES)}; pass the tags file as tags_file= (on the command lines: give its path "
            "as the dataset)"
        )
    return None


def _check_utf8(path: Path) -> None:
    """DatasetError naming the line and the fix where ``path`` is not UTF-8 text (a spreadsheet's CSV saved
    in Windows-1252 or Latin-1: before, only the decoder's "can't decode byte 0xe9 in position 31")."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the file ({error.strerror or error})") from None
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # a byte-order mark: "Unicode text" as Windows saves it
            raise DatasetError(f"{path}: is UTF-16 text, not UTF-8; save the file as UTF-8 (a spreadsheet's \"CSV "
                               "UTF-8\", or iconv -f utf-16 -t utf-8 FILE > NEW)") from None
        raise DatasetError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8 (a "
            "spreadsheet's \"CSV UTF-8\", or iconv -f cp1252 -t utf-8 FILE > NEW)") from None


def _read_table(path: Path) -> pd.DataFrame:
    """Read a CSV (comma) or TSV (tab) of strings.

    ``.tsv``/``.tab`` files are read with tabs; any other file, ``.csv`` included, with tabs when its
    header row has more tabs than commas (MagnaTagATune's ``annotations_final.csv`` is tab-separated),
    with semicolons when it has semicolons and neither tabs nor commas (a spreadsheet's CSV in locales
    whose decimal mark is a comma), else with commas.
    """
    _check_utf8(path)
    if path.suffix.lower() in (".tsv", ".tab"):
        separator = "\t"
    else:
        with path.open(encoding="utf-8-sig") as handle:
            header = handle.readline()
        separator = "\t" if header.count("\t") > header.count(",") else ","
        if ";" in header and "\t" not in header and "," not in header:
            separator = ";"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        names = [str(name).strip() for name in next(csv.reader(handle, delimiter=separator), [])]
    repeated = [name for name, count in Counter(names).items() if count > 1 and name]
    if repeated:  # before: pandas renamed the second 'rock' 'rock.1', a tag of its own
        columns = [number for number, name in enumerate(names, start=1) if name == repeated[0]]
        raise DatasetError(f"{path}: the header names the column {repeated[0]!r} more than once (columns "
                           f"{', '.join(map(str, columns))}); name each column once: merge the repeated ones or "
                           "rename them")
    starts, row_names = _scan_rows(path, separator)
    try:
        with warnings.catch_warnings():
            # index_col=False: a row with more cells than the header (empty ones: _scan_rows) keeps
            # its columns; pandas would otherwise take its first cells for an index and shift the rest.
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            frame = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                                index_col=0 if row_names else False)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        kind = {"\t": "TSV", ",": "CSV", ";": "semicolon-separated"}[separator]
        raise DatasetError(f"{path}: cannot read as a {kind} table ({error})") from None
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: the file is empty; it needs a header row and one row per track") from None
    frame.columns = [str(column).strip() for column in frame.columns]
    # Should the two readers find another number of rows (a file they parse differently), the rows are
    # numbered as if every line held one.
    lines = starts if starts is not None and len(starts) == len(frame) else range(2, len(frame) + 2)
    frame.index = pd.Index(lines, name="line")
    return frame


def _scan_rows(path: Path, separator: str) -> tuple[list[int] | None, bool]:
    """One pass of Python's CSV reader over the table: the line on which each data row begins, and
    whether the rows are numbered first.

    Lines: blank and whitespace-only lines, which the table skips, are counted, and so are the lines
    of a quoted cell that spans several (None when the reader cannot parse the file; pandas then says
    why). Numbered rows: every row has one cell more than the header, first, numbering the rows
    1, 2, ... (as R's ``write.table`` writes them), or the header's first cell is empty over a column that
    numbers them so (R's ``write.csv``): the table is read with that column as its index.
    Otherwise a row with more non-empty cells than the header has columns is an error that names its
    line; empty cells past the header's, as a trailing separator leaves, are dropped.
    """
    names = {"\t": "tab", ",": "comma", ";": "semicolon"}
    header: list[str] | None = None
    starts: list[int] = []
    first_cells: list[str] = []
    longer: list[tuple[int, list[str]]] = []  # (line, cells) of the rows with cells past the header's
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=separator)
            previous_end = 0
            for record in reader:
                line, previous_end = previous_end + 1, reader.line_num
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if header is None:
                    header = record
                    continue
                starts.append(line)
                first_cells.append(record[0].strip())
                if len(record) > len(header):
                    longer.append((line, record))
    except (csv.Error, UnicodeDecodeError):
        return None, False
    if header is None:
        return starts, False
    numbers = [str(number) for number in range(1, len(starts) + 1)]
    if starts and len(longer) == len(starts) and all(len(cells) == len(header) + 1 for _, cells in longer) \
            and [cells[0].strip() for _, cells in longer] == numbers:
        return starts, True
    if starts and not longer and len(header) > 1 and not header[0].strip() and first_cells == numbers:
        return starts, True  # R's write.csv: the row numbers' column is in the header, unnamed ("")
    for line, cells in longer:
        if any(cell.strip() for cell in cells[len(header):]):
            raise DatasetError(
                f"{path}, line {line}: {len(cells)} {names[separator]}-separated cells, but the header has "
                f"{len(header)} ({', '.join(repr(name.strip()) for name in header)}); quote cells that hold a "
                f"{names[separator]} (\"rock{separator}pop\"), or add the missing column to the header"
            )
    return starts, False


def _binary_column(values: pd.Series) -> np.ndarray | None:
    """The column as 0/1 integers, or ``None`` if any value is not 0/1."""
    mapped = [BINARY_VALUES.get(str(value).strip().lower()) for value in values]
    if any(value is None for value in mapped):
        return None
    return np.asarray(mapped, dtype=np.int8)


def load_folder(
    root: str | Path,
    tags_file: str | Path | None = None,
    *,
    unlabeled: bool = False,
    tags_optional: bool = False,
    tag_separator: str | None = None,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    split_seed: int = 0,
    split_groups: bool = True,
    keep_columns: Sequence[str] = (),
    check_audio: bool = True,
    name: str | None = None,
) -> TrackIndex:
    """Index a folder of audio files described by a CSV or TSV of tags.

    The tags file (``tags_file``, else ``tags.csv``/``tags.tsv``/``labels.*``/``annotations.*``/
    ``metadata.*`` in ``root``, else the only CSV/TSV there; commas, tabs or semicolons, see
    :func:`_read_table`) has a header row and one row per track:

    - the audio: a ``path`` or ``filename`` column (relative to ``root``, or absolute, also outside
      ``root``), or only a ``track_id`` column, matched to the audio file whose path relative to
      ``root`` without extension, or else whose file name without extension, equals it (names match
      whatever their Unicode normalisation: macOS writes them decomposed, NFD);
    - the tags: a ``tags`` column (tags joined by ``;``, or by ``,`` when no cell contains ``;``;
      ``tag_separator`` overrides), OR one column of 0/1 per tag (the column name is the tag);
    - optionally ``split`` (``train``/``valid``/``test``; ``validation``, ``val``, ``dev``,
      ``training``, ``testing`` accepted), else a deterministic split by :func:`assign_splits` with
      ``split_fractions`` and ``split_seed``;
    - optionally ``split_group`` instead of ``split``: tracks that share its value (an artist, an album) share
      the split drawn for it, so that no group has tracks in train and in test; a track whose cell is empty
      keeps the split it has without the column, unless a copy of it names a group
      (:func:`_share_groups_among_copies`). With ``split_groups=False`` the column is kept but not used (the
      splits of a run that read the table before it had one);
    - optionally metadata kept as columns: ``duration``, ``artist``, ``artist_id``, ``album``,
      ``album_id``, ``title`` and any named in ``keep_columns``.

    Track ids are the ``track_id`` column, else the audio path relative to ``root`` without its
    extension, in Unicode NFC (with it for files that differ only in their extension, which then share the split
    drawn for the id without it). A drawn split depends on the track's id and ``split_seed`` only, so tracks added to
    or removed from the folder, or dropped for missing audio, never move other tracks between
    splits. With ``unlabeled=True`` no tags file is read: every audio file under ``root`` is a
    track with no tags (enough for self-supervised pre-training). With ``tags_optional=True`` a tags
    file may have no tag columns: its tracks, ids and splits are indexed with no tags (the index's
    ``extra["unlabeled"]`` is then True).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; pass the folder that holds your audio files")
    if not root.is_dir():
        raise DatasetError(
            f"{root}: is a file, not a folder; pass the folder that holds the audio "
            f"(and this file as tags_file=)"
        )
    root = root.resolve()
    if not _utf8(str(root)):
        raise DatasetError(f"{os.fsencode(root).decode('ascii', 'backslashreplace')}: the folder's path is not UTF-8 "
                           "(Latin-1 bytes from an old archive?); rename it in UTF-8 (e.g. convmv -f latin1 -t utf8)")
    if not any(root.iterdir()):
        raise DatasetError(
            f"{root}: the folder is empty; put audio files ({', '.join(AUDIO_EXTENSIONS)}) and a tags CSV/TSV in it"
        )
    other_formats: list[Path] = []
    audio_files = _list_audio_files(root, other_formats)

    def no_audio(fix: str = "add audio files or point root at their folder") -> DatasetError:
        others = sorted(p.relative_to(root).as_posix() for p in _files_under(root) if p.is_file())
        formats = (f"; {', '.join(sorted({p.suffix.lower() for p in other_formats}))} files are not read here: "
                   f"{CONVERT_HINT}" if other_formats else f"; {fix}")
        return DatasetError(
            f"{root}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)} in it and its subfolders; "
            f"found {len(others)} other file(s) such as {others[:3]}){formats}"
        )

    # A tags file may list audio elsewhere by absolute paths: without audio here, its paths decide (below).
    if not audio_files and (unlabeled or (tags_file is None and _find_tags_file(root) is None)):
        raise no_audio()
    name = name or root.name
    audio_hint = f"check that the paths in the tags file are relative to {root}"

    if unlabeled:
        if tags_file is not None:
            raise DatasetError("pass either tags_file= or unlabeled=True, not both")
        if other_formats:  # before: left out without a word (a collection of .m4a files lost most of its tracks)
            counts = Counter(path.suffix.lower() for path in other_formats)
            by_format = ", ".join(f"{suffix}: {count}" for suffix, count in sorted(counts.items()))
            logger.warning("%s: %d audio file(s) in formats not read here were left out (%s), e.g. %s; %s", root,
                           len(other_formats), by_format, min(other_formats).relative_to(root).as_posix(),
                           CONVERT_HINT)
        # One file under two names (a link: a song linked into a second genre's folder) is one track, not two
        # that could fall in train and in test: the name that is no link is kept (else the first in path order).
        names: dict[Any, list[Path]] = {}
        for path in audio_files:
            names.setdefault(file_identity(path), []).append(path)
        def no_link(paths: list[Path]) -> Path:
            return min(paths, key=lambda path: (os.path.realpath(path) != str(path), str(path)))

        kept = {key: paths[0] if len(paths) == 1 else no_link(paths) for key, paths in names.items()}
        linked = [(path, kept[key]) for key, paths in names.items() for path in paths if path != kept[key]]
        if linked:
            logger.warning("%s: %d audio file(s) are other names (links) of files already indexed and were left out, "
                           "e.g. %s is %s", name, len(linked), linked[0][0].relative_to(root).as_posix(),
                           linked[0][1].relative_to(root).as_posix())
            audio_files = sorted(kept.values())
        records = [{"track_id": _nfc(path.relative_to(root).with_suffix("").as_posix()), "path": str(path), "tags": ()}
                   for path in audio_files]
        _keep_extensions_that_tell_files_apart(records)
        _raise_on_duplicate_ids([record["track_id"] for record in records], root)
        splits = assign_splits([_split_key(record) for record in records], split_fractions, split_seed)
        records = [{"track_id": record["track_id"], "path": record["path"], "split": splits[_split_key(record)],
                    "tags": ()} for record in records]
        extra = {"source": str(root), "split_rule": "assign_splits", "split_seed": split_seed}
        return _build_index(records, [], name, extra, check_audio, audio_hint)

    if tags_file is None:
        tags_path = _find_tags_file(root)
        if tags_path is None:
            raise DatasetError(
                f"{root}: no tags file found (looked for {list(DEFAULT_TAG_FILES)} or a single *.csv/*.tsv); "
                "pass tags_file=PATH, or unlabeled=True to index the audio without tags"
            )
    else:
        tags_path = Path(tags_file).expanduser()
        if not tags_path.is_absolute() and not tags_path.exists() and (root / tags_path).exists():
            tags_path = root / tags_path
        if not tags_path.is_file():
            raise DatasetError(f"{tags_path}: no such tags file; pass the CSV/TSV that lists your tracks and tags")
    table = _read_table(tags_path)
    if table.empty:
        raise DatasetError(f"{tags_path}: has a header but no rows; add one row per track")
    records, tag_names, split_given, grouped = _records_from_table(
        table, tags_path, root, audio_files, tag_separator, keep_columns, tags_optional, other_formats
    )
    if not audio_files and all(
        record.get("_unresolved")
        or (_audio_state(record["path"]) == "missing" and Path(os.path.normpath(record["path"])).is_relative_to(root))
        for record in records
    ):
        # (a listed file elsewhere that is missing is reported with its path, below)
        raise no_audio(f"the paths {tags_path.name} lists are read relative to the folder it is in: put it in the "
                       "folder that holds the audio (with its paths relative to that folder), or list absolute paths")
    names_of: dict[Any, list[str]] = {}
    for record in records:  # one file under two names (a link) too: its two rows could fall in train and in test
        names_of.setdefault(file_identity(record["path"]), []).append(record["path"])
    repeated = sorted(names for names in names_of.values() if len(names) > 1)
    if repeated:
        def shown(path: str) -> str:
            return Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else path

        listed = [" and ".join(dict.fromkeys(shown(path) for path in names)) for names in repeated[:5]]
        raise DatasetError(f"{tags_path}: lists the audio file(s) {listed} more than once (under one name, or under "
                           "two that name one file, a link); keep one row per file, its tags joined in one cell")
    _raise_on_duplicate_ids([record["track_id"] for record in records], tags_path)
    if os.sep == "/" and any("\\" in record["path"] and _audio_state(record["path"]) == "missing"
                             for record in records):
        audio_hint += "; paths must separate folders with '/', not '\\' (as Windows writes them)"
    grouped = grouped and split_groups
    if grouped and not split_given:
        _share_groups_among_copies(records, tags_path)
    if not split_given:
        keys = [_group_key(record) if grouped else _split_key(record) for record in records]
        splits = assign_splits(keys, split_fractions, split_seed, what="groups" if grouped and any(
            record[SPLIT_GROUP_COLUMN] for record in records) else "tracks")
        for record, key in zip(records, keys):
            record["split"] = splits[key]
        if grouped:
            _report_groups(records, tags_path, split_fractions)
    for record in records:
        record.pop("split_key", None)
    listed = {record["path"] for record in records}
    unlisted = [str(path) for path in audio_files if str(path) not in listed]
    if unlisted:
        examples = [Path(path).relative_to(root).as_posix() for path in unlisted[:3]]
        logger.warning("%s: %d audio file(s) under %s are not in %s and were left out, e.g. %s", name, len(unlisted),
                       root, tags_path.name, examples)
    extra = {
        "source": str(tags_path),
        "split_rule": "split column" if split_given else _GROUPED_RULE if grouped else "assign_splits",
        "unlisted_audio": len(unlisted),
    }
    if not split_given:
        extra["split_seed"] = split_seed
    if not tag_names:  # tags_optional, and a table without tags
        extra["unlabeled"] = True
    return _build_index(records, tag_names, name, extra, check_audio, audio_hint)


# The longest duration a track may list: about 116 days (a larger one is a unit or format mistake).
MAX_LISTED_SECONDS = 1e7


def _parse_duration(value: str, where: str, name: str = "duration") -> float:
    """A listed duration in seconds; NaN where none is listed (an empty cell, or ``nan``)."""
    text = str(value).strip()
    if not text or text.lower() == "nan":
        return math.nan
    try:  # a decimal comma too (a semicolon-separated file from a locale that writes 1,5)
        seconds = float(text.replace(",", ".") if text.count(",") == 1 and "." not in text else text)
    except ValueError:
        raise DatasetError(f"{where}: {name} {text!r} is not a number of seconds") from None
    if not 0 < seconds <= MAX_LISTED_SECONDS:
        raise DatasetError(f"{where}: {name} {text!r} is not a duration (seconds, above 0 and at most "
                           f"{MAX_LISTED_SECONDS:g}); correct it, or leave the cell empty if unknown")
    return seconds


# How MTG-Jamendo names its low-quality copies: 41/241.low.mp3 beside 41/241.mp3.
LOW_QUALITY_SUFFIX = ".low"


def _keep_extensions_that_tell_files_apart(records: list[dict]) -> None:
    """Ids taken from paths drop the extension; files that differ only in it (``song.wav`` and
    ``song.mp3``) keep theirs (``song.wav``, ``song.mp3``), so that both are tracks. Their split is
    drawn from the id without extension (``split_key``): the two (often two encodings of one
    recording) share a split, and a track keeps its split when such a twin comes or goes."""
    paths_of: dict[str, set[str]] = {}
    for record in records:
        paths_of.setdefault(record["track_id"], set()).add(record["path"])
    for record in records:
        if len(paths_of[record["track_id"]]) > 1:
            record["split_key"] = record["track_id"]
            record["track_id"] += Path(record["path"]).suffix
    _share_splits_with_full_quality_copies(records)


def _share_splits_with_full_quality_copies(records: list[dict]) -> None:
    """A low-quality copy named as MTG-Jamendo names them (``41/241.low.mp3``, id ``41/241.low``) draws its
    split from the id without ``.low`` (``41/241``), whether or not the full-quality file is there: the
    two copies of one recording share a split, and the copy keeps it when the other comes or goes. Before,
    each drew its own, so that one song could be in train and in test. (Other dotted names keep theirs.)"""
    for record in records:
        key = _split_key(record)
        if key.endswith(LOW_QUALITY_SUFFIX) and key.rpartition("/")[2] != LOW_QUALITY_SUFFIX:
            record["split_key"] = key[: -len(LOW_QUALITY_SUFFIX)]


def _nfc(text: str) -> str:
    """``text`` in Unicode normal form C: names copied from macOS are decomposed (NFD), typed ones composed."""
    return unicodedata.normalize("NFC", text)


def _existing_spelling(path: Path) -> Path:
    """``path``, or its NFC or NFD spelling where only that one exists (a listed path outside the dataset's
    folder, whose files are not scanned). One that cannot be looked at (a folder on the way that may not be
    entered, a name too long) stays as listed: the mel cache skips it with the reason. (``os.path.exists``:
    ``Path.exists`` raises for those.)"""
    if not os.path.exists(path):
        for form in ("NFC", "NFD"):
            other = Path(unicodedata.normalize(form, str(path)))
            if os.path.exists(other):
                return other
    return path


def _listed_audio(location: str, root: Path, on_disk: dict[str, Path]) -> tuple[Path, Path | None]:
    """A tags file's audio cell as a path (relative ones under ``root``; ``a/../a/x.wav`` is ``a/x.wav``,
    so that a file listed twice that way is one file and one id), and the file on disk it names, if
    found among ``on_disk`` (the files under ``root``, by path and by its NFC spelling)."""
    path = Path(location).expanduser()
    path = Path(os.path.normpath(path if path.is_absolute() else root / path))
    return path, on_disk.get(str(path)) or on_disk.get(_nfc(str(path)))


def _split_key(record: dict) -> str:
    """What a track's drawn split depends on (see :func:`_keep_extensions_that_tell_files_apart`)."""
    return record.get("split_key", record["track_id"])


def _group_key(record: dict) -> str:
    """What a track's drawn split depends on where the table has a ``split_group`` column: the group, or, for a
    track with an empty cell, what it depends on without the column (:func:`_split_key`), so that it keeps that
    split."""
    group = record[SPLIT_GROUP_COLUMN]
    return f"{SPLIT_GROUP_COLUMN}={group}" if group else _split_key(record)


def _share_groups_among_copies(records: list[dict], tags_path: Path) -> None:
    """Copies of one recording (one :func:`_split_key`: files that differ only in their extension, MTG-Jamendo's
    ``.low.mp3``) share a split: a copy with an empty ``split_group`` cell takes the group another names, and
    copies that name different groups are refused."""
    named: dict[str, dict[str, str]] = {}
    for record in records:
        if record[SPLIT_GROUP_COLUMN]:
            named.setdefault(_split_key(record), {})[record[SPLIT_GROUP_COLUMN]] = record["track_id"]
    for key, groups in named.items():
        if len(groups) > 1:
            listed = ", ".join(f"{track_id} in {group!r}" for group, track_id in groups.items())
            raise DatasetError(f"{tags_path}: copies of one recording name different {SPLIT_GROUP_COLUMN} values "
                               f"({listed}); give them one, as copies share a split")
    for record in records:
        groups = named.get(_split_key(record)) if not record[SPLIT_GROUP_COLUMN] else None
        if groups:
            record[SPLIT_GROUP_COLUMN] = next(iter(groups))


def _report_groups(records: list[dict], tags_path: Path, fractions: tuple[float, float, float]) -> None:
    """Log how splits drawn by group came out: tracks without a group, and each split's share of the tracks
    where a large group moved it far from its fraction."""
    ungrouped = [record["track_id"] for record in records if not record[SPLIT_GROUP_COLUMN]]
    if ungrouped:
        logger.warning("%s: %d track(s) have an empty %s cell, e.g. %s; each keeps the split it has without the column",
                       tags_path, len(ungrouped), SPLIT_GROUP_COLUMN, ungrouped[0])
    counts = Counter(record["split"] for record in records)
    groups = {_group_key(record) for record in records}
    shares = {name: counts[name] / len(records) for name in ("train", "valid", "test")}
    logger.info("%s: %d tracks in %d groups (a track without one is a group of its own), splits drawn by %s: %s",
                tags_path, len(records), len(groups), SPLIT_GROUP_COLUMN,
                ", ".join(f"{name} {counts[name]}" for name in shares))
    # (an empty split is warned of by assign_splits; without a group, the shares are those drawn without the column)
    off = [] if len(ungrouped) == len(records) else [
        f"{name} {share:.0%} (drawn for {fraction:.0%})" for (name, share), fraction in zip(shares.items(), fractions)
        if share and abs(share - fraction) > fraction / 2]
    if off:
        logger.warning("%s: splits drawn by %s hold %s of the tracks: with few or uneven groups a split's share "
                       "is far from its fraction; give a split column to choose the splits", tags_path,
                       SPLIT_GROUP_COLUMN, ", ".join(off))


def _raise_on_duplicate_ids(ids: Sequence[str], source: Path) -> None:
    repeated = sorted(track_id for track_id, count in Counter(ids).items() if count > 1)
    if repeated:
        raise DatasetError(
            f"{source}: track id(s) {repeated[:5]} occur more than once (ids come from a track_id column, else "
            "the audio path without extension); make them unique, e.g. with a track_id column"
        )


def _records_from_table(
    table: pd.DataFrame,
    tags_path: Path,
    root: Path,
    audio_files: list[Path],
    tag_separator: str | None,
    keep_columns: Sequence[str],
    tags_optional: bool = False,
    other_formats: Sequence[Path] = (),
) -> tuple[list[dict], list[str], bool]:
    """Classify the columns of a tags table and turn its rows into records (with ``tags_optional``, a
    table without tag columns gives records without tags). A track id that names no audio file but one
    of ``other_formats`` (an .m4a) is that file, which then fails to decode as one of a format not read here."""
    found = list(table.columns)
    by_lower = {}
    for column in found:
        by_lower.setdefault(column.lower(), column)
    expected = (
        "an audio column (path, filename or track_id), then either a 'tags' column or one 0/1 column per tag, "
        f"optionally 'split' (or '{SPLIT_GROUP_COLUMN}') and metadata {list(METADATA_COLUMNS)}"
    )
    path_column = by_lower.get("path")
    filename_column = by_lower.get("filename")
    id_column = by_lower.get("track_id")
    tags_column = by_lower.get("tags")
    split_column = by_lower.get("split")
    group_column = by_lower.get(SPLIT_GROUP_COLUMN)
    if split_column and group_column:
        raise DatasetError(
            f"{tags_path}: has both a {split_column!r} column, which gives each track its split, and a "
            f"{group_column!r} column, which draws the splits by group; keep one (found columns {found})"
        )
    if path_column and filename_column:
        raise DatasetError(
            f"{tags_path}: has both 'path' and 'filename' columns, so the audio is ambiguous; keep one "
            f"(found columns {found})"
        )
    audio_column = path_column or filename_column
    if audio_column is None and id_column is None:
        raise DatasetError(f"{tags_path}: no audio column; found columns {found}, expected {expected}")
    keep = {column.lower() for column in (*METADATA_COLUMNS, *keep_columns)}
    role_columns = {c for c in (audio_column, id_column, tags_column, split_column, group_column) if c}
    metadata_columns = [c for c in found if c not in role_columns and c.lower() in keep]
    other_columns = [c for c in found if c not in role_columns and c not in metadata_columns]

    binary_columns: dict[str, np.ndarray] = {}
    if tags_column is not None:
        if other_columns:
            raise DatasetError(
                f"{tags_path}: unexpected column(s) {other_columns} next to the 'tags' column; found columns "
                f"{found}, expected {expected}. Pass keep_columns={other_columns} to keep them as metadata "
                "(on the command lines: remove them from the file)"
            )
    else:
        not_binary = []
        for column in other_columns:
            values = _binary_column(table[column])
            if values is None:
                line, bad = next((line, v) for line, v in table[column].items()
                                 if str(v).strip().lower() not in BINARY_VALUES)
                not_binary.append(f"{column!r} (value {bad!r} on line {line})")
            else:
                binary_columns[column] = values
        if not_binary:
            raise DatasetError(
                f"{tags_path}: column(s) {', '.join(not_binary)} are neither known columns nor 0/1 tag columns; "
                f"found columns {found}, expected {expected}. Pass keep_columns=[...] to keep such columns as "
                "metadata (on the command lines: remove them from the file), or use a 'tags' column"
            )
        if not binary_columns and not tags_optional:
            raise DatasetError(
                f"{tags_path}: no tags; found columns {found}, expected {expected}. For audio without tags use "
                "tags_optional=True (on the command lines: training reads such a table, its splits kept; an "
                "evaluation needs tags)"
            )

    if tags_column is not None:
        row_tags = split_tag_cells(table[tags_column].astype(str), table.index, tags_path, tag_separator)
        tag_names = sorted({tag for tags in row_tags for tag in tags})
    elif binary_columns:
        tag_names = list(binary_columns)
        matrix = np.stack([binary_columns[tag] for tag in tag_names], axis=1)
        row_tags = _tags_from_matrix(matrix, tag_names)
    else:  # tags_optional: the tracks without tags
        tag_names, row_tags = [], [() for _ in range(len(table))]

    split_values: list[str] | None = None
    if split_column is not None:
        raw = [str(value).strip().lower() for value in table[split_column]]
        unknown = sorted({value for value in raw if value not in SPLIT_ALIASES})
        if unknown:
            first = next(line for line, value in zip(table.index, raw) if value not in SPLIT_ALIASES)
            raise DatasetError(
                f"{tags_path}: column {split_column!r} has value(s) {unknown} (the first on line {first}); "
                "use train, valid or test "
                f"(also accepted: {sorted(set(SPLIT_ALIASES) - {'train', 'valid', 'test'})})"
            )
        split_values = [SPLIT_ALIASES[value] for value in raw]

    # Listed names match files on disk whatever their Unicode normalisation (an exact match first).
    on_disk = {str(path): path for path in audio_files}
    for path in audio_files:
        on_disk.setdefault(_nfc(str(path)), path)
    by_relative: dict[str, list[Path]] = {}  # a track_id names the file(s) at that path, whatever the extension
    for path in audio_files:
        by_relative.setdefault(path.relative_to(root).with_suffix("").as_posix(), []).append(path)
    for path in audio_files:
        spelling = _nfc(path.relative_to(root).with_suffix("").as_posix())
        if spelling not in by_relative:
            by_relative[spelling] = [path]
    by_stem: dict[str, list[Path]] = {}
    for path in audio_files:
        by_stem.setdefault(_nfc(path.stem), []).append(path)
    # Files of formats that are not read (.m4a...) by their relative name and their stem, the first in listing
    # order under each: looked up once per row (a scan of them all per row took hours for tens of thousands).
    other_by_name: dict[str, list[Path]] = {}
    for path in other_formats:
        for name in dict.fromkeys((_nfc(path.relative_to(root).with_suffix("").as_posix()), _nfc(path.stem))):
            other_by_name.setdefault(name, []).append(path)

    records: list[dict] = []
    for position, (row_number, row) in enumerate(zip(table.index, table.itertuples(index=False))):
        values = dict(zip(found, row))
        record: dict[str, Any] = {}
        for column in (audio_column, id_column):
            if column is not None and "\0" in str(values[column]):
                raise DatasetError(f"{tags_path}, line {row_number}: the {column!r} cell contains a NUL byte "
                                   "(a damaged file, or not text); correct or remove that row")
        if audio_column is not None:
            cell = str(values[audio_column])
            location = cell.strip()
            if not location:
                raise DatasetError(f"{tags_path}, line {row_number}: empty {audio_column!r}; give the audio file")
            # Spaces around a cell are dropped, unless the file's name has them (then only that file exists).
            spelling = location
            audio_path, found_path = _listed_audio(location, root, on_disk)
            if cell != location and found_path is None and not os.path.exists(audio_path):
                unstripped, found_unstripped = _listed_audio(cell, root, on_disk)
                if found_unstripped is not None or os.path.exists(unstripped):
                    spelling, audio_path, found_path = cell, unstripped, found_unstripped
            record["path"] = str(found_path or _existing_spelling(audio_path))
            if id_column is not None:
                record["track_id"] = str(values[id_column]).strip()
            else:  # an id from a name is NFC, so that its split does not depend on where the files were copied
                try:
                    record["track_id"] = _nfc(audio_path.relative_to(root).with_suffix("").as_posix())
                except ValueError:  # outside root: the path as listed (absolute, or through "..", as ids always were)
                    listed = Path(spelling).expanduser()
                    listed = listed if listed.is_absolute() else root / listed
                    record["track_id"] = _nfc(
                        (listed.relative_to(root) if listed.is_relative_to(root) else listed).with_suffix("").as_posix()
                    )
        else:
            track_id = str(values[id_column]).strip()
            record["track_id"] = track_id
            candidates = by_relative.get(track_id) or by_relative.get(_nfc(track_id)) or by_stem.get(_nfc(track_id), [])
            if len(candidates) > 1:
                raise DatasetError(
                    f"{tags_path}, line {row_number}: track_id {track_id!r} matches several audio files "
                    f"{[str(p.relative_to(root)) for p in candidates]}; add a 'path' column"
                )
            if not candidates:  # an .m4a of that name: skipped as such when decoded, not as "not found"
                candidates = other_by_name.get(_nfc(track_id), [])[:1]
            match = candidates[0] if candidates else None
            if match is None:
                record["path"] = str(root / track_id)
                record["_unresolved"] = "not found"
            else:
                record["path"] = str(match)
        if not record["track_id"]:
            raise DatasetError(f"{tags_path}, line {row_number}: empty track_id")
        record["split"] = split_values[position] if split_values is not None else "train"
        if group_column is not None:  # kept as a column of the index, for the user to see the groups
            record[SPLIT_GROUP_COLUMN] = _nfc(str(values[group_column]).strip())
        record["tags"] = row_tags[position]
        for column in metadata_columns:
            record[column] = values[column]
            if column.lower() == "duration":  # seconds, as a number like MTG-Jamendo's DURATION
                record[column] = _parse_duration(values[column], f"{tags_path}, line {row_number}")
        records.append(record)
    if id_column is None:
        _keep_extensions_that_tell_files_apart(records)
    return records, tag_names, split_values is not None, group_column is not None


# --------------------------------------------------------------------------------------------------
# MagnaTagATune


def load_mtat(
    root: str | Path,
    *,
    audio_dir: str | Path | None = None,
    n_tags: int = 50,
    check_audio: bool = True,
) -> TrackIndex:
    """MagnaTagATune with the standard top-50 tags and split (Won et al. 2020).

    ``root`` is the folder holding ``annotations_final.csv`` (or that file itself): TAB-separated,
    fields optionally double-quoted, columns ``clip_id``, 188 tag columns of 0/1, ``mp3_path``.
    Audio is ``audio_dir / mp3_path`` with ``audio_dir`` defaulting to ``root``'s folder.

    The vocabulary is the ``n_tags`` tags with the most clips over the WHOLE file (all splits),
    ordered by that count, ties broken by column order: the "50 most frequently labeled tags" of the
    usual top-50 setup (whose list starts ``guitar``, ``classical``, ``slow``, ``techno``). Clips
    with none of them are dropped (their count is in ``extra["dropped_without_tags"]``). The split
    follows the audio folder: ``0``-``b`` train, ``c`` valid, ``d``-``f`` test. Track ids are the
    clip ids. Won et al.'s published lists also leave out clips with under 29.1 s of audio, which
    only decoding can tell; this loader does not decode.
    """
    root = Path(root).expanduser()
    annotations = root if root.is_file() else root / MTAT_ANNOTATIONS
    if not annotations.is_file():
        raise DatasetError(
            f"{annotations}: not found; pass the MagnaTagATune folder that holds {MTAT_ANNOTATIONS} (--root)"
        )
    audio_root = Path(audio_dir).expanduser().resolve() if audio_dir is not None else annotations.parent.resolve()
    try:
        table = pd.read_csv(annotations, sep="\t", quotechar='"', dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetError(f"{annotations}: cannot read as a TAB-separated table ({error})") from None
    table.columns = [str(column).strip() for column in table.columns]
    found = list(table.columns)
    if len(found) < 3 or found[0] != "clip_id" or found[-1] != "mp3_path":
        raise DatasetError(
            f"{annotations}: expected TAB-separated columns clip_id, <tag columns>, mp3_path; found "
            f"{found[:4]}{' ...' if len(found) > 4 else ''} ({len(found)} columns)"
        )
    tag_columns = found[1:-1]
    if n_tags < 1 or n_tags > len(tag_columns):
        # The command lines always ask for the standard 50: say what the file lacks, not only the argument.
        raise DatasetError(
            f"{annotations}: has {len(tag_columns)} tag column(s), fewer than the 50 most frequent tags that the "
            f"standard top-50 setup uses; the original file has 188 tag columns: use it (in Python, n_tags= "
            f"1..{len(tag_columns)} takes fewer)"
            if n_tags == 50 else
            f"n_tags={n_tags}: {annotations} has {len(tag_columns)} tag columns; pick 1..{len(tag_columns)}"
        )
    matrix = np.empty((len(table), len(tag_columns)), dtype=np.int8)
    for position, column in enumerate(tag_columns):
        values = table[column].str.strip()
        bad = ~values.isin(["0", "1"])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DatasetError(
                f"{annotations}: tag column {column!r} has value {table[column].iloc[row]!r} at clip "
                f"{table['clip_id'].iloc[row]!r}; tag columns hold 0 or 1"
            )
        matrix[:, position] = (values == "1").to_numpy()

    counts = matrix.sum(axis=0, dtype=np.int64)
    chosen = np.argsort(-counts, kind="stable")[:n_tags]  # stable: ties keep column order
    tag_names = [tag_columns[j] for j in chosen]
    chosen_matrix = matrix[:, chosen]

    clip_ids = table["clip_id"].str.strip().tolist()
    mp3_paths = table["mp3_path"].str.strip().tolist()
    records: list[dict] = []
    dropped = 0
    clip_tags = _tags_from_matrix(chosen_matrix, tag_names)
    for clip_id, mp3_path, tags in zip(clip_ids, mp3_paths, clip_tags):
        folder = mp3_path.split("/", 1)[0] if "/" in mp3_path else ""
        split = MTAT_SPLIT_BY_FOLDER.get(folder)
        if split is None:
            raise DatasetError(
                f"{annotations}: clip {clip_id!r} has mp3_path {mp3_path!r}; expected '<folder>/<file>.mp3' "
                f"with folder one of 0-9, a-f"
            )
        if not tags:
            dropped += 1
            continue
        records.append({"track_id": clip_id, "path": str(audio_root / mp3_path), "split": split, "tags": tags})
    if dropped:
        # Said where it is seen (before: at the INFO level, which no command shows), as the other tracks left out are.
        logger.warning("mtat: left out %d of %d clips without any of the top %d tags (the standard protocol)",
                       dropped, dropped + len(records), len(chosen))
    extra = {
        "source": str(annotations),
        "tag_counts": {tag_columns[j]: int(counts[j]) for j in chosen},
        "dropped_without_tags": dropped,
        "split_rule": "audio folder: 0-b train, c valid, d-f test (Won et al. 2020)",
    }
    hint = f"pass --audio-dir (audio_dir= in Python) the folder that holds the MagnaTagATune folders 0..f (now {audio_root})"
    return _build_index(records, tag_names, "mtat", extra, check_audio, hint)


# --------------------------------------------------------------------------------------------------
# MTG-Jamendo


def _read_jamendo_tsv(path: Path) -> list[dict]:
    """Rows of an MTG-Jamendo split file: 5 fixed fields, then any number of tab-separated tags."""
    try:
        return _read_jamendo_rows(path)
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error}); MTG-Jamendo's split files are UTF-8, so this one "
                           "is damaged or another file: download it again") from None


def _read_jamendo_rows(path: Path) -> list[dict]:
    rows: list[dict] = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
        if tuple(field.strip() for field in header[:6]) != JAMENDO_HEADER:
            raise DatasetError(f"{path}: header {header} is not the MTG-Jamendo header {list(JAMENDO_HEADER)}")
        for line_number, line in enumerate(handle, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 5:
                raise DatasetError(
                    f"{path}, line {line_number}: {len(fields)} tab-separated field(s); expected "
                    f"{list(JAMENDO_HEADER[:5])} then the tags"
                )
            track_id, artist_id, album_id, relative_path, duration = (field.strip() for field in fields[:5])
            duration_seconds = _parse_duration(duration, f"{path}, line {line_number}", "DURATION")
            rows.append({
                "line": line_number,
                "track_id": track_id,
                "relative_path": relative_path,
                "artist_id": artist_id,
                "album_id": album_id,
                "duration": duration_seconds,
                "tags": _ordered_unique(tag.strip() for tag in fields[5:] if tag.strip()),
            })
    return rows


def load_jamendo(
    root: str | Path,
    subset: str = "top50",
    split_id: int = 0,
    audio_dir: str | Path | None = None,
    low_quality: bool = False,
    *,
    check_audio: bool = True,
) -> TrackIndex:
    """MTG-Jamendo autotagging: ``subset`` in ``top50``, ``instrument``, ``moodtheme``, ``genre``.

    Reads ``root/data/splits/split-{split_id}/autotagging_{subset}-{train,validation,test}.tsv``
    (``top50`` is ``top50tags`` in the file names; ``root`` is a checkout of the mtg-jamendo-dataset
    repository). ``validation`` becomes the split ``valid``. Tags keep their group prefix
    (``genre---rock``, ``instrument---piano``, ``mood/theme---happy``); the vocabulary is every tag
    in the three files, sorted. Audio is ``audio_dir / PATH`` (``audio_dir`` defaults to ``root``);
    ``low_quality=True`` uses the ``.low.mp3`` copies. ``artist_id``, ``album_id`` and ``duration``
    (seconds) are kept as columns.
    """
    if subset not in JAMENDO_SUBSETS:
        choices = sorted(set(JAMENDO_SUBSETS) - {"top50tags"})
        raise DatasetError(f"unknown MTG-Jamendo subset {subset!r}; use one of {choices}")
    file_subset = JAMENDO_SUBSETS[subset]
    root = Path(root).expanduser()
    splits_root = root / "data" / "splits"
    split_dir = splits_root / f"split-{split_id}"
    if not split_dir.is_dir():
        raise DatasetError(_jamendo_root_problem(root, split_id))
    audio_root = Path(audio_dir).expanduser().resolve() if audio_dir is not None else root.resolve()
    records: list[dict] = []
    first_seen: dict[str, tuple[Path, int, str]] = {}
    for file_split, split in JAMENDO_SPLIT_FILES:
        path = split_dir / f"autotagging_{file_subset}-{file_split}.tsv"
        if not path.is_file():
            present = sorted(p.name for p in split_dir.glob("*.tsv"))
            raise DatasetError(f"{path}: not found; {split_dir} holds {present}")
        for row in _read_jamendo_tsv(path):
            line = row.pop("line")
            if row["track_id"] in first_seen:
                first_path, first_line, first_split = first_seen[row["track_id"]]
                across = (f", in split {first_split!r} there and {split!r} here, which would put one track in two "
                          "splits" if first_split != split else "")
                raise DatasetError(
                    f"{path}, line {line}: TRACK_ID {row['track_id']!r} is listed already at {first_path.name}, line "
                    f"{first_line}{across}; the dataset's split files list each track once: restore them from the "
                    "mtg-jamendo-dataset repository"
                )
            first_seen[row["track_id"]] = (path, line, split)
            relative_path = row.pop("relative_path")
            if low_quality:
                if not relative_path.endswith(".mp3"):
                    raise DatasetError(f"{path}: PATH {relative_path!r} does not end in .mp3, so has no .low.mp3 copy")
                relative_path = relative_path[: -len(".mp3")] + ".low.mp3"
            records.append({**row, "path": str(audio_root / relative_path), "split": split})
    tag_names = sorted({tag for record in records for tag in record["tags"]})
    canonical = "top50" if file_subset == "top50tags" else file_subset
    # Every subset and split lists the same audio under the same track ids: they share one mel cache.
    extra = {"source": str(split_dir), "subset": file_subset, "split_id": split_id, "low_quality": low_quality,
             "mel_cache_name": "jamendo-low" if low_quality else "jamendo"}
    hint = (
        f"pass --audio-dir (audio_dir= in Python) the folder that holds the MTG-Jamendo audio folders 00..99 (now "
        f"{audio_root})"
        + ("" if low_quality else ", or the dataset name with -low (jamendo-top50-low, say; low_quality=True in Python) if you "
           "have the .low.mp3 copies")
    )
    # Named so in what it says (a -low dataset reads other files), and in the index as before (its caches' names).
    name = f"jamendo-{canonical}-split{split_id}"
    return _build_index(records, tag_names, name, extra, check_audio, hint, said_as=name + ("-low" if low_quality else ""))


def _jamendo_root_problem(root: Path, split_id: int) -> str:
    """What is wrong with ``root`` as an mtg-jamendo-dataset checkout that has no ``data/splits/split-{split_id}``,
    and the ``--root`` (or dataset name) to give instead."""
    splits_root = root / "data" / "splits"
    if splits_root.is_dir():
        available = sorted(p.name for p in splits_root.iterdir() if p.is_dir())
        return (f"{splits_root / f'split-{split_id}'}: no such folder; {splits_root} holds {available}: the dataset "
                "name jamendo-<subset>-splitK reads split-K (split_id= in Python)")
    # A folder inside the checkout (data/, data/splits/, a split-K folder): the checkout is one above it.
    resolved = root.resolve()
    checkout = next((folder for folder in resolved.parents if (folder / "data" / "splits").is_dir()), None)
    if checkout is not None:
        named = re.fullmatch(r"split-(\d+)", resolved.name)
        other = (f", and the dataset name jamendo-<subset>-split{int(named.group(1))} for the split {resolved.name}"
                 if named and int(named.group(1)) != split_id else "")
        return (f"{root} is inside the mtg-jamendo-dataset checkout {checkout}: pass --root {checkout} (root= in "
                f"Python), the folder that holds data/splits/{other}")
    return (f"{root}: no data/splits/ folder there; pass --root (root= in Python) the mtg-jamendo-dataset checkout, "
            "the folder that holds data/splits/split-0/")


# --------------------------------------------------------------------------------------------------
# Million Song Dataset (Won et al. top-50 split)


def _safe_pickle_globals() -> dict[tuple[str, str], Callable]:
    """The only globals the MSD pickles may name: containers, and numpy array/scalar reconstruction."""
    allowed: dict[tuple[str, str], Any] = {}
    for module in ("builtins", "__builtin__"):  # Python 2 pickles name __builtin__
        for builtin in (set, frozenset, list, dict, tuple, str, bytes, bytearray, int, float, complex, bool):
            allowed[(module, builtin.__name__)] = builtin
    allowed[("__builtin__", "unicode")] = str
    allowed[("__builtin__", "long")] = int
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("_codecs", "encode")] = codecs.encode  # how Python 3 pickles bytes at protocols < 3
    # Take numpy's reconstructors from numpy itself so the names work across numpy 1.x and 2.x.
    reconstruct = np.arange(1).__reduce__()[0]
    frombuffer = np.arange(1).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only whitelisted globals, so a pickle cannot call arbitrary code."""

    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any]) -> None:
        # latin1 turns Python 2 byte strings into str and is what numpy needs for Python 2 arrays.
        super().__init__(file, encoding="latin1")
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'") from None


def _load_restricted_pickle(path: Path) -> Any:
    allowed = _safe_pickle_globals()
    try:
        with path.open("rb") as handle:
            return _RestrictedUnpickler(handle, allowed).load()
    except pickle.UnpicklingError as error:
        raise DatasetError(
            f"{path}: {error}; only lists, dicts, strings, numbers and numpy arrays are accepted, so this is not "
            "one of the MSD split files (unpickling it fully could run code)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise DatasetError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None


def _as_id(value: Any, path: Path) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise DatasetError(f"{path}: holds {type(value).__name__} {value!r} where an MSD track id (str) belongs")
    return value.strip()


def _id_list(data: Any, path: Path) -> list[str]:
    if not isinstance(data, (list, tuple)):
        raise DatasetError(f"{path}: holds a {type(data).__name__}; expected a list of MSD track ids")
    return [_as_id(value, path) for value in data]


def _seven_digital_paths(split_dir: Path, base: str):
    """MSD id -> path of its 7digital clip under ``base`` ("" when the dictionaries list none)."""
    to_7d_path, paths_path = (split_dir / name for name in MSD_7DIGITAL_FILES)
    to_7d, paths = _load_restricted_pickle(to_7d_path), _load_restricted_pickle(paths_path)
    for data, path in ((to_7d, to_7d_path), (paths, paths_path)):
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: holds a {type(data).__name__}; expected a dict")
    key = lambda value: value.decode("ascii", "replace").strip() if isinstance(value, bytes) else str(value).strip()
    to_7d = {key(msd): key(seven) for msd, seven in to_7d.items()}
    paths = {key(seven): key(relative) for seven, relative in paths.items()}

    def path_of(msd_id: str) -> str:
        relative = paths.get(to_7d.get(msd_id, ""), "")
        return os.path.join(base, relative) if relative else ""

    return path_of


def _files_found(layouts: dict[str, Callable[[str], str]], ids: Sequence[str]) -> dict[str, int]:
    """How many of ``ids`` have a file under each layout (name -> MSD id -> path)."""
    return {name: sum(os.path.isfile(path_of(msd_id)) for msd_id in ids) for name, path_of in layouts.items()}


def load_msd(
    split_dir: str | Path,
    audio_dir: str | Path,
    *,
    train_size: int = MSD_TRAIN_SIZE,
    path_pattern: str | None = None,
    check_audio: bool = True,
) -> TrackIndex:
    """Million Song Dataset top-50 tags with Won et al.'s split (their ``split/msd`` folder).

    ``split_dir`` holds ``filtered_list_train.cP`` (the first ``train_size`` = 201,680 ids are
    train, the rest valid), ``filtered_list_test.cP``, ``msd_id_to_tag_vector.cP`` (MSD id ->
    50-long 0/1 vector) and ``50tagList.txt`` (the tag names, one per line, in vector order).

    Security: the ``.cP`` files are Python pickles, and unpickling can run arbitrary code. This
    function opens only the three files in the ``split_dir`` you pass, and unpickles them with a
    restricted unpickler that accepts plain containers, strings, numbers and numpy arrays only;
    anything else raises :class:`DatasetError` before any of it runs. Use it on files you trust.

    Audio (not distributed with MSD) is found one of two ways. ``path_pattern="7digital"``: the
    7digital preview clips, ``audio_dir / id7d_to_path[msd_to_7d[msd_id]]`` (e.g.
    ``8/9/8947470.clip.mp3``), through ``MSD_id_to_7D_id.pkl`` and ``7D_id_to_path.pkl`` of the same
    split folder (unpickled the same restricted way). Any other ``path_pattern``:
    ``audio_dir / path_pattern.format(id=msd_id)``, e.g. ``{id[2]}/{id[3]}/{id[4]}/{id}.mp3``
    (:data:`MSD_AUDIO_PATTERN`: the 3rd, 4th and 5th characters of the MSD id name the folders, as
    in the dataset's own files: ``TRBCDEF128F1234567`` -> ``B/C/D/TRBCDEF128F1234567.mp3``). The
    default (``None``) takes the layout under which more listed tracks have a file (the 7digital one
    only when its two files are there), judged on 1,000-2,000 ids spread over the lists, or on all of them
    when those tie (as when only a few tracks have audio); ``extra["audio_layout"]`` says which. Tag
    names are kept as written (``Hip-Hop``, ``Mellow``).
    """
    split_dir = Path(split_dir).expanduser()
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: no such folder; pass the folder holding {sorted(MSD_FILES.values())}")
    absent = [file for file in MSD_FILES.values() if not (split_dir / file).is_file()]
    if absent:
        raise DatasetError(
            f"{split_dir}: missing {absent}; the MSD top-50 split needs {list(MSD_FILES.values())} "
            "(from the split/msd folder of minzwon/sota-music-tagging-models)"
        )
    if path_pattern not in (None, MSD_7DIGITAL):
        try:
            path_pattern.format(id="TRAAABD128F429CF47")
        except (KeyError, IndexError, ValueError, AttributeError) as error:
            raise DatasetError(
                f"path_pattern {path_pattern!r} is not usable ({error!r}); write it with {{id}} and {{id[i]}}, "
                f"e.g. {MSD_AUDIO_PATTERN!r}, or give {MSD_7DIGITAL!r}"
            ) from None
    has_7digital = all((split_dir / name).is_file() for name in MSD_7DIGITAL_FILES)
    if path_pattern == MSD_7DIGITAL and not has_7digital:
        raise DatasetError(
            f"{split_dir}: the 7digital layout needs {list(MSD_7DIGITAL_FILES)} there (from the split/msd folder "
            "of minzwon/sota-music-tagging-models)"
        )
    audio_root = Path(audio_dir).expanduser().resolve()

    tag_list_path = split_dir / MSD_FILES["tag_names"]
    try:
        tag_text = tag_list_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{tag_list_path}: not UTF-8 text ({error}); it should list one tag name per line") from None
    tag_names = [line.strip() for line in tag_text.splitlines() if line.strip()]
    if len(set(tag_names)) != len(tag_names):
        raise DatasetError(f"{tag_list_path}: repeats tag names; it should list each tag once")
    train_path = split_dir / MSD_FILES["train"]
    test_path = split_dir / MSD_FILES["test"]
    tags_path = split_dir / MSD_FILES["tags"]
    train_ids = _id_list(_load_restricted_pickle(train_path), train_path)
    test_ids = _id_list(_load_restricted_pickle(test_path), test_path)
    if not 0 < train_size <= len(train_ids):
        # The command lines always use Won et al.'s split: say what the file lacks, not only the argument.
        raise DatasetError(
            f"{train_path}: has {len(train_ids):,} ids, too few for the {MSD_TRAIN_SIZE:,} training ids of Won et "
            f"al.'s split (the rest are valid); the original file has 213,454 ids: use it (in Python, train_size= "
            f"1..{len(train_ids)} takes fewer)"
            if train_size == MSD_TRAIN_SIZE else
            f"{train_path}: has {len(train_ids)} ids, so train_size={train_size} cannot split it into train and "
            f"valid; the original file has 213,454 ids with train_size={MSD_TRAIN_SIZE}"
        )
    raw_vectors = _load_restricted_pickle(tags_path)
    if not isinstance(raw_vectors, dict):
        raise DatasetError(f"{tags_path}: holds a {type(raw_vectors).__name__}; expected a dict MSD id -> tag vector")
    vectors = {_as_id(key, tags_path): value for key, value in raw_vectors.items()}

    listed = [
        (msd_id, split)
        for split, ids in (("train", train_ids[:train_size]), ("valid", train_ids[train_size:]), ("test", test_ids))
        for msd_id in ids
    ]
    unlabeled_ids = [msd_id for msd_id, _ in listed if msd_id not in vectors]
    if unlabeled_ids:
        raise DatasetError(
            f"{tags_path}: has no tag vector for {len(unlabeled_ids)} listed id(s), e.g. {unlabeled_ids[:3]}; "
            "use the three .cP files from the same split folder"
        )
    flat = [np.asarray(vectors[msd_id]).reshape(-1) for msd_id, _ in listed]
    wrong_length = next((i for i, values in enumerate(flat) if values.shape[0] != len(tag_names)), None)
    if wrong_length is not None:
        raise DatasetError(
            f"{tags_path}: the vector of {listed[wrong_length][0]} has {flat[wrong_length].shape[0]} entries but "
            f"{tag_list_path.name} lists {len(tag_names)} tags"
        )
    matrix = np.stack(flat) if flat else np.zeros((0, len(tag_names)))
    not_binary = ~((matrix == 0) | (matrix == 1)).all(axis=1)
    if not_binary.any():
        row = int(np.flatnonzero(not_binary)[0])
        raise DatasetError(
            f"{tags_path}: the vector of {listed[row][0]} holds {matrix[row].tolist()}; expected 0/1 values"
        )
    # os.path.join rather than Path: this runs for ~240,000 tracks.
    base = str(audio_root)
    layouts: dict[str, Any] = {}
    if path_pattern != MSD_7DIGITAL:
        pattern = path_pattern or MSD_AUDIO_PATTERN
        layouts[pattern] = lambda msd_id: os.path.join(base, pattern.format(id=msd_id))
    if path_pattern in (None, MSD_7DIGITAL) and has_7digital:
        layouts[MSD_7DIGITAL] = _seven_digital_paths(split_dir, base)
    found: dict[str, int] = {}
    if len(layouts) > 1:  # the default: whichever finds more files
        ids = [msd_id for msd_id, _ in listed]
        # 1,000-2,000 ids spread over the lists first; when they cannot tell (a tie, 0-0 where only some tracks
        # have audio), every listed id (0.9 s for 200,000 ids and both layouts on a local disk).
        found = _files_found(layouts, ids[:: max(1, len(ids) // 1000)])
        if len(set(found.values())) == 1:
            found = _files_found(layouts, ids)
        chosen = max(found, key=lambda name: found[name])  # a tie keeps MSD's own layout (first)
        layouts = {chosen: layouts[chosen]}
    layout, path_of = next(iter(layouts.items()))
    records = [
        {"track_id": msd_id, "path": path_of(msd_id), "split": split, "tags": tags}
        for (msd_id, split), tags in zip(listed, _tags_from_matrix(matrix, tag_names))
    ]
    for record in records:
        if not record["path"]:
            record["_unresolved"] = "missing"  # no 7digital clip is listed for this MSD id
            record["path"] = os.path.join(base, f"(no 7digital clip for {record['track_id']})")
    extra = {
        "source": str(split_dir),
        "train_size": train_size,
        "split_rule": f"first {train_size} ids of {MSD_FILES['train']} train, the rest valid (Won et al.)",
        "audio_layout": layout,
    }
    other = ("" if path_pattern is not None else
             f"; the 7digital layout (8/9/8947470.clip.mp3) needs {list(MSD_7DIGITAL_FILES)} in {split_dir}"
             if not has_7digital else
             f"; neither {MSD_AUDIO_PATTERN!r} nor the 7digital layout found any of the {len(listed)} listed "
             "tracks' files" if found and not any(found.values()) else "")
    hint = (f"pass --audio-dir (audio_dir= in Python) the folder with the MSD audio laid out as {layout!r} (now "
            f"{audio_root}){other}")
    return _build_index(records, tag_names, "msd", extra, check_audio, hint)


# --------------------------------------------------------------------------------------------------
# One entry point


def open_dataset(spec: str, root: str | Path | None = None, **kwargs: Any) -> TrackIndex:
    """Open a dataset by name or path.

    Names (case-insensitive): ``corpus`` (the embedded, generated corpus; built in ``root`` if
    missing), ``mtat``, ``jamendo-top50``, ``jamendo-instrument``, ``jamendo-mood``,
    ``jamendo-genre`` (``root`` is the dataset folder, see the loaders; these are MTG-Jamendo's split
    0, and ``jamendo-top50-split3`` and the like name its others) and ``msd`` (``root`` is the split
    folder; pass ``audio_dir=``). Names win over same-named local folders.

    Otherwise ``spec`` is a path (``root`` unused): a ``tracks.csv``-style file (columns
    ``track_id, path, split, tags``) is read with :meth:`TrackIndex.from_csv`; any other CSV/TSV is
    the tags file of :func:`load_folder` on its folder; a folder is read from its ``tracks.csv`` if
    it has one (unless that has the columns of a tags file instead, see :func:`_is_folder_track_index`),
    else with :func:`load_folder`. ``kwargs`` go to the loader.
    """
    _refuse_an_empty_spec(spec)
    key = dataset_name(spec)
    if key == "corpus":
        # The embedded corpus, built into the cache (or ``root``) on first use.
        from musicssl.corpus import CorpusError, ensure_corpus

        try:
            folder = ensure_corpus(root, **kwargs)
        except CorpusError as error:  # e.g. a corpus --root of another generator version: said as a dataset's problem
            raise DatasetError(str(error)) from None
        return TrackIndex.from_csv(folder / "tracks.csv", name="corpus")
    if key is not None:
        if root is None:
            raise DatasetError(f"dataset {key!r} needs root= the folder that holds its files")
        if key == "mtat":
            return load_mtat(root, **kwargs)
        if key in _JAMENDO_NAMES:
            match = _JAMENDO_SPLIT.match(str(spec).strip().lower())
            if match and match.group(2) is not None:
                if int(kwargs.get("split_id", match.group(2))) != int(match.group(2)):
                    raise DatasetError(f"{spec!r} names split {match.group(2)}, and split_id={kwargs['split_id']}")
                kwargs["split_id"] = int(match.group(2))
            if match and match.group(3):
                if not kwargs.get("low_quality", True):
                    raise DatasetError(f"{spec!r} names the .low.mp3 copies, and low_quality=False")
                kwargs["low_quality"] = True
            return load_jamendo(root, subset=_JAMENDO_NAMES[key], **kwargs)
        if key == "msd":
            if "audio_dir" not in kwargs:
                raise DatasetError(
                    "dataset 'msd' needs audio_dir= the folder with the MSD audio (root= is the split folder)"
                )
            return load_msd(root, **kwargs)
    path = Path(spec).expanduser()
    if path.is_file():
        check_audio = kwargs.pop("check_audio", True)
        if _is_track_index_file(path):
            if kwargs:
                raise DatasetError(f"{path}: is a track index; options {sorted(kwargs)} do not apply to it")
            return _checked_track_index(TrackIndex.from_csv(path), check_audio, path)
        return load_folder(path.parent, tags_file=path, check_audio=check_audio, **kwargs)
    if path.is_dir():
        if _is_folder_track_index(path):
            check_audio = kwargs.pop("check_audio", True)
            if kwargs:
                raise DatasetError(
                    f"{path / 'tracks.csv'}: is a track index; options {sorted(kwargs)} do not apply to it"
                )
            return _checked_track_index(TrackIndex.from_csv(path / "tracks.csv"), check_audio, path / "tracks.csv")
        return load_folder(path, **kwargs)
    raise DatasetError(
        f"unknown dataset {spec!r}: not one of {list(DATASET_NAMES)} (jamendo-*-splitK: MTG-Jamendo's split K), "
        "and no file or folder of that name exists"
    )


def read_audio_alone(index: TrackIndex) -> bool:
    """Whether ``index`` is a folder's audio read without a tags file (ids and splits from the paths), not a
    table of tracks, with tags or without (``extra["unlabeled"]`` is True for both)."""
    return bool(index.extra.get("unlabeled")) and Path(str(index.extra.get("source", ""))).is_dir()


def split_by_groups(index: TrackIndex) -> bool:
    """Whether ``index``'s splits were drawn by its tags file's ``split_group`` column (:func:`load_folder`)."""
    return index.extra.get("split_rule") == _GROUPED_RULE


def split_groups_line(index: TrackIndex) -> str | None:
    """``splits drawn by split_group: 40 groups (train 280, valid 41, test 79 tracks)`` where ``index``'s splits
    were drawn so (:func:`split_by_groups`), for the command lines to confirm it; else None."""
    if not split_by_groups(index):
        return None
    frame = index.tracks
    groups = frame.loc[frame[SPLIT_GROUP_COLUMN] != "", SPLIT_GROUP_COLUMN].nunique()
    alone = int((frame[SPLIT_GROUP_COLUMN] == "").sum())
    counts = frame["split"].value_counts()
    return (f"splits drawn by {SPLIT_GROUP_COLUMN}: {groups} group(s)"
            + (f" and {alone} track(s) without one" if alone else "")
            + f" (train {counts.get('train', 0)}, valid {counts.get('valid', 0)}, test {counts.get('test', 0)} tracks)")


def open_dataset_option(
    spec: str, root: str | Path | None = None, audio_dir: str | Path | None = None, *, allow_unlabeled: bool = False,
    split_groups: bool = True,
) -> TrackIndex:
    """:func:`open_dataset` as the command lines take it: ``--data``/``--dataset`` ``spec``, with
    ``--root`` (the folder of a named dataset; for ``corpus``, where it is or is built) and
    ``--audio-dir`` (mtat, jamendo-*, msd: the audio when it is not under ``--root``). Misuse is a
    :class:`DatasetError` naming those flags.

    A folder of audio with neither a ``tracks.csv`` nor a tags file is, with ``allow_unlabeled``
    (self-supervised training), indexed without tags (``extra["unlabeled"]`` is True); without it
    (an evaluation, which needs tags), it is an error that says what to add. ``split_groups=False`` reads a tags
    file's ``split_group`` column without drawing the splits by it (:func:`load_folder`).
    """
    check_dataset_option(spec, root, audio_dir)
    path = Path(str(spec)).expanduser()
    if dataset_name(spec) is None:
        _refuse_a_named_datasets_files(path)
    if (dataset_name(spec) is None and path.is_dir() and any(path.iterdir())
            and not _is_folder_track_index(path) and _find_tags_file(path) is None):
        # A tags file in another format would be ignored, and with it the splits it gives (its test tracks trained on).
        unread = sorted(child.name for child in path.iterdir() if child.is_file()
                        and child.stem.lower() in {Path(name).stem for name in DEFAULT_TAG_FILES}
                        and child.suffix.lower() in UNREAD_TABLE_SUFFIXES)
        if unread:
            raise DatasetError(
                f"{path}: {unread[0]} looks like a tags file, but only .csv and .tsv tags files are read; "
                f"rename it (e.g. to {Path(unread[0]).stem}.csv; commas, tabs or semicolons) to use its tags and "
                "splits, or move it out of the folder to use the audio without tags"
            )
        if not allow_unlabeled:
            raise DatasetError(
                f"{path}: no tags file found (looked for {', '.join(DEFAULT_TAG_FILES)} or a single *.csv/*.tsv); "
                "the evaluation needs tags: put a tags CSV/TSV in the folder, or give its path as the dataset"
            )
        index = open_dataset(str(spec), unlabeled=True)
        return TrackIndex(index.tracks, index.tag_names, name=index.name, extra={**index.extra, "unlabeled": True})
    options: dict[str, Any] = {} if audio_dir is None else {"audio_dir": audio_dir}
    tags_file = dataset_name(spec) is None and (
        (path.is_file() and not _is_track_index_file(path)) or (path.is_dir() and not _is_folder_track_index(path)))
    if allow_unlabeled and tags_file:
        options["tags_optional"] = True  # training: a table of tracks (and splits) without tags is enough
    if not split_groups and tags_file:
        options["split_groups"] = False
    return open_dataset(str(spec), root, **options)


def _refuse_a_named_datasets_files(path: Path) -> None:
    """Raise :class:`DatasetError` when the path given as a dataset holds a named dataset's own files
    (read as a folder, they would lose its tags and official splits: MTG-Jamendo's ``.low.mp3`` copies
    of a song even landed in different splits) or is a file that is no table of tracks or tags."""
    names = ", ".join(DATASET_NAMES)
    jamendo = ("open it by name, jamendo-top50 (or jamendo-instrument, jamendo-mood, jamendo-genre; "
               "jamendo-top50-splitK for its split K), with --root {root}")
    if path.is_file():
        if path.name == MTAT_ANNOTATIONS:
            raise DatasetError(f"{path} is MagnaTagATune's tags file: open the dataset by name, mtat, with --root "
                               f"{path.parent}")
        if path.name in MSD_FILES.values():
            raise DatasetError(f"{path} is one of the Million Song Dataset's split files: open the dataset by name, "
                               f"msd, with --root {path.parent} and --audio-dir the folder of its audio")
        if _JAMENDO_SPLIT_FILE.match(path.name) and _JAMENDO_SPLIT_DIR.match(path.parent.name):
            raise DatasetError(f"{path} is one of MTG-Jamendo's split files: "
                               + jamendo.format(root=_ancestor(path, 4)))
        if path.suffix.lower() in AUDIO_EXTENSIONS:
            raise DatasetError(f"{path} is an audio file; give the folder of audio that holds it, a tracks.csv, "
                               f"a tags table or a dataset name ({names})")
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DatasetError(f"{path}: not a table of tracks or tags (read from {', '.join(TABLE_SUFFIXES)} files); "
                               f"give a tracks.csv, a tags table, a folder of audio or a dataset name ({names})")
        return
    if not path.is_dir():
        return
    if _JAMENDO_SPLIT_DIR.match(path.name) and any(_JAMENDO_SPLIT_FILE.match(p.name) for p in path.glob("*.tsv")):
        raise DatasetError(f"{path} holds MTG-Jamendo's split files: " + jamendo.format(root=_ancestor(path, 3)))
    if _is_folder_track_index(path):
        return  # a track index of the user's own: the folder is read as they made it
    try:
        tags_file = _find_tags_file(path)
    except DatasetError:
        return  # several tables: the folder's reader asks which one is the tags file
    if tags_file is not None and tags_file.name != MTAT_ANNOTATIONS:
        return  # a tags file of the user's own
    if tags_file is not None:
        raise DatasetError(f"{path} holds MagnaTagATune ({MTAT_ANNOTATIONS}): open it by name, mtat, with --root "
                           f"{path}")
    if (path / MSD_FILES["train"]).is_file():
        raise DatasetError(f"{path} holds the Million Song Dataset's split files ({MSD_FILES['train']} ...): open "
                           f"it by name, msd, with --root {path} and --audio-dir the folder of its audio")
    splits = path / "data" / "splits"
    if splits.is_dir() and any(_JAMENDO_SPLIT_FILE.match(p.name) for p in splits.glob("split-*/*.tsv")):
        raise DatasetError(f"{path} looks like a checkout of the mtg-jamendo-dataset repository (data/splits/): "
                           + jamendo.format(root=path))


def _ancestor(path: Path, levels: int) -> Path:
    """The folder ``levels`` above ``path`` (the checkout that holds ``data/splits/split-K/``), or the top one."""
    parents = path.absolute().parents
    return parents[min(levels, len(parents)) - 1]


def check_dataset_option(spec: str, root: str | Path | None = None, audio_dir: str | Path | None = None) -> None:
    """Raise :class:`DatasetError` when ``spec`` is empty or ``--root``/``--audio-dir`` do not fit it (no
    file is read)."""
    _refuse_an_empty_spec(spec)
    for flag, value in (("--root", root), ("--audio-dir", audio_dir)):
        if value is not None and not str(value).strip():
            raise DatasetError(f"{flag} is empty; give a folder, or leave the flag out")
    name = dataset_name(spec)
    if audio_dir is not None and name not in ("mtat", "msd") and name not in _JAMENDO_NAMES:
        raise DatasetError(f"--audio-dir applies to mtat, jamendo-* and msd, not to {spec!r}")
    if name is not None and name != "corpus" and root is None:
        where = "the split folder (filtered_list_train.cP ...)" if name == "msd" else "the folder that holds its files"
        raise DatasetError(f"dataset {name!r} needs --root, {where}")
    if name == "msd" and audio_dir is None:
        raise DatasetError("dataset 'msd' needs --audio-dir, the folder with the MSD audio (--root is the split folder)")
    if name is None and root is not None:
        raise DatasetError(f"--root applies to named datasets; {spec!r} is a path already")
    if root is not None and Path(root).expanduser().exists() and not Path(root).expanduser().is_dir():
        what = {"corpus": "where the corpus is or is built", "msd": "the split folder"}.get(name, "the dataset's folder")
        raise DatasetError(f"--root {root} is a file; give a folder ({what})")
    if audio_dir is not None and Path(audio_dir).expanduser().exists() and not Path(audio_dir).expanduser().is_dir():
        raise DatasetError(f"--audio-dir {audio_dir} is a file; give the folder that holds the dataset's audio")


def _refuse_an_empty_spec(spec: str | Path) -> None:
    """An empty ``spec`` would be the path ``.``, the current folder: every audio file under it indexed."""
    if not str(spec).strip():
        raise DatasetError(
            f"the dataset given is empty ({str(spec)!r}); give 'corpus', a dataset name ({', '.join(DATASET_NAMES)}), "
            "a tracks.csv, a tags file or a folder of audio"
        )


def _is_track_index_file(path: Path) -> bool:
    if path.suffix.lower() != ".csv":
        return False
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:  # a bad byte: from_csv says so
        header = next(csv.reader(handle), [])
    return {"track_id", "path", "split", "tags"} <= {column.strip() for column in header}


def _is_folder_track_index(folder: Path) -> bool:
    """Whether ``folder/tracks.csv`` is read as the folder's track index: it is, unless its header names an
    audio column (``path``, ``filename`` or ``track_id``) without all four of an index, the columns of a
    tags file (which :func:`load_folder` then reads, a folder's only CSV being its tags file). A broken
    or empty one is an index, whose reader says what is wrong with it."""
    path = folder / "tracks.csv"
    if not path.is_file():
        return False
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
        header = {column.strip() for column in next(csv.reader(handle), [])}
    return {"track_id", "path", "split", "tags"} <= header or not {c.lower() for c in header} & {
        "path", "filename", "track_id"}


def folder_table(folder: Path) -> Path | None:
    """The table that folder ``folder`` given as a dataset is read through: its ``tracks.csv`` as a track index
    (:func:`_is_folder_track_index`), else its tags file (:func:`_find_tags_file`); None for audio alone."""
    return folder / "tracks.csv" if _is_folder_track_index(folder) else _find_tags_file(folder)


def _checked_track_index(index: TrackIndex, check_audio: bool, source: Path) -> TrackIndex:
    """Apply the missing-audio check to an index read from the ``tracks.csv`` ``source``."""
    if len(index.tracks) == 0:
        raise DatasetError(f"{source}: lists no tracks (a header and no rows); add one row per track "
                           "(track_id,path,split,tags)")
    if not check_audio:
        extra = {**index.extra, "audio_checked": False, "missing": []}
        return TrackIndex(index.tracks, index.tag_names, name=index.name, extra=extra)
    records = index.tracks.to_dict("records")
    kept, missing = _drop_missing_audio(records, index.name, "check that the paths in tracks.csv are right")
    frame = pd.DataFrame(kept, columns=index.tracks.columns)
    return TrackIndex(frame, index.tag_names, name=index.name,
                      extra={**index.extra, "audio_checked": True, "missing": missing})
