"""Fail a gloo process group's collectives from another thread, by shutting its TCP connections down.

gloo cannot abort a collective in flight: torch 2.13's ``ProcessGroupGloo.abort()`` returns at once and an
``all_reduce`` blocked on its peer keeps waiting. A peer that is gone without its connections closing (a
process the kernel is still tearing down, a silenced or partitioned host) keeps such a collective waiting
until the group timeout, or until the hang detector kills the waiting worker. When the agent announces
that the generation is over, ``GroupSockets.abort`` shuts the group's connections down: the blocked
collective fails at once with gloo's "Connection closed by peer", the error a clean peer death gives, and
the worker recovers in-process as it would then.

Which sockets: the ones ``init_process_group`` opened (socket inodes in ``/proc/self/fd`` after it that
were not there before it), kept as duplicates so that a descriptor number reused later is never mistaken
for one of them; only connected TCP sockets (gloo's pairs, not its listener). The duplicates are closed
when the group is torn down.
"""

from __future__ import annotations

import os
import socket
import threading

_FD_DIR = "/proc/self/fd"


def open_sockets() -> dict[str, int]:
    """This process's socket descriptors by socket inode (``socket:[123]``)."""
    found: dict[str, int] = {}
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"{_FD_DIR}/{name}")
        except OSError:
            continue  # closed meanwhile (or the listing's own descriptor)
        if target.startswith("socket:"):
            found[target] = int(name)
    return found


def _connected_tcp(fd: int) -> socket.socket | None:
    """A duplicate of ``fd`` when it is a connected TCP socket, else None."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.getpeername()
            return sock
    except OSError:
        pass  # a listener (not connected), or closed meanwhile
    sock.close()
    return None


class GroupSockets:
    """The TCP connections of the current generation's process group."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._socks: list[socket.socket] = []
        self._aborted = False

    @property
    def generation(self) -> int | None:
        return self._generation

    def capture(self, generation: int, before: dict[str, int]) -> int:
        """Keep the connected TCP sockets opened since ``before`` (an ``open_sockets()`` taken just before
        the group was formed) as generation ``generation``'s; how many."""
        socks = [s for inode, fd in open_sockets().items() if inode not in before
                 for s in [_connected_tcp(fd)] if s is not None]
        with self._lock:
            self._close_locked()
            self._generation, self._socks, self._aborted = generation, socks, False
        return len(socks)

    def abort(self, target_generation: int) -> int:
        """Shut the group's connections down when it belongs to a generation before ``target_generation``;
        how many were shut down (0: nothing captured, the group is current, or it was aborted already)."""
        with self._lock:
            if self._generation is None or self._aborted or self._generation >= target_generation:
                return 0
            self._aborted = True
            done = 0
            for sock in self._socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    done += 1
                except OSError:
                    pass  # the peer reset it already
            return done

    def release(self) -> None:
        """The group is torn down: close the duplicates."""
        with self._lock:
            self._close_locked()
            self._generation, self._aborted = None, False

    def _close_locked(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []


__all__ = ["GroupSockets", "open_sockets"]
