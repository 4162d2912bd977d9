"""Pacing of replication traffic: a token bucket with time passed in (pure).

A send is paced inside the transfer, not once per shard: the bulk transport sends a slot in pieces of
``PACE_BYTES`` (``send_slot(..., pace=...)``) and reserves each piece's bytes before it goes out
(``reserve(n, now)`` returns how long to wait first), so one big shard never bursts at line rate. Over
any interval the bytes sent never exceed ``burst + rate * elapsed`` (with ``burst = 0``: a transfer of
``N`` bytes at ``R`` B/s takes at least ``N / R`` seconds). ``Pacer`` is the blocking side that senders
call: it reserves in a shared bucket and sleeps the returned wait.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

PACE_BYTES = 1 << 20  # bytes sent between two pacing decisions


class TokenBucket:
    def __init__(self, rate_bps: float, burst_bytes: float, now: float) -> None:
        if rate_bps <= 0 or burst_bytes < 0:
            raise ValueError(f"rate_bps={rate_bps} must be > 0 and burst_bytes={burst_bytes} >= 0")
        self.rate = float(rate_bps)
        self.burst = float(burst_bytes)
        self.tokens = float(burst_bytes)
        self.t = now

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` now; returns the seconds to wait before sending them (0: at once). Concurrent
        senders sharing the bucket queue up behind each other's reservations."""
        self._refill(now)
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Pacer:
    """``pace(nbytes)`` for ``send_slot``: blocks until ``nbytes`` more may go out under the rate limit.
    Thread-safe: concurrent transfers share one bucket and queue behind each other's reservations."""

    def __init__(self, rate_bps: float, burst_bytes: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._bucket = TokenBucket(rate_bps, burst_bytes, clock())
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            wait = self._bucket.reserve(nbytes, self._clock())
        if wait > 0:
            self._sleep(wait)
