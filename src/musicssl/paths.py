"""Where the toolkit keeps what it builds: ``$MUSICSSL_CACHE`` (default ``~/.cache/musicssl``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "make_writable_folder", "missing_folders", "remove_if_empty"]


def cache_root() -> Path:
    """The root of built corpora and mel caches; set ``MUSICSSL_CACHE`` to move it."""
    configured = os.environ.get("MUSICSSL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "musicssl"


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
