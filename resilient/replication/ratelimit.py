"""Pacing of replication traffic: a token bucket with time passed in (pure).

A send is paced inside the transfer, not once per shard: the bulk transport sends a slot in pieces of
``PACE_BYTES`` (``send_slot(..., pace=...)``) and reserves each piece's bytes before it goes out
(``reserve(n, now)`` returns how long to wait first), so one big shard never bursts at line rate. Over
any interval the bytes sent never exceed ``burst + rate * elapsed`` (with ``burst = 0``: a transfer of
``N`` bytes at ``R`` B/s takes at least ``N / R`` seconds). ``delay``/``charge`` are the older
start-then-charge form (a send may start when the bucket is not in debt, then charges its bytes).
"""

from __future__ import annotations

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

    def delay(self, now: float) -> float:
        """Seconds until a send may start (0 when the bucket is not in debt)."""
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def charge(self, nbytes: int, now: float) -> None:
        self._refill(now)
        self.tokens -= nbytes

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` now; returns the seconds to wait before sending them (0: at once). Concurrent
        senders sharing the bucket queue up behind each other's reservations."""
        self._refill(now)
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
