"""``WorkerHub``: the state the agent's main loop shares with the worker service's gRPC threads.

Holds, per local slot, the assignment of the current generation and whether the slot's current process
registered (runs ``@resilient.elastic`` and can recover in-process); wakes ``WaitGeneration`` callers when a
generation forms or the job closes. All methods are thread-safe.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

from resilient.runtime.api import WorkerAssignment


@dataclass(frozen=True)
class WaitResult:
    status: str  # "ok" | "timeout" | "closed" | "not_member"
    assignment: WorkerAssignment | None = None
    detail: str = ""


class WorkerHub:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._assignments: dict[int, WorkerAssignment] = {}
        self._generation = -1
        self._registered: dict[int, int] = {}  # slot -> pid
        self._closed: str | None = None
        self._import_s: dict[int, float] = {}
        self._stall_s: list[float] = []

    # --- main loop side -----------------------------------------------------------------------------
    def publish(self, generation: int, assignments: dict[int, WorkerAssignment]) -> None:
        with self._cond:
            self._generation = generation
            self._assignments = dict(assignments)
            self._cond.notify_all()

    def close(self, reason: str) -> None:
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    def forget(self, slot: int) -> None:
        """The slot's process is gone: a new process must register again."""
        with self._cond:
            self._registered.pop(slot, None)

    def is_registered(self, slot: int, pid: int) -> bool:
        with self._cond:
            return self._registered.get(slot) == pid

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    # --- worker side (gRPC threads) -----------------------------------------------------------------
    def register(self, slot: int, pid: int, import_s: float) -> WorkerAssignment | None:
        with self._cond:
            self._registered[slot] = pid
            self._import_s[slot] = import_s
            return self._assignments.get(slot)

    def assignment(self, slot: int) -> WorkerAssignment | None:
        with self._cond:
            return self._assignments.get(slot)

    def wait(self, slot: int, after: int, timeout: float) -> WaitResult:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed is not None:
                    return WaitResult("closed", detail=self._closed)
                if self._generation > after:
                    a = self._assignments.get(slot)
                    if a is None:
                        return WaitResult("not_member", detail=f"slot {slot} has no rank in generation "
                                                               f"{self._generation}")
                    return WaitResult("ok", a)
                left = deadline - time.monotonic()
                if left <= 0:
                    return WaitResult("timeout")
                self._cond.wait(left)

    def record_stall(self, seconds: float) -> None:
        with self._cond:
            self._stall_s.append(seconds)
            del self._stall_s[:-100]

    def with_restart_count(self, count: int) -> None:
        with self._cond:
            self._assignments = {s: replace(a, restart_count=count) for s, a in self._assignments.items()}
