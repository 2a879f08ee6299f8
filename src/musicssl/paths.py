"""Where the toolkit keeps what it builds: ``$MUSICSSL_CACHE`` (default ``~/.cache/musicssl``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

__all__ = [
    "ClaimedFolder", "FolderTaken", "by_file_system", "cache_hint", "cache_root", "claim_folder", "disk_full",
    "free_bytes",
    "free_files", "full_disk_error", "make_writable_folder", "missing_folders", "os_error_in_chain",
    "remove_abandoned_staging", "remove_if_empty", "same_file_system", "size_text", "staging_folder", "whole",
    "write_whole",
]

CLAIM_FILE = ".writing.lock"
PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def whole(target: Path, keep: Callable[[], bool] | None = None) -> Iterator[Path]:
    """A hidden path beside ``target`` to write, renamed over ``target`` when the block ends, removed
    if it fails: ``target`` is there whole or not at all, a kill mid-write leaves the one before, and a
    write that fails (a full disk) leaves nothing taking the room.

    ``keep``: for a cache file that other processes may write too, and map by its name meanwhile. Where
    ``target`` exists when the block ends and ``keep()`` says it is good (another process wrote it
    meanwhile), it stays, the same file, and what the block wrote is dropped: a file that processes
    have mapped is never replaced by a copy of itself. A ``target`` absent then is made only if still
    absent (a hard link; a rename where the file system has none)."""
    partial = target.with_name(f".{target.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        yield partial
        if keep is None:
            os.replace(partial, target)
        else:
            _place_unless_kept(partial, target, keep)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _place_unless_kept(partial: Path, target: Path, keep: Callable[[], bool]) -> None:
    try:
        os.link(partial, target)  # only where nothing is: two writers finishing together cannot both place theirs
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: a check, then a rename
        if not target.exists():
            os.replace(partial, target)
            return
    else:
        partial.unlink()
        return
    if keep():
        partial.unlink()
    else:
        os.replace(partial, target)  # a damaged or stale file, which no process maps


def write_whole(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` whole or not at all (:func:`whole`)."""
    with whole(target) as partial:
        partial.write_text(text, encoding="utf-8")


def cache_root() -> Path:
    """The root of built corpora and mel caches, absolute; set ``MUSICSSL_CACHE`` to move it.

    A relative ``MUSICSSL_CACHE`` is read against the working folder now: the paths built from it
    travel to other processes (a search's trials, which Ray Tune runs in their own folders)."""
    configured = os.environ.get("MUSICSSL_CACHE")
    return Path(configured).expanduser().absolute() if configured else Path.home() / ".cache" / "musicssl"


def cache_hint(error: OSError) -> str:
    """For an error writing under :func:`cache_root`: what to do about it (else an empty string)."""
    root = cache_root().absolute()
    if not isinstance(error.filename, (str, bytes, os.PathLike)):  # None, or a file descriptor
        return ""
    path = Path(os.fsdecode(error.filename)).absolute()
    if path != root and root not in path.parents:
        return ""
    return (f" (in the cache folder {root}, where corpora and mel caches are kept: set MUSICSSL_CACHE to a folder "
            "you can write, with room for them)")


