"""Settings of the replication component (one frozen dataclass, validated at construction).

Precedence: explicit argument > environment (``RESILIENT_REPLICAS``, ``RESILIENT_REPLICATION_RATE``) >
default. ``replicas`` is the number of copies of each shard, on distinct hosts (the owner's copy counts);
``rate_limit_bps`` caps the bytes per second this agent sends to peers (None: no cap), so replication does
not starve training traffic; ``replicate_timeout_s`` is how long one shard may take to reach all of its
holders before that snapshot is skipped and counted; ``max_message_bytes`` bounds every gRPC control
message (shard bytes never travel over gRPC).
"""

from __future__ import annotations

from dataclasses import dataclass

from resilient import env
from resilient.errors import ConfigError

DEFAULT_REPLICAS = 2
DEFAULT_REPLICATE_TIMEOUT_S = 60.0
DEFAULT_RPC_TIMEOUT_S = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
MAX_PENDING_PER_RANK = 1


@dataclass(frozen=True)
class ReplicationSettings:
    replicas: int = DEFAULT_REPLICAS
    rate_limit_bps: float | None = None
    replicate_timeout_s: float = DEFAULT_REPLICATE_TIMEOUT_S
    rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    send_workers: int = 2
    # how long a worker's snapshot waits for this node's commit lock before it is skipped instead (etcd slow)
    overwrite_wait_s: float = 2.0

    def __post_init__(self) -> None:
        problems = []
        if int(self.replicas) != self.replicas or self.replicas < 1:
            problems.append(f"replicas={self.replicas!r} must be a whole number >= 1 (use 2 to survive one lost host)")
        if self.rate_limit_bps is not None and not self.rate_limit_bps > 0:
            problems.append(f"rate_limit_bps={self.rate_limit_bps!r} must be > 0 bytes/s, or None for no cap")
        if not self.replicate_timeout_s > 0:
            problems.append(f"replicate_timeout_s={self.replicate_timeout_s!r} must be > 0 seconds")
        if not self.rpc_timeout_s > 0:
            problems.append(f"rpc_timeout_s={self.rpc_timeout_s!r} must be > 0 seconds")
        if self.max_message_bytes < 1024:
            problems.append(f"max_message_bytes={self.max_message_bytes!r} must be >= 1024")
        if not self.overwrite_wait_s > 0:
            problems.append(f"overwrite_wait_s={self.overwrite_wait_s!r} must be > 0 seconds")
        if self.send_workers < 1:
            problems.append(f"send_workers={self.send_workers!r} must be >= 1")
        if problems:
            raise ConfigError("Invalid replication settings: " + "; ".join(problems) + ".")

    @classmethod
    def resolve(cls, replicas: int | None = None, rate_limit_bps: float | None = None, **kwargs: object) -> "ReplicationSettings":
        """Argument > environment > default."""
        if replicas is None:
            replicas = env.get_int(env.REPLICAS, DEFAULT_REPLICAS)
        if rate_limit_bps is None:
            raw = env.get(env.REPLICATION_RATE)
            if raw is not None:
                try:
                    rate_limit_bps = float(raw)
                except ValueError as exc:
                    raise ConfigError(
                        f"Environment variable {env.REPLICATION_RATE}={raw!r} must be a number of bytes per second."
                    ) from exc
        return cls(replicas=int(replicas), rate_limit_bps=rate_limit_bps, **kwargs)  # type: ignore[arg-type]
