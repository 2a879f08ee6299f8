"""Ctrl-C and SIGTERM in the toolkit's commands and in the worker processes they start.

A command ends on either signal with one line and the exit code a shell reports for it (130 for
Ctrl-C, 143 for SIGTERM), leaving nothing half-written. Its worker processes stay quiet: Ctrl-C,
which a terminal sends to every process of the foreground job, is the parent's to handle, so a
worker ignores it; the parent then ends the workers. Python modules only (no torch): the corpus
build's forked workers import this module.

- :class:`Interrupted`: the ``KeyboardInterrupt`` a command raises for either signal, with its number.
- :func:`sigterm_interrupts`: while the block runs, SIGTERM raises :class:`Interrupted` as Ctrl-C
  raises ``KeyboardInterrupt``.
- :func:`held_signals`: both signals wait while a block runs (processes start, results are written)
  and take effect when it ends.
- :func:`quiet_worker`: what a worker process does first.
- :class:`SpawnPool`: a spawned ``ProcessPoolExecutor`` built on the three above, which the parent
  can end at once (:meth:`SpawnPool.terminate`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = ["Interrupted", "SpawnPool", "exit_code", "held_signals", "interrupts_kept", "quiet_worker",
           "sigterm_interrupts"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")  # not on Windows


class Interrupted(KeyboardInterrupt):
    """A command stopped by Ctrl-C (``signum`` SIGINT) or by a SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    def __reduce__(self):  # pickled or copied by its signal, not by its message
        return type(self), (self.signum,)


