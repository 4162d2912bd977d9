"""Prometheus metrics of one node agent (``--metrics-port``), on a private registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from resilient.errors import ConfigError

PHASES = ("detect", "rendezvous", "restore", "first_step")


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.restarts = Counter("resilient_restarts", "Generations this node left because of a fault", registry=r)
        self.generation = Gauge("resilient_generation", "Current generation", registry=r)
        self.world_size = Gauge("resilient_world_size", "World size of the current generation", registry=r)
        self.workers_alive = Gauge("resilient_workers_alive", "Live worker processes on this node", registry=r)
        self.worker_exits = Counter("resilient_worker_exits", "Worker exits", ["outcome"], registry=r)
        self.hangs = Counter("resilient_worker_hangs", "Workers killed as hung", registry=r)
        self.stuck = Counter("resilient_worker_stuck", "Workers killed for not leaving an ended generation",
                             registry=r)
        self.recovery = Gauge("resilient_recovery_seconds", "Last recovery, per phase", ["phase"], registry=r)
        self.recovery_total = Histogram("resilient_recovery_total_seconds", "Recovery time, fault to first step",
                                        buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.snapshot_stall = Histogram("resilient_snapshot_stall_seconds", "Training-thread stall per snapshot",
                                        buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=r)
        self.committed_step = Gauge("resilient_committed_step", "Newest committed step", registry=r)
        self.replication_bytes = Counter("resilient_replication_bytes", "Snapshot bytes sent to peers", registry=r)
        self.snapshot_host_bytes = Gauge("resilient_snapshot_host_bytes",
                                         "Shared memory held by snapshot segments on this host (own and replicas)",
                                         registry=r)
        self.spawn_seconds = Gauge("resilient_worker_start_seconds", "Last worker start to user code", ["how"],
                                   registry=r)
        self.port: int | None = None
        self._server = None

    def serve(self, port: int) -> int:
        """Serve on ``port`` (0: any free one); returns the port. ``ConfigError`` naming it when it cannot be bound."""
        try:
            server, _thread = start_http_server(port, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port}: cannot serve metrics on it ({exc.strerror or exc}); pick a free port, "
                "or 0 for any free one."
            ) from exc
        self._server = server
        self.port = server.server_address[1]
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
