"""The agent sees a worker's failure when the kernel starts tearing the process down, before its sockets
close and before it can be reaped (``resilient.agent.deathwatch``, ``WorkerHandle.poll``)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from resilient.agent import deathwatch
from resilient.agent.deathwatch import PF_EXITING, DeathWatch, exit_status, holds_device, parse_stat
from resilient.agent.supervisor import WorkerHandle
from resilient.testing.etcd import wait_until

HOLD_BYTES = 1_500_000_000  # enough memory that the kernel needs a visible while to free it


def _stat(*, comm: str = "python", state: str = "R", flags: int = 0x400000, exit_code: int = 0) -> bytes:
    fields = ["0"] * 50  # fields 3..52 of proc(5)
    fields[0] = state
    fields[9 - 3] = str(flags)
    fields[52 - 3] = str(exit_code)
    return f"4242 ({comm}) {' '.join(fields)}\n".encode()


def test_a_process_exiting_on_a_signal_reports_the_signal():
    assert exit_status(_stat(flags=0x400000 | PF_EXITING, exit_code=signal.SIGKILL)) == signal.SIGKILL


def test_a_process_exiting_with_a_code_reports_the_wait_status():
    status = exit_status(_stat(flags=PF_EXITING, exit_code=3 << 8))
    assert os.waitstatus_to_exitcode(status) == 3


def test_a_running_process_and_a_clean_exit_report_nothing():
    assert exit_status(_stat(exit_code=0)) is None
    assert exit_status(_stat(flags=PF_EXITING, exit_code=0)) is None, "exit 0 is not a failure"
    # a status without PF_EXITING is stale: the process runs
    assert exit_status(_stat(flags=0x400000, exit_code=signal.SIGKILL)) is None


def test_a_command_name_with_spaces_and_parentheses_is_parsed_from_the_last_parenthesis():
    text = _stat(comm="a) b (c", state="Z", flags=PF_EXITING, exit_code=signal.SIGSEGV)
    assert parse_stat(text) == ("Z", PF_EXITING, signal.SIGSEGV)


@pytest.mark.parametrize("text", [b"", b"4242 (python", b"4242 (python) R 1 2", _stat()[:-60]])
def test_truncated_or_empty_stat_text_tells_nothing(text):
    assert exit_status(text) is None


def test_the_running_test_process_is_not_exiting():
    assert exit_status(deathwatch.read_stat(os.getpid())) is None
    assert parse_stat(deathwatch.read_stat(os.getpid()))[1] & PF_EXITING == 0


def _child_holding_memory() -> tuple[int, socket.socket]:
    """A child holding HOLD_BYTES (its teardown takes a visible while) and the socket to it: the child exits
    0 when a byte arrives on it, and its end closes when the kernel has torn it down."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ours.close()
            block = bytearray(HOLD_BYTES)
            for i in range(0, HOLD_BYTES, 4096):
                block[i] = 1
            theirs.send(b"r")
            theirs.recv(1)
        finally:
            os._exit(0)
    theirs.close()
    assert ours.recv(1) == b"r"
    return pid, ours


def _exited(pid: int) -> None:
    """Block until ``pid`` has exited, without reaping it."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def test_a_sigkilled_process_is_seen_dying_before_its_sockets_close_and_before_it_can_be_reaped():
    pid, ours = _child_holding_memory()
    seen: dict[str, float] = {}
    dying = threading.Event()

    def on_dying(p: int) -> None:
        assert p == pid
        seen["dying"] = time.monotonic()
        seen["status"] = deathwatch.failing_status(pid)
        seen["reapable"] = os.waitpid(pid, os.WNOHANG)[0] != 0
        dying.set()

    watch = DeathWatch(on_dying, interval=0.002)
    watch.watch(pid)
    try:
        assert watch.check() == [] and not dying.is_set(), "a running process is not reported"
        os.kill(pid, signal.SIGKILL)
        assert ours.recv(1) == b"", "the socket closes once the teardown is over"
        closed = time.monotonic()
        assert dying.wait(5)
    finally:
        watch.close()
        os.waitpid(pid, 0)
    assert seen["status"] == signal.SIGKILL
    assert not seen["reapable"], "seen while the kernel was still tearing it down"
    assert seen["dying"] < closed, "seen before the process's sockets closed"


def _handle(pid: int) -> WorkerHandle:
    return WorkerHandle(slot=0, rank=0, generation=1, pid=pid, how="fork", control=None, error_file="",
                        stdout_path=None, stderr_path=None, started_mono=time.monotonic())


def test_a_handle_counts_a_dying_worker_as_failed_and_reaps_it_when_the_teardown_ends():
    pid, ours = _child_holding_memory()
    h = _handle(pid)
    assert h.poll() is None and h.alive
    dying = threading.Event()
    watch = DeathWatch(lambda _pid: dying.set(), interval=0.002)
    watch.watch(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        assert dying.wait(5)
        assert h.poll() == -signal.SIGKILL and not h.alive
        assert not h.reaped, "failed while the kernel still tears it down"
        assert ours.recv(1) == b""
        _exited(pid)
        assert h.reap() and h.reaped and h.exitcode == -signal.SIGKILL
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    finally:
        watch.close()


def test_a_clean_exit_is_reaped_not_foreseen():
    pid, ours = _child_holding_memory()
    h = _handle(pid)
    ours.send(b"x")  # exit 0, please
    wait_until(lambda: parse_stat(deathwatch.read_stat(pid))[1] & PF_EXITING, 10, "the child exiting", 0.001)
    # while its teardown runs, a clean exit is not foreseen: nothing, or (the teardown over already) reaped
    assert h.poll() is None or h.reaped
    _exited(pid)
    assert h.poll() == 0 and h.reaped


def test_a_process_holding_a_device_file_is_told_apart():
    # the accelerator check reads the process's descriptors: /dev/null stands in for /dev/nvidia0 here
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.open("/dev/null", os.O_RDONLY)
        os.write(ready_w, b"r")
        os.read(hold_r, 1)  # never written: blocks until killed
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"r"
        assert holds_device(pid, prefixes=("/dev/null",))
        assert not holds_device(pid), "no accelerator device file: /dev/null is not one"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, hold_r, hold_w):
            os.close(fd)
