"""Ctrl-C and SIGTERM in the toolkit's commands and in the worker processes they start.

A command ends on either signal with one line and the exit code a shell reports for it (130 for
Ctrl-C, 143 for SIGTERM), leaving nothing half-written. Its worker processes stay quiet: Ctrl-C,
which a terminal sends to every process of the foreground job, is the parent's to handle, so a
worker ignores it; the parent then ends the workers. Python modules only (no torch): the corpus
build's forked workers import this module.

- :class:`Interrupted`: the ``KeyboardInterrupt`` a command raises for either signal, with its number.
- :func:`sigterm_interrupts`: while the block runs, SIGTERM raises :class:`Interrupted` as Ctrl-C
  raises ``KeyboardInterrupt``.
- :func:`held_signals`: both signals wait while processes start, and take effect when it ends.
- :func:`quiet_worker`: what a worker process does first.
- :class:`SpawnPool`: a spawned ``ProcessPoolExecutor`` built on the three above, which the parent
  can end at once (:meth:`SpawnPool.terminate`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

__all__ = ["Interrupted", "SpawnPool", "held_signals", "quiet_worker", "sigterm_interrupts"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")  # not on Windows


class Interrupted(KeyboardInterrupt):
    """A command stopped by Ctrl-C (``signum`` SIGINT) or by a SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def exit_code(stop: KeyboardInterrupt) -> int:
    """The exit status a shell reports for the signal that raised ``stop``: 130 (Ctrl-C) or 143 (SIGTERM)."""
    return 128 + int(getattr(stop, "signum", signal.SIGINT))


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, a SIGTERM (``kill``, ``timeout``, a batch scheduler) raises
    ``Interrupted(SIGTERM)`` where Ctrl-C would raise ``KeyboardInterrupt``, so a command ends on it
    as it does on Ctrl-C: one line, its folders cleaned up, exit 143 (:func:`exit_code`). Without it,
    Python ends at once, without a word and with whatever it had made left behind. Off the main
    thread, where Python cannot handle signals, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the block runs (it starts processes) and take effect as it ends.

    They are blocked in the kernel for the calling thread, so a process started in the block starts
    with them blocked and a signal meant for it waits until :func:`quiet_worker` has set its
    handlers: a Ctrl-C that reached a spawned worker while Python started in it printed a
    ``KeyboardInterrupt`` traceback. Their Python handlers (which run in the main thread whichever
    thread the kernel delivers a signal to) are deferred too: a Ctrl-C that interrupted
    ``ProcessPoolExecutor.submit`` half-way left a pool whose shutdown failed with ``RuntimeError:
    cannot join thread before it is started`` (exit 1). A deferred signal is passed to its handler
    when the block ends, with the handler's usual effect there (``KeyboardInterrupt`` for Ctrl-C).
    """
    deferred: list[tuple[int, Any]] = []
    handlers: dict[int, Callable[..., Any]] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                handlers[signum] = handler
                signal.signal(signum, lambda number, frame: deferred.append((number, frame)))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if _CAN_BLOCK else None
    try:
        yield
    finally:
        if _CAN_BLOCK:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what waited in the kernel reaches `deferred` here
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum, frame in deferred:
            handlers[signum](signum, frame)


def quiet_worker() -> None:
    """The first thing a worker process does: Ctrl-C ignored (its parent gets it too, and ends the
    workers), SIGTERM at its default (the parent's way to end a worker: a handler inherited from a
    forked parent turned it into Ctrl-C, and the worker printed a traceback), then both unblocked
    (a worker started under :func:`held_signals` starts with them blocked: a Ctrl-C that came since
    is dropped here, a SIGTERM ends the worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _start_spawned_worker(initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    quiet_worker()
    if initializer is not None:
        initializer(*initargs)


class SpawnPool(ProcessPoolExecutor):
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes (spawn, not fork: the caller may hold
    threads, torch's or Ray's, that a forked child would inherit half-dead) that stay quiet on Ctrl-C.

    Each worker runs :func:`quiet_worker`, then ``initializer(*initargs)``. Processes start in
    :meth:`submit` (Python 3.11 spawns them as work comes), under :func:`held_signals`. A worker
    ignores Ctrl-C, so a parent that stops on it must end the workers: :meth:`terminate` does so at
    once; a plain ``shutdown()`` waits for the work in flight. Spawned workers import the caller's
    ``__main__``, so a script that uses a pool needs ``if __name__ == "__main__":``.
    """

    def __init__(self, workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> None:
        super().__init__(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_spawned_worker,
            initargs=(initializer, tuple(initargs)),
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with held_signals():
            return super().submit(fn, *args, **kwargs)

    def terminate(self) -> None:
        """End the pool now: work not started is cancelled, the workers get a SIGTERM and are waited for."""
        processes = list((getattr(self, "_processes", None) or {}).values())
        with held_signals():
            self.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                if process.is_alive():
                    process.terminate()
        for process in processes:
            process.join(10)
