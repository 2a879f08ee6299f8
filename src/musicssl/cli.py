"""What the command lines share: errors in one line."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["ArgumentParser"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose misuse errors are one line, ``PROG: error: MESSAGE``, exit code 2,
    without the usage block argparse prints first (``--help`` shows it). Errors that need the list of
    options (a missing or unknown argument) point to ``--help``."""

    def error(self, message: str) -> NoReturn:
        if message.startswith(("the following arguments are required", "unrecognized arguments")):
            message += f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")
