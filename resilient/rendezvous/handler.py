"""``Rendezvous``: the public face of the rendezvous for the node agent.

It owns this node's membership (lease + keep-alive thread), runs ``JoinAttempt`` until a generation that
includes this node forms, watches that generation for the events that end it, and offers the fenced
writes (faults, transactions on behalf of a generation), the restart budget, progress reports and
closing the job. Decisions live in ``state.py``; etcd operations in ``executor.py``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Callable, Sequence

from resilient import events, logs
from resilient.errors import (
    EtcdError,
    EtcdUnavailableError,
    FencedError,
    RendezvousClosedError,
    RendezvousError,
    RendezvousTimeoutError,
)
from resilient.etcd.api import Compare, KVStore, Op, Put, TxnResult
from resilient.keys import JobKeys
from resilient.logs import get_logger
from resilient.rendezvous import executor
from resilient.rendezvous.executor import GenerationWatch, JoinAttempt, Joined, fenced_txn
from resilient.rendezvous.membership import Membership
from resilient.rendezvous.model import Assignment, NodeInfo
from resilient.rendezvous.settings import RendezvousSettings

log = get_logger(__name__)


class Rendezvous:
    """Join generations of job ``job`` as ``node``; see the module docstring."""

    def __init__(
        self,
        kv: KVStore,
        job: str,
        node: NodeInfo,
        settings: RendezvousSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.keys = JobKeys(job)
        self.node = node
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.membership = Membership(
            kv, self.keys, node, settings.timeouts, clock=clock, wall=wall, on_lease_lost=self._lease_lost
        )
        self._lock = threading.Lock()
        self._current: Joined | None = None
        self._watch: GenerationWatch | None = None
        self._attempt: JoinAttempt | None = None
        self.requests = 0  # etcd requests made by join() (benchmark accounting)

    # -- joining ------------------------------------------------------------------------------------------
    def join(self, timeout: float | None = None) -> Assignment:
        """Block until a generation that includes this node forms; returns its assignment.

        Raises RendezvousTimeoutError after ``timeout`` (default ``join_timeout``) seconds, naming MIN and
        the nodes that were waiting; RendezvousClosedError when the job was closed. A lost lease is
        replaced and the node asks in again; etcd outages are retried until the deadline.
        """
        limit = self.settings.join_timeout if timeout is None else timeout
        deadline = self.clock() + limit
        self._stop_watch()
        self.membership.ensure()
        self.membership.start()
        wake = threading.Event()
        with self._lock:
            last = self._current
        attempt = JoinAttempt(
            self.kv, self.keys, self.node, self.settings, self.membership, wall=self.wall, notify=wake.set, last=last
        )
        with self._lock:
            self._attempt = attempt
        delay = 0.05
        try:
            while True:
                now = self.clock()
                if now >= deadline:
                    raise self._timeout_error(limit, attempt)
                wake.clear()
                try:
                    outcome = attempt.step(now)
                    delay = 0.05
                except EtcdUnavailableError as exc:
                    log.warning("etcd unavailable while joining (%s); retrying", exc)
                    outcome = executor.Pending(now + delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 1.0)
                if isinstance(outcome, Joined):
                    break
                until = deadline if outcome.wake_at is None else min(outcome.wake_at, deadline)
                wake.wait(max(0.0, until - self.clock()))
        except BaseException:
            self._abandon(attempt)
            raise
        finally:
            self.requests += attempt.requests + 1
            with self._lock:
                self._attempt = None
        a = outcome.assignment
        with self._lock:
            self._current = outcome
        logs.set_identity(gen=a.generation)
        events.emit("rdzv.joined", gen=a.generation, world_size=a.world_size, ranks=list(a.ranks_of(self.node.node_id)))
        return a

    def _abandon(self, attempt: JoinAttempt) -> None:
        try:
            attempt.cancel()
        except EtcdError as exc:
            log.warning("could not withdraw from the round cleanly: %s", exc)

    def _timeout_error(self, limit: float, attempt: JoinAttempt) -> RendezvousTimeoutError:
        try:
            kvs, _ = self.kv.get_prefix(self.keys.waiting_prefix)
            present = sorted(kv.key[len(self.keys.waiting_prefix):] for kv in kvs)
            who = ", ".join(present[:20]) if present else "none"
            if len(present) > 20:
                who += f" and {len(present) - 20} more ({len(present)} in all)"
        except EtcdError as exc:
            who = f"unknown (etcd: {exc})"
        return RendezvousTimeoutError(
            f"No generation including node {self.node.node_id} formed within {limit:g}s for job "
            f"{self.keys.job!r}: it needs at least MIN={self.settings.min_nodes} nodes (MAX="
            f"{self.settings.max_nodes}); nodes present: {who}. Start more nodes, lower --nnodes MIN, or raise "
            "the join timeout."
        )

    def current(self) -> Assignment | None:
        with self._lock:
            return self._current.assignment if self._current is not None else None

    # -- watching the generation --------------------------------------------------------------------------
    def watch(self, on_new_round: Callable[[str], None]) -> None:
        """Call ``on_new_round(reason)`` once (from a watch thread) when the current generation is no longer
        valid: ``node-lost:<n>``, ``fault:<n>``, ``join:<n>``, ``superseded:<g>``, ``closed`` or
        ``lease-lost:<this node>``."""
        with self._lock:
            cur = self._current
        if cur is None:
            raise RendezvousError("watch() needs a generation: call join() first.")
        self._stop_watch()
        w = GenerationWatch(self.kv, self.keys, cur.assignment, cur.formed_rev, self.settings.max_nodes, on_new_round)
        with self._lock:
            self._watch = w
        w.start()
        if self.membership.lease is None:
            w.fire(f"lease-lost:{self.node.node_id}")

    def _stop_watch(self) -> None:
        with self._lock:
            w, self._watch = self._watch, None
        if w is not None:
            w.cancel()

    def _lease_lost(self, lease: int) -> None:
        with self._lock:
            w = self._watch
        if w is not None:
            w.fire(f"lease-lost:{self.node.node_id}")

    # -- writes on behalf of a generation -----------------------------------------------------------------
    def fenced_txn(
        self, generation: int, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """``txn`` guarded by ``generation`` being the newest and this node holding its lease; raises
        FencedError when the job has moved past ``generation`` (or this node's lease is gone)."""
        return fenced_txn(
            self.kv, self.keys, generation, self.node.node_id, self.membership.lease, compares, success, failure
        )

    def publish_fault(self, generation: int, what: str, detail: dict) -> None:
        """Write ``fault/<generation>/<this node>`` (fenced): every member watching moves to a new round."""
        value = executor._fault_value(what, detail, self.node.node_id, self.wall())
        self.fenced_txn(generation, [], [Put(self.keys.fault(generation, self.node.node_id), value)])
        log.info("published fault for generation %d: %s", generation, what)
        events.emit("fault.published", gen=generation, node=self.node.node_id, what=what)

    def consume_restart(self, reason: str) -> int:
        """Charge the job-wide restart budget for leaving the current generation (once per generation,
        whoever reports it); returns the job's restart count. RestartBudgetExceededError when spent."""
        cur = self.current()
        return executor.consume_restart(
            self.kv,
            self.keys,
            cur.generation if cur is not None else 0,
            reason,
            self.settings.max_restarts,
            self.settings.restart_window,
            self.wall,
        )

    def report_progress(self, step: int, *, wait: bool = True) -> None:
        """Record the last step seen on this node (``progress/<node>``, bound to the lease; rate-limited).
        ``wait=False``: never block on etcd (see ``Membership.report_progress``)."""
        cur = self.current()
        self.membership.report_progress(step, cur.generation if cur is not None else None, wait=wait)

    def close_job(self, status: str, reason: str) -> None:
        """Mark the job closed (done or failed); the first close wins. Others' join() then raise
        RendezvousClosedError and their watches fire ``closed``."""
        value = json.dumps(
            {"status": status, "reason": reason, "by": self.node.node_id, "t": self.wall()}, separators=(",", ":")
        ).encode()
        self.kv.txn([Compare(self.keys.closed, "version", "==", 0)], [Put(self.keys.closed, value)])
        log.info("closed job %s: %s (%s)", self.keys.job, status, reason)

    def leave(self) -> None:
        """Graceful leave: stop watching and revoke the lease (this node's keys vanish; not a failure)."""
        self._stop_watch()
        self.membership.revoke()
        with self._lock:
            self._current = None

    def lease_healthy(self) -> bool:
        return self.membership.healthy()


__all__ = ["Rendezvous", "FencedError", "RendezvousClosedError", "RendezvousTimeoutError"]
