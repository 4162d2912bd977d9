"""Pacing of replication traffic: a token bucket with time passed in (pure).

Shards are sent whole (one sendfile per slot), so the bucket works at shard granularity: a send may start
when the bucket is not in debt, and then charges its bytes; over time the bytes sent never exceed
``burst + rate * elapsed``. ``delay(n, now)`` says how long to wait before sending ``n`` bytes.
"""

from __future__ import annotations


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
