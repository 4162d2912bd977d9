"""The monitor loop's waker: woken from threads and from signal handlers, never deadlocking in a handler."""

from __future__ import annotations

import signal
import threading
import time

from resilient.agent.waker import Waker


def test_a_set_from_another_thread_wakes_the_waiter_and_is_consumed():
    w = Waker()
    threading.Timer(0.05, w.set).start()
    assert w.wait(10.0)
    assert not w.wait(0.0), "the wake-up was consumed"


def test_a_storm_of_signals_whose_handler_sets_it_never_deadlocks_the_waiting_thread():
    # A threading.Event set from a signal handler deadlocks when the signal lands while the main thread
    # holds the event's lock (inside wait or set): the agent hung that way when two workers exited at once.
    w = Waker()
    fired = []

    def handler(_s, _f):
        fired.append(1)
        w.set()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            w.wait(0.01)
            w.set()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(fired) > 50, "the handler ran while the loop waited and set"


def test_many_sets_without_a_waiter_do_not_block_the_setter():
    w = Waker()
    for _ in range(200_000):  # far more than a pipe buffer holds
        w.set()
    assert w.wait(0.0)
