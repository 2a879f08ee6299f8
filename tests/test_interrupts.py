"""Ctrl-C and SIGTERM: held while processes start, SIGTERM as an interrupt, quiet spawned workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from musicssl.interrupts import Interrupted, exit_code, held_signals, sigterm_interrupts


def test_held_signals_defer_ctrl_c_and_sigterm_to_the_end_of_the_block():
    # Python's own Ctrl-C handler, whatever this process started with (a background job of a script
    # starts with Ctrl-C ignored).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with held_signals():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # time for a handler to run, were it not held
                reached.append("after the signal")
        assert reached == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)

    calls = []

    def handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with held_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert calls == []
        assert calls == [signal.SIGTERM]  # once, when the block ended
        assert signal.getsignal(signal.SIGTERM) is handler
        if hasattr(signal, "pthread_sigmask"):
            assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interrupt_keeps_its_signal_when_pickled_or_copied():
    import copy
    import pickle

    for stop in (pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM))), copy.copy(Interrupted(signal.SIGTERM))):
        assert type(stop) is Interrupted and stop.signum == signal.SIGTERM and exit_code(stop) == 143


def test_held_signals_pass_a_sigterm_first_when_both_came():
    """Signals waiting in the kernel reach Python in the order of their numbers (SIGINT 2, SIGTERM 15);
    a command stopped by a SIGTERM should say so (exit 143), whatever came beside it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted) as raised:
            with sigterm_interrupts(), held_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert exit_code(raised.value) == 143
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_interrupts_raises_an_interrupt_that_exits_143_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as raised:
        with sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted long before
    assert isinstance(raised.value, KeyboardInterrupt) and raised.value.signum == signal.SIGTERM
    assert exit_code(raised.value) == 143 and exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is previous


SPAWNED = """
import os, signal, sys, time
from musicssl.interrupts import SpawnPool

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with Ctrl-C ignored
    pool = SpawnPool(2)
    # In a worker: Ctrl-C ignored, SIGTERM at its default, neither left blocked.
    state = pool.submit(signal.getsignal, signal.SIGINT).result(), pool.submit(signal.getsignal, signal.SIGTERM).result()
    mask = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result()
    assert state == (signal.SIG_IGN, signal.SIG_DFL) and not {signal.SIGINT, signal.SIGTERM} & mask, (state, mask)
    pool.shutdown()
    for delay in (0.0, 0.005, 0.01, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1) * 2:
        pool = SpawnPool(2)
        started = time.monotonic()
        try:
            futures = [pool.submit(time.sleep, 30) for _ in range(3)]  # the workers start now
            time.sleep(delay)
            os.killpg(0, signal.SIGINT)  # Ctrl-C in a terminal: to every process of the job
            time.sleep(5)
            sys.exit("the Ctrl-C did not reach the parent")
        except KeyboardInterrupt:
            pool.terminate()
        assert time.monotonic() - started < 10, "terminate() waited for the work in flight"
        assert all(future.cancelled() or future.done() for future in futures)
    import multiprocessing
    assert multiprocessing.active_children() == []
    # A Ctrl-C in the middle of submit, as the pool's thread is made but not yet started, left a pool
    # whose thread never started: no later work ran, and a plain pool's shutdown raised RuntimeError
    # ("cannot join thread before it is started"). It now comes as submit returns.
    import concurrent.futures.process as executor_module
    start = executor_module._ExecutorManagerThread.start

    def ctrl_c_then_start(thread):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        start(thread)

    executor_module._ExecutorManagerThread.start = ctrl_c_then_start
    pool = SpawnPool(1)
    try:
        pool.submit(abs, -3)
        sys.exit("the Ctrl-C did not come in submit")
    except KeyboardInterrupt:
        pass
    executor_module._ExecutorManagerThread.start = start
    assert pool.submit(abs, -4).result(timeout=30) == 4  # the pool is whole
    pool.shutdown()
    assert multiprocessing.active_children() == []
    print("ok")
"""


def test_spawned_workers_stay_quiet_on_a_ctrl_c_that_comes_as_they_start_and_terminate_ends_them():
    """A Ctrl-C reaches every process of the job. A spawned worker that got it while Python started in
    it printed a KeyboardInterrupt traceback (1-4 per Ctrl-C within 50 ms of the pool's first
    submit, with the mel cache's workers, which ignored Ctrl-C only once started), and a Ctrl-C in
    the middle of ``submit`` left a pool whose shutdown raised RuntimeError."""
    process = subprocess.Popen([sys.executable, "-c", SPAWNED], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the pool did not end")
    assert process.returncode == 0 and out.strip() == "ok", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
