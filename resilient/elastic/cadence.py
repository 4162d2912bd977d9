"""Which periodic snapshots a worker takes: pure decision logic, no clock, no I/O.

A snapshot only helps once it is committed, and step ``s`` commits only when *every* rank snapshotted
``s`` and its copies are placed. Replication runs beside training; when it is slower than the snapshot
interval, ranks that each snapshot "whenever the previous one committed" drift onto different steps (each
sees the commit at a slightly different step) and no step ever has all its shards: commits stop.

The cadence keeps every rank on the same steps without talking to the others:

* a periodic snapshot is taken at completed steps that are multiples of ``every × stride``, where the
  stride is a power of two;
* at a step where a snapshot is due while this rank's previous one is still uncommitted, replication is
  behind: the stride doubles (up to ``max_stride``) and the snapshot is taken only if the step is also a
  multiple of the new interval;
* the stride halves again at a due step when the previous snapshot's commit was seen within a quarter of
  the interval (hysteresis, so that it does not flap).

Ranks may disagree on the stride for a while (they see commits at different steps), but every multiple of
the larger power-of-two interval is a snapshot step of every rank, so commits resume at those steps, and a
rank whose orphaned snapshot never commits doubles onto the common grid at its next due step. The
property is checked by a simulation in ``tests/elastic/test_cadence.py``.

Steps here are *completed-step counts* (a snapshot after step ``s`` holds ``s + 1`` completed steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from resilient.errors import ConfigError

MAX_STRIDE = 64


@dataclass(frozen=True)
class Change:
    """A stride change, for the log and the ``snapshot.cadence`` event."""

    old: int
    new: int
    reason: str


class SnapshotCadence:
    """See the module docstring. ``every`` 0 turns periodic snapshots off."""

    def __init__(self, every: int, max_stride: int = MAX_STRIDE) -> None:
        if every < 0:
            raise ConfigError(f"snapshot_every must be >= 0 steps; got {every}.")
        if max_stride < 1 or max_stride & (max_stride - 1):
            raise ConfigError(f"max_stride must be a power of two >= 1; got {max_stride}.")
        self.every = every
        self.max_stride = max_stride
        self.stride = 1
        self.written: int | None = None  # the newest periodic snapshot of this generation
        self.seen_at: int | None = None  # completed-step count when its commit was first seen
        self.last_change: Change | None = None

    def new_generation(self) -> None:
        """Snapshots of an older generation can never commit (commits are fenced): forget the pending one.
        The stride is kept: replication speed did not change with the membership."""
        self.written = None
        self.seen_at = None

    def observe(self, completed: int, committed: int | None) -> None:
        """Called after every step with the committed step the runtime reports."""
        if self.written is not None and self.seen_at is None and committed is not None and committed >= self.written:
            self.seen_at = completed

    def pending(self, committed: int | None) -> bool:
        """True while this rank's newest periodic snapshot is not committed."""
        return self.written is not None and (committed is None or committed < self.written)

    def candidate(self, completed: int) -> bool:
        """True at a multiple of ``every × stride``: the only steps where ``due`` can say yes or change
        the stride (callers ask for a fresh committed step only there)."""
        return bool(self.every) and completed % (self.every * self.stride) == 0

    def due(self, completed: int, committed: int | None) -> bool:
        """Whether to snapshot after ``completed`` steps; may change the stride (see ``last_change``)."""
        self.last_change = None
        if not self.candidate(completed):
            return False
        n = completed // self.every
        if self.pending(committed):
            if self.stride < self.max_stride:
                self._set(self.stride * 2, f"snapshot of step {self.written} not committed after "
                                           f"{completed - self.written} steps")
            return n % self.stride == 0
        if self.stride > 1 and self.written is not None and self.seen_at is not None:
            lag = self.seen_at - self.written
            if lag * 4 <= self.stride * self.every:
                self._set(self.stride // 2, f"snapshot of step {self.written} committed within {lag} steps")
        return True

    def took(self, completed: int) -> None:
        """A periodic snapshot of ``completed`` steps was written."""
        self.written = completed
        self.seen_at = None

    def _set(self, stride: int, reason: str) -> None:
        self.last_change = Change(self.stride, stride, reason)
        self.stride = stride


__all__ = ["Change", "MAX_STRIDE", "SnapshotCadence"]
