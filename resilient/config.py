"""Typed, validated settings shared by several components.

Component-specific settings live beside their component as frozen dataclasses; this module holds the
ones that cross components: the etcd connection and the timeout budget. All timeouts derive from one
budget (``Timeouts.from_lease_ttl``) and are checked against each other at construction, so an
inconsistent combination is refused at start-up with a message naming the values instead of causing
spurious evictions mid-job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from resilient.errors import ConfigError

# etcd's own defaults: heartbeat 100 ms, election timeout 1000 ms.
DEFAULT_ETCD_ELECTION_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Timeouts:
    """Every timeout of the control plane, in seconds.

    Relations enforced (see docs/configuration.md):
      * lease_ttl is a whole number of seconds >= 2 (etcd's minimum TTL),
      * keepalive_interval <= lease_ttl / 3,
      * lease_ttl > etcd_election_timeout + keepalive_interval (a leader change must not evict a live node),
      * 0 < monitor_interval <= keepalive_interval,
      * connect_timeout <= request_deadline, term_grace > 0, last_call < join_timeout.
    """

    lease_ttl: int = 5
    keepalive_interval: float = 5 / 3
    etcd_election_timeout: float = DEFAULT_ETCD_ELECTION_TIMEOUT_S
    monitor_interval: float = 0.1
    last_call: float = 1.0
    join_timeout: float = 600.0
    connect_timeout: float = 5.0
    request_deadline: float = 10.0
    term_grace: float = 5.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if int(self.lease_ttl) != self.lease_ttl or self.lease_ttl < 2:
            problems.append(f"lease_ttl={self.lease_ttl} must be a whole number of seconds >= 2 (etcd's minimum)")
        if self.keepalive_interval <= 0 or self.keepalive_interval > self.lease_ttl / 3 + 1e-9:
            problems.append(
                f"keepalive_interval={self.keepalive_interval:g}s must be > 0 and <= lease_ttl/3 "
                f"({self.lease_ttl / 3:.3g}s) so two keep-alives can be lost without expiry"
            )
        if self.lease_ttl <= self.etcd_election_timeout + self.keepalive_interval:
            problems.append(
                f"lease_ttl={self.lease_ttl}s must exceed etcd_election_timeout={self.etcd_election_timeout:g}s "
                f"+ keepalive_interval={self.keepalive_interval:g}s, or an etcd leader change evicts live nodes"
            )
        if self.monitor_interval <= 0 or self.monitor_interval > self.keepalive_interval:
            problems.append(
                f"monitor_interval={self.monitor_interval:g}s must be > 0 and <= keepalive_interval="
                f"{self.keepalive_interval:g}s"
            )
        if self.connect_timeout <= 0 or self.connect_timeout > self.request_deadline:
            problems.append(
                f"connect_timeout={self.connect_timeout:g}s must be > 0 and <= request_deadline="
                f"{self.request_deadline:g}s"
            )
        if self.term_grace <= 0:
            problems.append(f"term_grace={self.term_grace:g}s must be > 0")
        if self.last_call < 0 or self.last_call >= self.join_timeout:
            problems.append(f"last_call={self.last_call:g}s must be >= 0 and < join_timeout={self.join_timeout:g}s")
        if problems:
            raise ConfigError("Inconsistent timeouts: " + "; ".join(problems) + ".")

    @classmethod
    def from_lease_ttl(cls, lease_ttl: int = 5, **overrides: float) -> "Timeouts":
        """Derive the budget from the lease TTL: keep-alive every TTL/3, monitor at most every 100 ms."""
        ttl = int(math.ceil(lease_ttl))
        values: dict[str, float] = {
            "lease_ttl": ttl,
            "keepalive_interval": ttl / 3,
            "monitor_interval": min(0.1, ttl / 3),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd: endpoints (``host:port``, failover in order), TLS and auth."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    ca_cert: str | None = None
    cert_cert: str | None = None
    cert_key: str | None = None
    user: str | None = None
    password: str | None = None
    connect_timeout: float = 5.0
    request_deadline: float = 10.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("No etcd endpoint given: pass --rdzv-endpoint host:port[,host:port...].")
        for ep in self.endpoints:
            host, sep, port = ep.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"etcd endpoint {ep!r} is not host:port (e.g. 127.0.0.1:2379).")
        if (self.cert_cert is None) != (self.cert_key is None):
            raise ConfigError("Give both the etcd client certificate and its key, or neither.")
        if (self.user is None) != (self.password is None):
            raise ConfigError("Give both the etcd user and password, or neither.")

    @classmethod
    def parse(cls, spec: str | Sequence[str], **kwargs: object) -> "EtcdSettings":
        """``"h1:2379,h2:2379"`` (a URL scheme such as ``http://`` is accepted and stripped)."""
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        eps = []
        for p in parts:
            p = p.strip()
            if not p:
                continue
            for scheme in ("http://", "https://", "etcd://"):
                if p.startswith(scheme):
                    p = p[len(scheme):]
            eps.append(p.rstrip("/"))
        return cls(endpoints=tuple(eps), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NodeRange:
    """``--nnodes MIN:MAX`` (or ``N``)."""

    min_nodes: int
    max_nodes: int

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ConfigError(f"--nnodes minimum must be >= 1, got {self.min_nodes}.")
        if self.min_nodes > self.max_nodes:
            raise ConfigError(f"--nnodes {self.min_nodes}:{self.max_nodes}: MIN must not exceed MAX.")

    @classmethod
    def parse(cls, spec: str) -> "NodeRange":
        lo, sep, hi = spec.partition(":")
        try:
            low = int(lo)
            high = int(hi) if sep else low
        except ValueError as exc:
            raise ConfigError(f"--nnodes {spec!r} must be N or MIN:MAX with integers (e.g. 1:4).") from exc
        return cls(low, high)  # range checks (ConfigError) happen here, outside the integer parsing


