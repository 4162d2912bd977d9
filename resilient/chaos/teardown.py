"""Teardown: undo exactly what this run created, always (``finally`` and ``atexit``), in reverse order.

Everything the harness creates registers itself here as it is created: process groups it started, the
etcd it runs, network namespaces, tmpfs mounts, proxies, files in /dev/shm that appeared during the run.
``run()`` undoes them last-in first-out, continuing past a failing step and returning the sentences that
describe what could not be undone. Nothing is matched by name pattern alone: a stale ``rs-*`` namespace
from another run is not ours and is left alone.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
from typing import Callable

import psutil

from resilient.logs import get_logger

log = get_logger(__name__)


class Teardown:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._done = False
        self.pids: dict[int, float | None] = {}  # pid -> its create time when tracked (pid reuse guard)
        atexit.register(self.run)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        with self._lock:
            self._steps.append((what, undo))

    def track_pid(self, pid: int) -> None:
        """Remember a process (and, at teardown, its descendants) that this run is responsible for; its start
        time is kept so that a pid reused later by an unrelated process is never touched."""
        if pid in self.pids:
            return
        try:
            self.pids[pid] = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            self.pids[pid] = None

    def ours(self) -> list[int]:
        """Tracked pids that still name the process that was tracked (gone ones excluded)."""
        out = []
        for pid, created in self.pids.items():
            try:
                if created is not None and psutil.Process(pid).create_time() == created:
                    out.append(pid)
            except psutil.NoSuchProcess:
                continue
        return sorted(out)

    def run(self) -> list[str]:
        with self._lock:
            if self._done:
                return []
            self._done = True
            steps = list(reversed(self._steps))
            self._steps.clear()
        problems = []
        problems += kill_tree(self.ours())
        for what, undo in steps:
            try:
                undo()
            except Exception as exc:  # keep tearing down; report every failure at the end
                problems.append(f"could not undo {what}: {exc}")
                log.warning("teardown: could not undo %s: %s", what, exc)
        atexit.unregister(self.run)
        return problems


def descendants(pids: list[int]) -> list[psutil.Process]:
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        procs[p.pid] = p
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            continue
    return list(procs.values())


def kill_tree(pids: list[int], grace: float = 0.0) -> list[str]:
    """SIGCONT then SIGKILL the given processes and their descendants (stopped ones included); reap."""
    procs = descendants(pids)
    for p in procs:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                break
    _, alive = psutil.wait_procs(procs, timeout=5.0)
    for p in procs:
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        except OSError:
            pass
    return [f"process {p.pid} survived SIGKILL" for p in alive if p.is_running() and p.status() != "zombie"]


def alive(pids: list[int]) -> list[int]:
    out = []
    for p in descendants(pids):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive(pids)
    return left
