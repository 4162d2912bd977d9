"""The worker learns of a newer generation the moment its agent announces it: a futex on the control
block's target generation (``ControlBlock.set_target`` / ``wait_target``) wakes the runtime's watcher
thread, which calls the ``watch_generation`` callback (the decorator's: fail the old group's collectives)."""

from __future__ import annotations

import os
import threading
import time

from resilient.runtime import agent_client, futex
from resilient.runtime.control import ControlBlock
from resilient.testing.etcd import wait_until
from tests.agent.conftest import agent_runtime

NEVER_S = 60.0  # a wait this long only ends early when woken


def _sleeps_on(pid: int, tid: int, address: int) -> bool:
    """Whether thread ``tid`` of ``pid`` sleeps in futex(2) on ``address`` (``/proc/.../syscall``: the
    number of the blocking system call, then its arguments)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as fh:
            fields = fh.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == str(futex._SYS_FUTEX) and int(fields[1], 16) == address


def _announce_once_waiting(path: str, generation: int, tid: int, address: int) -> int:
    """Fork the agent's side: once thread ``tid`` of this process sleeps on ``address``, raise the target."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            wait_until(lambda: _sleeps_on(parent, tid, address), 10, "the waiter asleep on the futex", 0.001)
            ControlBlock.open(path).raise_target(generation)
        finally:
            os._exit(0)
    return pid


def test_a_target_set_by_another_process_wakes_a_waiter_long_before_its_timeout(tmp_path):
    control = ControlBlock.create(str(tmp_path / "control"), 1)
    try:
        pid = _announce_once_waiting(control.path, 2, threading.get_native_id(), control._address("target_generation"))
        began = time.monotonic()
        seen = control.wait_target(1, NEVER_S)
        while seen == 1 and time.monotonic() - began < 10:  # a spurious return (a signal) waits again
            seen = control.wait_target(1, NEVER_S)
        os.waitpid(pid, 0)
        assert seen == 2
        assert time.monotonic() - began < 10, "woken by the announcement, not by the timeout"
    finally:
        control.unlink()


def test_raise_target_never_lowers_it(tmp_path):
    control = ControlBlock.create(str(tmp_path / "control"), 1)
    try:
        control.set_target(5)
        control.raise_target(3)
        assert control.get("target_generation") == 5
        control.raise_target(6)
        assert control.get("target_generation") == 6
    finally:
        control.unlink()


class _NoSnapshots:
    def committed_step(self):
        return None


def test_the_runtime_watcher_calls_back_once_per_announced_generation(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_client, "WATCH_RECHECK_S", NEVER_S)  # only a wake-up can be in time
    calls: list[int] = []
    called = threading.Condition()

    def callback(target: int) -> None:
        with called:
            calls.append(target)
            called.notify_all()

    def wait_calls(n: int) -> list[int]:
        with called:
            assert called.wait_for(lambda: len(calls) >= n, timeout=10), f"calls so far: {calls}"
            return list(calls)

    with agent_runtime(tmp_path, _NoSnapshots) as (_hub, control, runtime):
        runtime.watch_generation(callback)
        watcher, address = runtime._watcher, runtime._control._address("target_generation")
        wait_until(lambda: _sleeps_on(os.getpid(), watcher.native_id, address), 10, "the watcher asleep", 0.001)
        assert calls == [], "it looked and slept: no announcement, no call"
        pid = _announce_once_waiting(control.path, 2, watcher.native_id, address)
        assert wait_calls(1) == [2]
        os.waitpid(pid, 0)
        control.raise_target(2)  # the same generation again: no new call
        control.raise_target(3)
        assert wait_calls(2) == [2, 3]
        began = time.monotonic()
    assert not watcher.is_alive() and time.monotonic() - began < NEVER_S / 2, "close wakes the watcher"
