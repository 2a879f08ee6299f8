"""What the command lines share: errors in one line."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["ArgumentParser", "counted", "int_in", "listed", "parse_mixed", "quiet_ctrl_c_while_starting",
           "silence_closed_output"]

_starting_prog: str | None = None


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    os.write(2, f"\n{_starting_prog}: interrupted\n".encode())
    os._exit(130)  # nothing is made before the arguments are read: nothing to clean up


def quiet_ctrl_c_while_starting(prog: str) -> None:
    """For a command's module run as ``__main__``, called before its heavy imports (torch and
    Lightning take seconds): a Ctrl-C until its :class:`ArgumentParser` reads the arguments ends the
    process with one line, ``PROG: interrupted``, and exit 130, not a traceback of the import under
    way. Reading the arguments puts Python's own handler back, and the command's handling with it."""
    global _starting_prog
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _starting_prog = prog
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def silence_closed_output(stream: Any = None) -> None:
    """After a BrokenPipeError (the output piped into a command that stopped reading, ``| head``): what is
    written to ``stream`` (standard output by default) from now on goes to the null device, Python's flush
    at exit included, so that no later write raises."""
    stream = sys.stdout if stream is None else stream
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no descriptor (a stream in memory): nothing to do
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, stream.fileno())
        finally:
            os.close(null)


def _started() -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose misuse errors are one line, ``PROG: error: MESSAGE``, exit code 2,
    without the usage block argparse prints first (``--help`` shows it). Errors that need the list of
    options (a missing or unknown argument) point to ``--help``."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        _started()
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith(("the following arguments are required", "unrecognized arguments")):
            message += f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_mixed(parser: argparse.ArgumentParser, arguments: Sequence[str], positional: str) -> argparse.Namespace:
    """``parser``'s arguments with its one list of positional arguments (``positional``, its ``dest``) before,
    between or after the options, and after a ``--`` those that follow it, as they come (a path named like an
    option). argparse alone does not do both: ``parse_intermixed_args`` takes no ``--``, and ``parse_args``
    leaves ``A --opt X -- B`` with B unrecognized."""
    arguments = list(arguments)
    if "--" not in arguments:
        return parser.parse_intermixed_args(arguments)
    cut = arguments.index("--")
    args = parser.parse_intermixed_args(arguments[:cut])
    setattr(args, positional, [*(getattr(args, positional) or []), *arguments[cut + 1:]])
    return args


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (and <= ``high``); argparse names the flag."""
    wanted = f"an integer >= {low}" if high is None else f"an integer in {low}-{high}"
    if (low, high) == (1, None):
        wanted = "a positive integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``1 trial``, ``64 trials``: a count with its noun in the number it needs (``plural`` where it is not
    the noun and an s)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def listed(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``: names in a sentence."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
