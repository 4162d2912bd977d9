"""Wait for a 32-bit word of shared memory to change, and wake such waiters: Linux futex(2) via ctypes.

A futex on a ``MAP_SHARED`` file mapping is keyed by the file and offset, not by the address, so a thread of
one process waiting on its mapping of a control-block word wakes when another process (the agent) calls
``wake`` on its own mapping of the same word. ctypes releases the GIL for the call: a thread that waits
costs nothing, unlike one that polls. ``wait`` returns on a wake, when the word no longer holds
``expected``, on a signal or after ``timeout``; callers re-read the word and decide, so every return is
safe. On an architecture whose syscall number is unknown here, ``wait`` sleeps for the timeout instead
(the caller's loop then polls) and ``wake`` does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98, "ppc64le": 221, "s390x": 238, "riscv64": 98}.get(
    platform.machine())
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_WAKE_ALL = 0x7FFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def available() -> bool:
    return _SYS_FUTEX is not None


def _as_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def wait(address: int, expected: int, timeout: float) -> None:
    """Block while the 32-bit word at ``address`` holds the low 32 bits of ``expected`` (at most ``timeout``
    seconds, or until ``wake``)."""
    if _SYS_FUTEX is None:
        time.sleep(timeout)
        return
    ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
    # syscall(2) is variadic and reads every argument as a long: pass longs, never ctypes' default int
    _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_long(_FUTEX_WAIT),
                  ctypes.c_long(_as_int32(expected)), ctypes.byref(ts), ctypes.c_void_p(None), ctypes.c_long(0))


def wake(address: int) -> int:
    """Wake every waiter on the word at ``address`` (in any process mapping the same file); their number."""
    if _SYS_FUTEX is None:
        return 0
    woken = _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_long(_FUTEX_WAKE),
                          ctypes.c_long(_WAKE_ALL), ctypes.c_void_p(None), ctypes.c_void_p(None), ctypes.c_long(0))
    if woken < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return woken


__all__ = ["available", "wait", "wake"]
