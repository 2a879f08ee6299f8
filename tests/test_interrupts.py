"""Ctrl-C and SIGTERM: held while processes start, SIGTERM as an interrupt, quiet spawned workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from musicssl.interrupts import Interrupted, exit_code, held_signals, interrupts_kept, sigterm_interrupts


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
        with pytest.raises(KeyboardInterrupt) as raised:  # (a plain one escaping would end the test session)
            with sigterm_interrupts(), held_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert type(raised.value) is Interrupted and exit_code(raised.value) == 143
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_interrupts_raises_an_interrupt_that_exits_143_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as raised:  # (one escaping would end the test session)
        with sigterm_interrupts():
            assert callable(signal.getsignal(signal.SIGTERM))  # (at its default, the kill would end it too)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted long before
    assert type(raised.value) is Interrupted and raised.value.signum == signal.SIGTERM
    assert exit_code(raised.value) == 143 and exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is previous


def _run_in_its_own_group(command: list[str]) -> tuple[int, str, str]:
    """Run a script that signals its own process group (so not pytest's); kill the group if it hangs."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the pool did not end")
    return process.returncode, out, err


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
    returncode, out, err = _run_in_its_own_group([sys.executable, "-c", SPAWNED])
    assert returncode == 0 and out.strip() == "ok", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


FLOODED = '''
import os, signal, subprocess, sys
from musicssl.interrupts import held_signals

armed = [False]

def handler(signum, frame):
    if armed[0]:
        armed[0] = False
        raise KeyboardInterrupt(signum)

signal.signal(signal.SIGINT, handler)
signal.signal(signal.SIGTERM, handler)
SEND = """
import os, signal, sys, time
end = time.monotonic() + 2
while time.monotonic() < end:
    os.kill(int(sys.argv[1]), signal.SIGINT); os.kill(int(sys.argv[1]), signal.SIGTERM)
    time.sleep(0.0001)
"""
sender = subprocess.Popen([sys.executable, "-c", SEND, str(os.getpid())])
blocks = 0
while sender.poll() is None:
    armed[0] = True
    try:
        with held_signals():
            blocks += 1
    except KeyboardInterrupt:
        pass
    armed[0] = False
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, []), f"signals left blocked after {blocks} blocks"
    left = [signum for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not handler]
    assert not left, f"handlers left deferring after {blocks} blocks: {left}"
print("ok", blocks)
'''


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_held_signals_set_everything_back_under_a_flood_of_signals():
    """Signals that come while the block sets its handlers up or back, or as it blocks them: the first
    versions left a deferring handler installed for good (thousands in 100 000 blocks), then both
    signals blocked for good (after 2 000-9 000 blocks)."""
    process = subprocess.run([sys.executable, "-c", FLOODED], capture_output=True, text=True, timeout=120,
                             start_new_session=True)
    assert process.returncode == 0 and process.stdout.startswith("ok"), process.stdout + process.stderr


DIES_SENDING = '''
import gc, os, signal, struct, sys, time
from multiprocessing.queues import SimpleQueue
from musicssl.interrupts import SpawnPool

def die_while_sending():
    time.sleep(0.3)
    results = next(queue for queue in gc.get_objects() if isinstance(queue, SimpleQueue)
                   and queue._writer is not None and not queue._writer.closed)
    results._wlock.acquire()  # as a worker holds it while it sends
    os.write(results._writer.fileno(), struct.pack("!i", 1_000_000) + b"x" * 10)  # the start of a 1 MB result
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    for workers, end in ((1, "shutdown"), (2, "shutdown"), (2, "terminate")):
        pool = SpawnPool(workers)
        futures = [pool.submit(die_while_sending)] + [pool.submit(abs, -1) for _ in range(workers - 1)]
        time.sleep(1.5)
        started = time.monotonic()
        getattr(pool, end)()
        outcome = [type(future.exception(timeout=0)).__name__ for future in futures]
        assert outcome[0] == "BrokenProcessPool" and time.monotonic() - started < 10, (workers, end, outcome)
    print("ok")
'''


def test_a_pool_ends_when_a_worker_dies_while_it_sends_a_result(tmp_path):
    """ProcessPoolExecutor's thread then waits for the rest of the message for ever (this process holds
    the pipe open for writing, and so do the other workers): shutdown, terminate and the end of the
    interpreter hung."""
    script = tmp_path / "dies_sending.py"  # a file: the spawned workers import die_while_sending from it
    script.write_text(DIES_SENDING)
    returncode, out, err = _run_in_its_own_group([sys.executable, str(script)])
    assert returncode == 0 and out.strip() == "ok" and "Traceback" not in err, err


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_a_handler_that_raises_as_the_signals_are_blocked_leaves_them_unblocked(monkeypatch):
    """A signal that came just before the block runs its handler as the call that blocks returns; the
    exception then left both signals blocked for good (seen after 20 000 blocks under a flood)."""
    block = signal.pthread_sigmask

    def handler_runs_as_it_returns(how, signals):
        previous = block(how, signals)
        if how == signal.SIG_BLOCK and set(signals) == {signal.SIGINT, signal.SIGTERM}:
            raise KeyboardInterrupt
        return previous

    monkeypatch.setattr(signal, "pthread_sigmask", handler_runs_as_it_returns)
    with pytest.raises(KeyboardInterrupt):
        with held_signals():
            pass
    monkeypatch.undo()
    assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_lock_error_met_while_a_stop_unwinds_is_raised_as_that_stop():
    """A second Ctrl-C inside a pool's result wait, as the first unwound it, left the wait's lock released
    twice: `RuntimeError: release unlocked lock` ended the corpus build with exit 1 and a traceback
    (tests/test_corpus.py's double Ctrl-C, now and then)."""
    for stop, signum in ((KeyboardInterrupt(), signal.SIGINT), (Interrupted(signal.SIGTERM), signal.SIGTERM)):
        with pytest.raises(Interrupted) as raised:
            with interrupts_kept():
                try:
                    raise stop
                except KeyboardInterrupt:
                    threading.Lock().release()
        assert raised.value.signum == signum and exit_code(raised.value) == 128 + signum
        assert isinstance(raised.value.__cause__, RuntimeError)
    # Without a stop behind it, the error stays what it is.
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        with interrupts_kept():
            threading.Lock().release()


ORPHANED = """
import os, signal, sys, time
from musicssl.interrupts import SpawnPool


def pid_then_sleep():
    print(os.getpid(), flush=True)
    time.sleep(120)


if __name__ == "__main__":
    pool = SpawnPool(1)
    pool.submit(pid_then_sleep)
    time.sleep(600)  # killed here
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and orphaned processes")
def test_a_pools_workers_end_when_the_process_that_started_them_is_killed(tmp_path):
    """A build killed with kill -9 (or out of memory) left its decoding processes running, holding their
    memory and the caller's output pipe (a communicate() on the run waited for them)."""
    script = tmp_path / "orphaned.py"
    script.write_text(ORPHANED)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        worker = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the worker {worker} outlived the process that started it")
        assert parent.stdout.read() == ""  # the pipe closed: no process holds it any more
    finally:
        parent.stdout.close()
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