# A write that fails for want of room: the disk is full (ENOSPC) or the user's quota is spent (EDQUOT).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _nearest_existing(path: str | Path) -> Path | None:
    """``path``, or the nearest folder above it that exists (None where none can be looked at)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        try:
            candidate.stat()
            return candidate
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def free_bytes(path: str | Path) -> int | None:
    """The bytes a user can still write on the file system holding ``path`` (or its nearest existing
    folder above); None where that cannot be read."""
    existing = _nearest_existing(path)
    try:
        return None if existing is None else shutil.disk_usage(existing).free
    except OSError:
        return None


def free_files(path: str | Path) -> int | None:
    """How many more files a user can make on the file system holding ``path`` (or its nearest existing
    folder above): its free inodes; None where it has no fixed count (btrfs, many network file systems) or
    it cannot be read. A disk with bytes free but no inodes left refuses new files as a full one does. A
    count of 0 is checked by making a file: some file systems report it for want of a count (FAT on some
    systems), and a file made there says otherwise (None)."""
    existing = _nearest_existing(path)
    try:
        status = None if existing is None else os.statvfs(existing)
    except (OSError, AttributeError):  # (no statvfs on Windows)
        return None
    if status is None or status.f_files == 0:
        return None
    return None if status.f_favail == 0 and _can_make_a_file(existing) else status.f_favail


def _can_make_a_file(folder: str | Path) -> bool:
    """Whether a file can be made in ``folder`` (or its nearest existing folder above): only a refusal for
    room says no."""
    existing = _nearest_existing(folder)
    if existing is None or not existing.is_dir():
        return True
    try:
        handle, name = tempfile.mkstemp(dir=existing, prefix=".musicssl-room-")
    except OSError as error:
        return error.errno not in DISK_FULL_ERRNOS
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def same_file_system(first: str | Path, second: str | Path) -> bool:
    """Whether two paths (or their nearest existing folders above) are on one file system."""
    devices = []
    for path in (first, second):
        existing = _nearest_existing(path)
        try:
            devices.append(None if existing is None else existing.stat().st_dev)
        except OSError:
            devices.append(None)
    return devices[0] is not None and devices[0] == devices[1]


def os_error_in_chain(error: BaseException, errnos: frozenset[int]) -> OSError | None:
    """The error in ``error``'s chain (it, the error it was raised from or during) that is an OSError whose
    errno is one of ``errnos``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in errnos:
            return current
        current = current.__cause__ or current.__context__
    return None


def by_file_system(needs: Iterable[tuple[str | Path, int]]) -> dict[str | Path, int]:
    """The amounts of ``needs`` (a path, an amount) added up by file system, each under the first of its paths
    (:func:`same_file_system`)."""
    totals: dict[str | Path, int] = {}
    for path, need in needs:
        disk = next((known for known in totals if known == path or same_file_system(known, path)), None)
        if disk is None:
            totals[path] = need
        else:
            totals[disk] += need
    return totals


def full_disk_error(error: BaseException) -> OSError | None:
    """The error in ``error``'s chain (it, the error it was raised from or during) that is a write which
    found no room: an OSError whose errno says the disk is full (ENOSPC) or the quota spent (EDQUOT)."""
    return os_error_in_chain(error, DISK_FULL_ERRNOS)


def disk_full(error: BaseException, path: str | Path | None = None, room: int = 0) -> bool:
    """Whether ``error`` is a write that found no room (:func:`full_disk_error`), or, for libraries that
    lose the errno (libsndfile's "System error."), one raised while the file system at ``path`` has at
    most ``room`` bytes free."""
    if full_disk_error(error) is not None:
        return True
    if path is None:
        return False
    free = free_bytes(path)
    return free is not None and free <= room


def size_text(size: float) -> str:
    """A byte count for people: ``512 B``, ``3.4 MB``, ``61 TB`` (powers of 1000, as disks are sold; three
    figures at most below 1000 TB, so 999,999 bytes are ``1.0 MB``)."""
    size = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        text = f"{size:.0f}" if unit == "B" or abs(size) >= 99.95 else f"{size:.1f}"
        if abs(float(text)) < 1000 or unit == "TB":
            return f"{text} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _owner_tag() -> str:
    """``HOST~PID~``: which process a staging folder is of (a cache may be shared by machines)."""
    host = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())[:32] or "host"
    return f"{host}~{os.getpid()}~"


def staging_folder(parent: str | Path, prefix: str) -> Path:
    """A new hidden folder in ``parent`` to build something in and rename into place when it is whole,
    with the mode ``mkdir`` would give it (``tempfile.mkdtemp`` makes it 0700, and a corpus or note bank
    renamed from it could not be read by the others of a group sharing the cache). Its name is
    ``prefix``, the host and process that build in it, and a random part; a build killed before it
    could remove it (SIGKILL, out of memory) leaves it, and :func:`remove_abandoned_staging` removes
    such folders once their process is gone and an hour has passed without a change in them."""
    folder = Path(tempfile.mkdtemp(prefix=prefix + _owner_tag(), dir=parent))
    os.chmod(folder, 0o777 & ~_umask())
    return folder


STALE_STAGING_SECONDS = 3600.0


