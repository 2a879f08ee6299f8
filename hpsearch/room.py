"""Disk room for a search: what it needs, a check before it starts, and a watch while it runs.

Each trial leaves its backbone checkpoint and its epoch reports in the search's folder, and Ray Tune
rewrites its experiment state there. Each running trial also writes them elsewhere first, from where
they are copied: its reports to Ray's temporary folder (``RAY_TMPDIR``, else ``TMPDIR``, else
``/tmp``), its checkpoint to the trials' temporary folder (Python's: ``TMPDIR``, else ``/tmp``). A disk
that filled under a search failed trials one after the other (each recorded as failed, its
hyperparameters blamed) and then the search itself, with a traceback and a journal record cut short.
Instead, a search does not start without room for the trials it runs at once, and stops, as after
Ctrl-C, when the room left falls below that: the trials that were running train again when it is
continued.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from hpsearch.settings import SearchSettings
from musicssl.paths import by_file_system, free_bytes, free_files, same_file_system, size_text

__all__ = [
    "FILES_FLOOR", "RoomFloors", "ray_temp_dir", "room_floors", "room_problem", "search_bytes", "temp_folder_text",
    "temp_move_text", "trial_bytes", "trial_temp_dir",
]

# What a trial writes besides its checkpoint, measured on the 18-epoch VICReg search (64 trials): its
# result.json, TensorBoard events and progress.csv, about 4 kB an epoch, and its part of the journal
# and of Ray's experiment state, about 50 kB.
TRIAL_BYTES_PER_EPOCH = 8_000
TRIAL_BYTES_FIXED = 64_000
# Ray's experiment state holds about 45 kB a trial (rewritten in place: room for it once more is kept).
STATE_BYTES_PER_TRIAL = 45_000
# Room kept besides, on each disk: the end writes trials.csv and summary.json; the journal grows.
MARGIN_BYTES = 4_000_000
# Files (inodes) kept free on each disk: a trial makes about 20 (its folder, its staged copies, Ray's logs),
# and a disk with bytes free but no inodes left refuses new files as a full one does.
FILES_FLOOR = 1000

RoomFloors = dict[Path, int]  # a folder -> the room its disk must keep for the search to go on


def trial_bytes(settings: SearchSettings, checkpoint: int) -> int:
    """About what one trial of the search leaves on disk."""
    return checkpoint + TRIAL_BYTES_FIXED + TRIAL_BYTES_PER_EPOCH * settings.max_epochs


def search_bytes(settings: SearchSettings, checkpoint: int, trials: int | None = None) -> int:
    """About what ``trials`` (default: all) of the search's trials and its results take in its folder,
    Ray's experiment state included."""
    count = settings.trials if trials is None else trials
    return count * (trial_bytes(settings, checkpoint) + STATE_BYTES_PER_TRIAL) + checkpoint + MARGIN_BYTES


def ray_temp_dir() -> Path:
    """Where Ray (started by the search on this machine) keeps its session and the trials stage their
    files: ``RAY_TMPDIR``, else ``TMPDIR`` (Linux), else ``/tmp``, as Ray chooses it."""
    if os.environ.get("RAY_TMPDIR"):
        return Path(os.path.abspath(os.environ["RAY_TMPDIR"]))
    if sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        return Path(os.path.abspath(os.environ["TMPDIR"]))
    return Path("/tmp")


