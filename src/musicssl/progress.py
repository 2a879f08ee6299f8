"""Progress of long work: a tqdm bar on a terminal (or in a notebook), plain lines elsewhere.

A tqdm bar redraws itself with carriage returns. Where the output is a file (``> log 2>&1``, a batch
job's log) those redraws pile up into one long line that ``less`` and ``grep`` show as noise. There,
:func:`progress_bar` writes a plain line instead: at most one every :data:`LINE_INTERVAL` seconds while
the work goes on (``MUSICSSL_PROGRESS_SECONDS`` sets another interval), and one when it ends, with what was
done, the time taken and, on the way, the time left.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Any, TextIO

__all__ = ["INTERVAL_VARIABLE", "LINE_INTERVAL", "LineProgress", "format_seconds", "line_interval", "progress_bar",
           "redraws"]

LINE_INTERVAL = 30.0
"""Seconds between two lines of a :class:`LineProgress` while its work goes on, unless the environment
variable :data:`INTERVAL_VARIABLE` gives others (0: a line at every step)."""
INTERVAL_VARIABLE = "MUSICSSL_PROGRESS_SECONDS"


def line_interval() -> float:
    """The seconds between two progress lines: :data:`INTERVAL_VARIABLE` where it is set to a number >= 0 (else a
    warning that names it, and :data:`LINE_INTERVAL`)."""
    text = os.environ.get(INTERVAL_VARIABLE, "").strip()
    if not text:
        return LINE_INTERVAL
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        warnings.warn(f"{INTERVAL_VARIABLE}={text!r} is not a number of seconds >= 0; progress lines come every "
                      f"{LINE_INTERVAL:g} s", RuntimeWarning, stacklevel=3)
        return LINE_INTERVAL
    return seconds


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (tqdm.auto's test: its bars are widgets there)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # an IPython without a shell, or one whose config cannot be read: not a notebook
        return False


def redraws(stream: TextIO | None = None) -> bool:
    """Whether a bar drawn on ``stream`` (standard error by default) can redraw itself in place: the
    stream is a terminal, or this is a notebook."""
    stream = sys.stderr if stream is None else stream
    try:
        terminal = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        terminal = False
    return terminal or _in_notebook()


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 4 min``: a duration as a person reads it in a log."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class LineProgress:
    """A progress report in plain lines, with the part of tqdm's interface the commands use (``update``,
    ``set_postfix``, ``set_description``, ``close``, a ``with`` block).

    A line is written when ``interval`` seconds (default :func:`line_interval`) have passed since the last (or
    since the start), at an update, and one when the work ends (``close``)::

        mel cache: 120/1000 tracks (12%), 35 s, about 4 min 16 s left, skipped=2
        mel cache: 1000/1000 tracks in 4 min 51 s, skipped=2

    Work that ends before the total (an error, Ctrl-C) ends with ``stopped at 120/1000 tracks after 35 s``.
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
                 file: TextIO | None = None, interval: float | None = None, clock=time.monotonic) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.disable = disable
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._file = file
        self._interval = line_interval() if interval is None else interval
        self._clock = clock
        self._start = self._last = clock()
        self._closed = False

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        done = self.total is not None and self.n >= self.total  # the line at the end (close) says it
        if not self.disable and not done and self._clock() - self._last >= self._interval:
            self._write(self._line(final=False))

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable:
            self._write(self._line(final=True))

    def _count(self) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        if not self.unit:
            return count
        one = (self.total if self.total is not None else self.n) == 1
        unit = self.unit if one or self.unit == "it" or self.unit.endswith("s") else f"{self.unit}s"
        return f"{count} {unit}"

    def _line(self, final: bool) -> str:
        elapsed = self._clock() - self._start
        head = f"{self.desc}: " if self.desc else ""
        extra = "".join(f", {key}={value}" for key, value in self.postfix.items())
        if final and (self.total is None or self.n >= self.total):
            return f"{head}{self._count()} in {format_seconds(elapsed)}{extra}"
        if final:
            return f"{head}stopped at {self._count()} after {format_seconds(elapsed)}{extra}"
        text = f"{head}{self._count()}"
        if self.total:
            text += f" ({100 * self.n // self.total}%)"
        text += f", {format_seconds(elapsed)}"
        if self.total and 0 < self.n < self.total:
            text += f", about {format_seconds(elapsed / self.n * (self.total - self.n))} left"
        return text + extra

    def _write(self, line: str) -> None:
        self._last = self._clock()
        stream = sys.stderr if self._file is None else self._file
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError, AttributeError):
            # Closed, broken, or none (sys.stderr is None in a process started with it closed): the work goes on
            # without its report.
            pass


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
                 file: TextIO | None = None, **tqdm_options: Any) -> Any:
    """A tqdm bar where it can redraw itself (a terminal, a notebook: tqdm.auto's choice of bar), else a
    :class:`LineProgress`. ``tqdm_options`` (``mininterval``, ``dynamic_ncols``, ...) go to tqdm only."""
    if disable:
        return LineProgress(total, desc, unit, disable=True)
    if redraws(sys.stderr if file is None else file):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=file, **tqdm_options)
    return LineProgress(total, desc, unit, file=file)
