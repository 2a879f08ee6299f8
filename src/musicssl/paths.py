"""Where the toolkit keeps what it builds: ``$MUSICSSL_CACHE`` (default ``~/.cache/musicssl``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """The root of built corpora and mel caches; set ``MUSICSSL_CACHE`` to move it."""
    configured = os.environ.get("MUSICSSL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "musicssl"