def trial_temp_dir() -> Path:
    """Where a trial on this machine stages its checkpoint (:mod:`hpsearch.trainable`): Python's temporary
    folder as the trial's process finds it, from the environment it inherits from the search (``TMPDIR``,
    ``TEMP`` or ``TMP``, else ``/tmp``; read again here, where :func:`tempfile.gettempdir` keeps its first
    answer)."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        value = os.environ.get(name)
        if value and os.path.isdir(value) and os.access(value, os.W_OK | os.X_OK):
            return Path(os.path.abspath(value))
    for value in ("/tmp", "/var/tmp", "/usr/tmp"):
        if os.path.isdir(value) and os.access(value, os.W_OK | os.X_OK):
            return Path(value)
    return Path(tempfile.gettempdir())


def room_floors(settings: SearchSettings, checkpoint: int, folder: Path, trials_left: int,
                local: bool = True) -> RoomFloors:
    """The room under which the search stops, by disk: in its folder, what the trials running at once
    write there, the best backbone's copy and a margin; for trials on this machine (``local``), what they
    stage: their reports in Ray's temporary folder and their checkpoints in the trials' temporary folder,
    with a margin on each disk of its own (folders on one disk add up, with one margin). On a cluster the
    trials stage their files on their own nodes."""
    at_once = max(1, min(settings.concurrency, trials_left))
    running = at_once * trial_bytes(settings, checkpoint)
    needs = [(folder, running + checkpoint)]
    if local:
        needs += [(ray_temp_dir(), running - at_once * checkpoint), (trial_temp_dir(), at_once * checkpoint)]
    return {Path(disk): need + MARGIN_BYTES for disk, need in by_file_system(needs).items()}


def room_problem(floors: RoomFloors, search_folder: Path | None = None) -> str | None:
    """Why the search cannot go on for want of disk room (None while it has room): a disk with less
    free than its floor, the search's folder's with room for Ray to write its experiment state again, or
    with fewer than :data:`FILES_FLOOR` files (inodes) left."""
    for folder, floor in floors.items():
        free = free_bytes(folder)
        need = floor + (_state_bytes(folder) if folder == search_folder else 0)
        if free is not None and free < need:
            if folder != search_folder:  # a temporary folder, on a disk of its own
                return (f"only {size_text(free)} free on the disk of {folder}, {temp_folder_text(folder)}, under the "
                        f"{size_text(need)} that the trials running at once stage there ({temp_move_text(folder)})")
            return (f"only {size_text(free)} free on the disk of {folder}, under the {size_text(need)} that the "
                    "trials running at once and the search's results need")
        files = free_files(folder)
        if files is not None and files < FILES_FLOOR:
            what = "" if folder == search_folder else f", {temp_folder_text(folder)},"
            moves = "" if folder == search_folder else f" ({temp_move_text(folder)})"
            return (f"only {files} more files (inodes) can be made on the disk of {folder}{what} under the "
                    f"{FILES_FLOOR} that the search keeps for the trials running at once{moves}")
    return None


def _temp_roles(path: Path) -> tuple[bool, bool]:
    """Whether ``path``'s disk holds Ray's temporary folder, and the trials' temporary folder."""
    return tuple(known == path or same_file_system(known, path) for known in (ray_temp_dir(), trial_temp_dir()))


def temp_folder_text(path: Path) -> str:
    """What ``path`` is for a search, when it is on the disk of a temporary folder: "Ray's temporary folder",
    "the trials' temporary folder", or both."""
    ray, trials = _temp_roles(path)
    return {(True, True): "Ray's and the trials' temporary folder",
            (False, True): "the trials' temporary folder"}.get((ray, trials), "Ray's temporary folder")


def temp_move_text(path: Path) -> str:
    """Which environment variable moves the temporary folder on ``path``'s disk."""
    ray, trials = _temp_roles(path)
    return {(True, True): "RAY_TMPDIR and TMPDIR move them",
            (False, True): "TMPDIR moves it"}.get((ray, trials), "RAY_TMPDIR moves it")


def _state_bytes(folder: Path) -> int:
    """The size of Ray's newest experiment state in ``folder`` (0 before it is first written)."""
    sizes = []
    for path in folder.glob("experiment_state-*.json"):
        try:
            status = path.stat()
        except OSError:
            continue
        sizes.append((status.st_mtime, status.st_size))
    return max(sizes)[1] if sizes else 0
