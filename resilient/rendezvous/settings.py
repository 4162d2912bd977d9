"""Validated settings of the rendezvous: node range, last-call window, join timeout, restart budget."""

from __future__ import annotations

from dataclasses import dataclass, field

from resilient.config import NodeRange, Timeouts
from resilient.errors import ConfigError


@dataclass(frozen=True)
class RendezvousSettings:
    """How a generation forms.

    ``min_nodes``..``max_nodes`` nodes per generation; once ``min_nodes`` are waiting the round stays open
    ``last_call`` seconds for latecomers, and closes at once when ``max_nodes`` are waiting or when every
    surviving member of the previous generation is back. ``join_timeout`` bounds how long ``join`` waits.
    The job may restart ``max_restarts`` times (per ``restart_window`` seconds when given, else in total).
    """

    min_nodes: int
    max_nodes: int
    last_call: float = 1.0
    join_timeout: float = 600.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_restarts: int = 3
    restart_window: float | None = None

    def __post_init__(self) -> None:
        NodeRange(self.min_nodes, self.max_nodes)  # validates MIN:MAX with its own messages
        if self.last_call < 0:
            raise ConfigError(f"last_call={self.last_call:g}s must be >= 0.")
        if self.join_timeout <= self.last_call:
            raise ConfigError(
                f"join_timeout={self.join_timeout:g}s must exceed last_call={self.last_call:g}s, "
                "or a round can time out while it is still waiting for latecomers."
            )
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts={self.max_restarts} must be >= 0.")
        if self.restart_window is not None and self.restart_window <= 0:
            raise ConfigError(f"restart_window={self.restart_window:g}s must be > 0 (or None for no window).")

    @classmethod
    def from_timeouts(
        cls, nodes: NodeRange, timeouts: Timeouts, max_restarts: int = 3, restart_window: float | None = None
    ) -> "RendezvousSettings":
        """Take last_call and join_timeout from the job's one timeout budget."""
        return cls(
            min_nodes=nodes.min_nodes,
            max_nodes=nodes.max_nodes,
            last_call=timeouts.last_call,
            join_timeout=timeouts.join_timeout,
            timeouts=timeouts,
            max_restarts=max_restarts,
            restart_window=restart_window,
        )
