"""``Waker``: wakes the agent's monitor loop, from other threads *and from signal handlers*.

A ``threading.Event`` cannot be set from a signal handler: the handler runs in the main thread between
two bytecodes, possibly while that same thread holds the event's lock (inside ``Event.wait`` or an earlier
``Event.set``), and ``set`` then blocks on a lock its own thread holds: the agent deadlocks. That happened
when two workers exited at once (two SIGCHLDs in a row). A self-pipe takes no lock: ``set`` writes one byte
(``os.write`` on a non-blocking pipe; a full pipe already means "wake up"), ``wait`` selects on the read end
with a timeout and drains it. The pipe lives as long as the process (a signal may still arrive after the
agent closed; closing the pipe would let it write into whatever file later reuses the descriptor).
"""

from __future__ import annotations

import os
import select


class Waker:
    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def set(self) -> None:
        """Wake the waiter (safe in signal handlers and from any thread)."""
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending already) or closed (the agent is shutting down)

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for a ``set``; True when woken. Pending wake-ups are consumed."""
        try:
            ready, _, _ = select.select([self._r], [], [], timeout)
        except InterruptedError:
            ready = [self._r]
        if not ready:
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
