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
    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with held_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # time for a handler to run, were it not held
            reached.append("after the signal")
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is before

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
    pool = SpawnPool(2)
    # In a worker: Ctrl-C ignored, SIGTERM at its default, neither left blocked.
    state = pool.submit(signal.getsignal, signal.SIGINT).result(), pool.submit(signal.getsignal, signal.SIGTERM).result()
    mask = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result()
    assert state == (signal.SIG_IGN, signal.SIG_DFL) and not {signal.SIGINT, signal.SIGTERM} & mask, (state, mask)
    pool.shutdown()
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1):
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
