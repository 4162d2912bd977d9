"""The per-worker control block: a small shared-memory page between a worker and its agent.

The worker writes progress (beat counter, last step, beat time) at every step boundary, which costs a
few stores and no syscall; the agent reads it to detect hangs from outside the worker (a SIGSTOPped
worker or one stuck in C code holding the GIL stops beating). The agent writes the generation it wants
the worker in (``target_generation``), a stop request (preemption) and the newest committed step; the
worker polls them at step boundaries. When a generation ends because a member failed, the agent also
writes ``failed_generation``: a snapshot copy of that generation still running reads it between chunks and
stops (``resilient.store.segment.StopWhen``), since no snapshot of it can commit any more.

Layout: little-endian int64 fields at fixed offsets (``FIELDS``). Each field is written with one aligned
8-byte store, so a reader never sees a torn value. ``CLOCK_MONOTONIC`` is shared by all processes of one
host, so the agent can compare the worker's beat time with its own clock.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time

from resilient.runtime import futex

MAGIC = 0x5245534C43544C31  # "RESLCTL1"
VERSION = 1
SIZE = 4096

FIELDS = (
    "magic",
    "version",
    "worker_pid",
    "beats",
    "last_step",
    "beat_mono_ns",
    "generation",  # the generation the worker currently runs in (worker writes)
    "target_generation",  # the newest generation formed that the worker must move to (agent writes)
    "stop_requested",  # 1: finish the step, snapshot, return (agent writes)
    "committed_step",  # newest committed step, -1 none (agent writes)
    "state",  # worker state: see STATES
    "failed_generation",  # newest generation a member failed in: no snapshot of it commits; -1 none (agent writes)
)
_OFFSET = {name: 8 * i for i, name in enumerate(FIELDS)}
STATES = {0: "starting", 1: "running", 2: "recovering", 3: "done", 4: "failed"}
STATE_CODE = {v: k for k, v in STATES.items()}


class ControlBlock:
    """A mapped control block. The agent ``create``s it before starting the worker; the worker ``open``s it."""

    def __init__(self, path: str, mm: mmap.mmap) -> None:
        self.path = path
        self._mm = mm
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(mm)  # the mapping's address, for futexes

    def _address(self, name: str) -> int:
        if self._anchor is None:
            raise ValueError(f"control block {self.path} is closed")
        return ctypes.addressof(self._anchor) + _OFFSET[name]  # little-endian: the low 32 bits come first

    @classmethod
    def create(cls, path: str, generation: int) -> "ControlBlock":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            mm = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        block = cls(path, mm)
        block.set("version", VERSION)
        block.set("last_step", -1)
        block.set("committed_step", -1)
        block.set("failed_generation", -1)
        block.set("generation", generation)
        block.set("target_generation", generation)
        block.set("beat_mono_ns", time.monotonic_ns())
        block.set("magic", MAGIC)
        return block

    @classmethod
    def open(cls, path: str) -> "ControlBlock":
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        block = cls(path, mm)
        if block.get("magic") != MAGIC:
            from resilient.errors import ResilientError

            raise ResilientError(f"{path} is not a resilient control block (bad magic); was it created by the agent?")
        return block

    def get(self, name: str) -> int:
        return struct.unpack_from("<q", self._mm, _OFFSET[name])[0]

    def set(self, name: str, value: int) -> None:
        struct.pack_into("<q", self._mm, _OFFSET[name], int(value))

    # --- worker side ---------------------------------------------------------------------------
    def beat(self, step: int) -> None:
        self.set("last_step", step)
        self.set("beat_mono_ns", time.monotonic_ns())
        self.set("beats", self.get("beats") + 1)

    def set_state(self, state: str) -> None:
        self.set("state", STATE_CODE[state])

    def failed_address(self) -> int:
        """The address of ``failed_generation`` (an aligned int64), valid while the block is open."""
        return self._address("failed_generation")

    def wait_target(self, seen: int, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for ``target_generation`` to differ from ``seen``; its value."""
        futex.wait(self._address("target_generation"), seen, timeout)
        return self.get("target_generation")

    def wake_target(self) -> None:
        """Wake this process's own ``wait_target`` callers (used to stop a watcher)."""
        futex.wake(self._address("target_generation"))

    # --- agent side ----------------------------------------------------------------------------
    def set_target(self, generation: int) -> None:
        """Point the worker at ``generation`` and wake its generation watcher."""
        self.set("target_generation", generation)
        futex.wake(self._address("target_generation"))

    def mark_failed(self, generation: int) -> None:
        """A member of ``generation`` failed: no snapshot of it (or of an older one) can commit any more."""
        if generation > self.get("failed_generation"):
            self.set("failed_generation", generation)

    def raise_target(self, generation: int) -> None:
        """``set_target`` unless the target is already at ``generation`` or beyond."""
        if generation > self.get("target_generation"):
            self.set_target(generation)

    def beat_age(self, now_ns: int | None = None) -> float:
        """Seconds since the worker's last beat."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return max(0.0, (now_ns - self.get("beat_mono_ns")) / 1e9)

    def state(self) -> str:
        return STATES.get(self.get("state"), "unknown")

    def snapshot(self) -> dict[str, int]:
        return {name: self.get(name) for name in FIELDS}

    def close(self) -> None:
        self._anchor = None  # an exported buffer keeps the mapping from closing
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass

    def unlink(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
