"""``python -m musicssl.corpus --tracks N --out DIR [--seed S] [--seconds 30] [--workers W]``."""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below (numpy, scipy, pretty_midi): a Ctrl-C meanwhile is one line
    from musicssl.cli import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting("python -m musicssl.corpus")

import argparse
import errno
import sys
from collections.abc import Callable
from pathlib import Path

from musicssl.cli import ArgumentParser
from musicssl.corpus.build import (
    MAX_SECONDS,
    MIN_SECONDS,
    MIN_TRACKS,
    CorpusConfig,
    CorpusError,
    build_corpus,
)
from musicssl.corpus.render import default_workers
from musicssl.interrupts import exit_code, sigterm_interrupts


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m musicssl.corpus",
        description="Build the embedded tagged-music corpus: composed multi-track songs rendered from a General MIDI "
        "SoundFont, with exact style/instrument/drums/mood/tempo tags, split 70/10/20 by track.",
    )
    parser.add_argument("--tracks", type=int, default=600, help=f"number of songs (>= {MIN_TRACKS}; default 600)")
    parser.add_argument("--out", type=_folder, required=True, help="output folder (new or empty); gets audio/, midi/, tracks.csv")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed: same seed, same songs, tags and splits; the same audio on CPUs of one "
                        "instruction set (README, 'The embedded corpus') (default 0)")
    parser.add_argument("--seconds", type=float, default=30.0, help=f"length of each song, {MIN_SECONDS:g}-{MAX_SECONDS:g} s (default 30)")
    parser.add_argument("--workers", type=int, default=None, help=f"parallel processes (default: one per CPU, here {default_workers()})")
    parser.add_argument("--cache-dir", type=_cache_folder, default=None, help="where the rendered note bank is kept (default $MUSICSSL_CACHE or ~/.cache/musicssl)")
    parser.add_argument("--force", action="store_true", help="replace a corpus already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _non_empty_folder(fix: str) -> Callable[[str], Path]:
    """A folder argument that may not be empty: an unset shell variable would be the current folder."""

    def folder(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"empty; {fix}")
        return Path(text)

    return folder


_folder = _non_empty_folder("give the folder the corpus goes in (new or empty)")  # --out
_cache_folder = _non_empty_folder("give the folder the note bank is kept in, or leave --cache-dir out")


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is (device, inode, change time), or None when there is none."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns


def _folder_problem(error: OSError, args) -> str:
    """What a failed write of the build says: the flag whose folder it is, and why (a file in the way is named as
    such: "File exists" did not say which)."""
    failed = Path(str(error.filename or "")).expanduser()
    flag = next((flag for flag, value in (("--cache-dir", args.cache_dir), ("--out", args.out)) if value is not None
                 and (failed == Path(value).expanduser() or Path(value).expanduser() in failed.parents)), None)
    why = error.strerror or str(error)
    if error.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder is to be made, or on the way to it
        why = "a file is in the way of the folder to be made"
    if flag:
        return f"{flag} {failed}: {why}; give {flag} a folder you can write in"
    return f"{failed}: {why}; give --out and --cache-dir folders you can write in"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        config = CorpusConfig(tracks=args.tracks, seconds=args.seconds, seed=args.seed)
    except CorpusError as error:  # it names the setting, which is the flag: "tracks must be ..."
        parser.error(f"--{error}")
    index_file = Path(args.out).expanduser() / "tracks.csv"
    before = _identity(index_file)
    try:
        with sigterm_interrupts():  # a SIGTERM (kill, timeout, a batch scheduler) cleans up as Ctrl-C does
            report = build_corpus(args.out, config, workers=args.workers, bank_cache_dir=args.cache_dir,
                                  progress=not args.quiet, force=args.force)
    except CorpusError as error:
        parser.error(str(error))
    except OSError as error:  # a folder that cannot be made or written (--out, --cache-dir)
        parser.error(_folder_problem(error, args))
    except KeyboardInterrupt as stop:  # exit 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
        after = _identity(index_file)
        if after is not None and after != before:  # it came as the corpus was moved into place, and took effect after
            said = f"interrupted as the corpus was put in place; it is complete in {index_file.parent}"
        elif after is not None:
            said = "interrupted; the corpus in --out is as it was"
        else:
            said = "interrupted; nothing was left in --out"
        print(f"\n{parser.prog}: {said}", file=sys.stderr)
        return exit_code(stop)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