def remove_abandoned_staging(parent: str | Path, prefix: str, min_age: float = STALE_STAGING_SECONDS) -> list[Path]:
    """Remove the staging folders ``parent/prefix*`` that a process of this host made, that is no longer
    running (see :func:`staging_folder`), and in which nothing has changed for ``min_age`` seconds;
    returns them. Those of other hosts, of running processes (a build of the same thing at the same
    time) and recent ones are left alone: containers that share a host name and a cache, each with
    its own process ids, see no process of the others."""
    host_tag = _owner_tag().split("~")[0]
    removed = []
    try:
        candidates = [path for path in Path(parent).iterdir() if path.name.startswith(prefix) and path.is_dir()]
    except OSError:
        return removed
    now = time.time()
    for path in candidates:
        host, _, rest = path.name[len(prefix):].partition("~")
        pid, _, _ = rest.partition("~")
        if host != host_tag or not pid.isdigit() or int(pid) == os.getpid() or _process_runs(int(pid)):
            continue
        try:  # a build adds files to the folder and to its subfolders (audio/, midi/)
            changed = max(entry.stat().st_mtime for entry in (path, *path.iterdir()) if entry.is_dir())
        except OSError:
            continue
        if now - changed < min_age:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def missing_folders(folder: str | Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first: what making it creates."""
    folder = Path(folder)
    return [path for path in (folder, *folder.parents) if not path.exists()]


def make_writable_folder(folder: str | Path) -> list[Path]:
    """Make ``folder`` (and its parents) and check that a file can be written in it; raise ``OSError``
    when not. Returns the folders that did not exist before, deepest first (see :func:`remove_if_empty`)."""
    folder = Path(folder)
    made = missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    return made


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty: those a failed command made."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


class FolderTaken(Exception):
    """The output folder holds earlier results or another run is writing there; the message says which."""


@dataclass
class ClaimedFolder:
    """An output folder this process writes into, locked against other runs until :meth:`release`."""

    path: Path
    made: list[Path] = field(default_factory=list)  # the folders claiming it created, deepest first
    _handle: IO | None = None

    def release(self, remove_if_unused: bool = False) -> None:
        """Unlock (the lock goes with the process too, if it dies); with ``remove_if_unused``, remove the
        folders the claim made if they are still empty (a run that failed before it wrote anything)."""
        if self._handle is not None:
            (self.path / CLAIM_FILE).unlink(missing_ok=True)
            self._handle.close()
            self._handle = None
        if remove_if_unused:
            remove_if_empty(self.made)


def claim_folder(folder: str | Path, taken: Callable[[Path], str | None], numbered: bool = False) -> ClaimedFolder:
    """Make ``folder`` and lock it for this process's results, so that two runs never write into one folder.

    ``taken(path)`` says why ``path`` cannot take the results (earlier results there), or None; it is
    asked again once the lock is held (a run may have finished there in between). With ``numbered``
    (a default name, e.g. one with the time, that another run started in the same second may hold),
    ``folder-2``, ``folder-3``, ... are tried instead; else a taken folder raises :class:`FolderTaken`.
    ``OSError`` when the folder cannot be made or written.
    """
    folder = Path(folder)
    number = 1
    while True:
        candidate = folder if number == 1 else folder.with_name(f"{folder.name}-{number}")
        number += 1
        problem = taken(candidate)
        if problem is None:
            made = make_writable_folder(candidate)
            handle = _lock_claim_file(candidate / CLAIM_FILE)
            if handle is None:
                problem = "another run is writing its results there now; give another folder"
            else:
                problem = taken(candidate)
                if problem is None:
                    return ClaimedFolder(candidate, made, handle)
                (candidate / CLAIM_FILE).unlink(missing_ok=True)
                handle.close()
        if not numbered or not candidate.exists():  # (a folder that cannot be made is no better numbered)
            raise FolderTaken(problem)


def _lock_claim_file(path: Path) -> IO | None:
    """``path`` opened and locked exclusively, or None while another process holds it. A holder deletes
    the file as it releases it, so a lock taken on a file since deleted (opened before the deletion,
    locked after) is no claim: it is taken again on the file now at ``path``. Where the file system
    cannot lock files, the file is returned unlocked and a warning says so."""
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except OSError as error:  # a file system that cannot lock files (some NFS or Lustre mounts)
            logger.warning("%s: this file system cannot lock files (%s); do not write two runs into this folder "
                           "at once", path.parent, error.strerror or error)
            return handle
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(handle.fileno())
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return handle
        handle.close()