def exit_code(stop: KeyboardInterrupt) -> int:
    """The exit status a shell reports for the signal that raised ``stop``: 130 (Ctrl-C) or 143 (SIGTERM)."""
    return 128 + int(getattr(stop, "signum", signal.SIGINT))


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _restore_handlers(handlers: dict[int, Any]) -> BaseException | None:
    """Set each signal's handler back, whatever comes meanwhile: a handler set back runs at once for
    a signal that is pending (``signal.signal`` itself runs pending handlers before it sets
    anything), and one that raises would leave the others unset. Returns the first exception so
    raised, for the caller to raise once all are set, or None."""
    raised: BaseException | None = None
    while True:
        try:
            for signum, handler in handlers.items():
                if signal.getsignal(signum) is not handler:
                    signal.signal(signum, handler)
            return raised
        except BaseException as error:  # noqa: BLE001 - e.g. the KeyboardInterrupt of a pending Ctrl-C
            raised = raised or error


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
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_interrupted)
        yield
    finally:
        raised = _restore_handlers({signal.SIGTERM: signal.SIG_DFL if previous is None else previous})
        if raised is not None:
            raise raised


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """A stop (Ctrl-C, SIGTERM) raised inside the standard library's lock handling while an earlier
    one unwinds it can surface as ``RuntimeError: release unlocked lock``: a second Ctrl-C as the first
    left a pool's result wait (``imap_unordered``) ended the corpus build with exit 1 and a traceback.
    Such an error, with a stop among the exceptions it was raised in handling, is raised again as
    that stop (:class:`Interrupted`)."""
    try:
        yield
    except RuntimeError as error:
        context: BaseException | None = error.__context__
        seen = 0
        while context is not None and not isinstance(context, KeyboardInterrupt) and seen < 16:
            context, seen = context.__context__, seen + 1
        if not isinstance(context, KeyboardInterrupt):
            raise
        raise Interrupted(getattr(context, "signum", signal.SIGINT)) from error


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the block runs and take effect as it ends.

    They are blocked in the kernel for the calling thread, so a process started in the block starts
    with them blocked and a signal meant for it waits until :func:`quiet_worker` has set its
    handlers: a Ctrl-C that reached a spawned worker while Python started in it printed a
    ``KeyboardInterrupt`` traceback. Their Python handlers (which run in the main thread whichever
    thread the kernel delivers a signal to) are deferred too: a Ctrl-C that interrupted
    ``ProcessPoolExecutor.submit`` half-way left a pool whose shutdown failed with ``RuntimeError:
    cannot join thread before it is started`` (exit 1). When the block ends, each signal that came
    is passed to its handler once, SIGTERM first, with the handler's usual effect there
    (``KeyboardInterrupt`` for Ctrl-C); if more than one raises, the first is raised.

    multiprocessing's resource tracker unblocks both signals when it starts a tracker process, so a
    block that starts spawned processes should make sure the tracker runs before it (as
    :class:`SpawnPool` does).
    """
    deferred: dict[int, Any] = {}
    handlers: dict[int, Callable[..., Any]] = {}
    # Read first, blocked inside the try: a pending handler that runs (and raises) as the mask call
    # returns must not leave both signals blocked with no one to unblock them.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, []) if _CAN_BLOCK else None
    try:
        if _CAN_BLOCK:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                handler = signal.getsignal(signum)
                if callable(handler):
                    handlers[signum] = handler  # before the swap, so that it is set back whatever happens
                    signal.signal(signum, lambda number, frame: deferred.setdefault(number, frame))
        yield
    finally:
        if _CAN_BLOCK:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what waited in the kernel reaches `deferred` here
        restoring = _restore_handlers(handlers)
        replayed: list[BaseException] = []
        for signum in sorted(deferred, key=lambda number: number != signal.SIGTERM):
            try:
                handlers[signum](signum, deferred[signum])
            except BaseException as error:  # noqa: BLE001 - raised below, once every handler has run
                replayed.append(error)
        if replayed or restoring is not None:
            raise replayed[0] if replayed else restoring


def quiet_worker(parent: int | None = None) -> None:
    """The first thing a worker process does: Ctrl-C ignored (its parent gets it too, and ends the
    workers), SIGTERM at its default (the parent's way to end a worker: a handler inherited from a
    forked parent turned it into Ctrl-C, and the worker printed a traceback), then both unblocked
    (a worker started under :func:`held_signals` starts with them blocked: a Ctrl-C that came since
    is dropped here, a SIGTERM ends the worker). Given ``parent`` (the pid of the process that starts
    the workers), the worker ends once that process is gone (:func:`_end_with_parent`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if parent is not None:
        _end_with_parent(parent)


PARENT_CHECK_SECONDS = 1.0  # how often a pool's worker looks whether the process that started it is alive


def _end_with_parent(parent: int) -> None:
    """End this worker once ``parent``, the process that started it, is gone (killed: ``kill -9``, out of
    memory), as its pool can then no longer end it: before, its workers lived on, holding their memory and
    the caller's output pipes. The orphan's parent becomes another process (init, or a subreaper)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _start_spawned_worker(initializer: Callable[..., Any] | None, initargs: tuple, parent: int | None = None) -> None:
    quiet_worker(parent)
    if initializer is not None:
        initializer(*initargs)


def _ensure_resource_tracker() -> None:
    if os.name == "posix":  # it unblocks Ctrl-C and SIGTERM when it starts its process: not inside a held block
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()


class SpawnPool(ProcessPoolExecutor):
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes (spawn, not fork: the caller may hold
    threads, torch's or Ray's, that a forked child would inherit half-dead) that stay quiet on Ctrl-C.

    Each worker runs :func:`quiet_worker`, then ``initializer(*initargs)``. Processes start in
    :meth:`submit` (Python 3.11 spawns them as work comes), under :func:`held_signals`. A worker
    ignores Ctrl-C, so a parent that stops on it must end the workers: :meth:`terminate` does so at
    once; ``shutdown()`` waits for the work in flight. Spawned workers import the caller's
    ``__main__``, so a script that uses a pool needs ``if __name__ == "__main__":``.

    ``shutdown(wait=True)`` and :meth:`terminate` also end where ``ProcessPoolExecutor`` would wait
    forever: when a worker dies (killed, or out of memory) while it sends back a result, the pool's
    thread waits for the rest of that message on a pipe that this process still holds open for
    writing (and so do the other workers, which wait for work that thread no longer sends). The
    other workers are then ended, as that thread would have done, this process's end of the pipe is
    closed, the thread reads the end of the pipe, and the work in flight fails with
    ``BrokenProcessPool``. (A caller waiting on a future of such a pool, outside these two, still
    waits: that is ``ProcessPoolExecutor``'s own.)
    """

    def __init__(self, workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> None:
        super().__init__(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_spawned_worker,
            initargs=(initializer, tuple(initargs), os.getpid()),
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        _ensure_resource_tracker()
        with held_signals():
            return super().submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        state = self._state()
        super().shutdown(wait=False, cancel_futures=cancel_futures)
        if wait:
            self._settle(*state)

    def terminate(self) -> None:
        """End the pool now: work not started is cancelled and the workers are killed (SIGKILL: a
        worker still starting holds SIGTERM blocked). When this returns (also when a Ctrl-C comes
        meanwhile), the workers have ended and every future is done (the work in flight with
        ``BrokenProcessPool``)."""
        state = self._state()
        try:
            with held_signals():
                super().shutdown(wait=False, cancel_futures=True)
                for process in state[1]:
                    process.kill()
        finally:
            self._settle(*state)

    def _state(self) -> tuple:
        """What ``shutdown()`` forgets: the pool's thread, its processes, its result queue and its work."""
        return (getattr(self, "_executor_manager_thread", None), list((getattr(self, "_processes", None) or {}).values()),
                getattr(self, "_result_queue", None), getattr(self, "_pending_work_items", None) or {})

    @staticmethod
    def _settle(manager: threading.Thread | None, processes: list, results: Any, pending: dict) -> None:
        """Wait for the pool's thread, which reaps the workers (reaping them here beside it could
        report one as still alive) and settles the futures. When a worker has died with work in
        flight and the thread has not seen it (it waits for the rest of that worker's result), end
        the other workers as the thread would, then close this process's end of the result pipe
        (see the class docstring)."""
        while manager is not None and manager.is_alive():
            manager.join(0.2)
            if not manager.is_alive():
                break
            ended = _ended(processes)
            if 0 < ended < len(processes) and getattr(manager, "pending_work_items", None):
                for process in processes:
                    process.kill()
                _wait_ended(processes)
                ended = _ended(processes)
            writer = getattr(results, "_writer", None)
            if ended == len(processes) and writer is not None and not writer.closed:
                writer.close()  # the thread was left waiting for the rest of a result that will not come
        for process in processes:
            if process.is_alive():  # the pool's thread has reaped them all, unless it never ran
                process.kill()
            process.join()
        if manager is None or manager.ident is None:  # no thread ran to settle the futures
            for item in list(pending.values()):
                future = item.future
                if not future.done() and not future.cancel():
                    future.set_exception(BrokenProcessPool("the pool ended before this work was done"))
        if results is not None:
            results.close()


def _ended(processes: list) -> int:
    """How many of the processes have ended, seen on their sentinels (which does not reap them)."""
    from multiprocessing.connection import wait as wait_for

    return len(wait_for([process.sentinel for process in processes], timeout=0))


def _wait_ended(processes: list, timeout: float = 5.0) -> bool:
    """Wait until every process has ended (killed just before); whether they all did."""
    import time

    deadline = time.monotonic() + timeout
    while _ended(processes) < len(processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
