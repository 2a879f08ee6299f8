"""Disk room for a search: what its folder needs, a check before it starts, and a watch while it runs.

Each trial leaves its backbone checkpoint and its epoch reports in the search's folder, and Ray Tune
rewrites its experiment state there. A disk that fills under a search failed trials one after the
other (each recorded as failed, its hyperparameters blamed) and then the search itself, with a
traceback and a journal record cut short. Instead, a search does not start without room for the
trials it runs at once, and stops, as after Ctrl-C, when the room left falls below that: the trials
that were running train again when it is continued.
"""

from __future__ import annotations

from pathlib import Path

from hpsearch.settings import SearchSettings
from musicssl.paths import free_bytes, size_text

__all__ = ["room_floor", "room_problem", "search_bytes", "trial_bytes"]

# What a trial writes besides its checkpoint, measured on the 18-epoch VICReg search (64 trials): its
# result.json, TensorBoard events and progress.csv, about 4 kB an epoch, and its part of the journal
# and of Ray's experiment state, about 50 kB.
TRIAL_BYTES_PER_EPOCH = 8_000
TRIAL_BYTES_FIXED = 64_000
# Ray's experiment state holds about 45 kB a trial, and is written whole next to the old one.
STATE_BYTES_PER_TRIAL = 45_000
# Room kept besides: the end writes trials.csv and summary.json; the journal grows.
MARGIN_BYTES = 4_000_000


def trial_bytes(settings: SearchSettings, checkpoint: int) -> int:
    """About what one trial of the search leaves on disk."""
    return checkpoint + TRIAL_BYTES_FIXED + TRIAL_BYTES_PER_EPOCH * settings.max_epochs


def search_bytes(settings: SearchSettings, checkpoint: int, trials: int | None = None) -> int:
    """About what ``trials`` (default: all) of the search's trials and its results take on disk, Ray's
    experiment state (and the new copy of it being written) included."""
    count = settings.trials if trials is None else trials
    return count * (trial_bytes(settings, checkpoint) + 2 * STATE_BYTES_PER_TRIAL) + checkpoint + MARGIN_BYTES


def room_floor(settings: SearchSettings, checkpoint: int) -> int:
    """The room under which a search stops, besides twice its experiment state (:func:`room_problem`):
    what the trials running at once write, the best backbone's copy and a margin."""
    return (settings.concurrency + 1) * trial_bytes(settings, checkpoint) + checkpoint + MARGIN_BYTES


def room_problem(folder: Path, floor: int) -> str | None:
    """Why the search cannot go on in ``folder`` for want of disk room (None while it has room): less
    free than ``floor`` and room for Ray to write its experiment state again next to the old one."""
    free = free_bytes(folder)
    if free is None:
        return None
    need = floor + 2 * _state_bytes(folder)
    if free >= need:
        return None
    return (f"only {size_text(free)} free on the disk of {folder}, under the {size_text(need)} that the trials "
            "running at once and the search's results need")


def _state_bytes(folder: Path) -> int:
    """The size of Ray's newest experiment state in ``folder`` (0 before it is first written)."""
    sizes = []
    for path in folder.glob("experiment_state-*.json"):
        try:
            sizes.append((path.stat().st_mtime, path.stat().st_size))
        except OSError:
            continue
    return max(sizes)[1] if sizes else 0
