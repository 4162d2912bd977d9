"""Membership: this node's etcd lease, its ``nodes/<node>`` key, and the keep-alive thread.

The lease TTL and keep-alive interval come from the job's ``Timeouts``. The keep-alive thread survives
transient etcd errors and leader changes (an error is logged and retried with backoff; it never ends the
thread); only etcd's definitive answer that the lease is gone (``LeaseExpiredError``) marks it lost and
calls ``on_lease_lost``, after which the node must rejoin with a new lease (``ensure``). Progress reports
(``progress/<node>``, bound to the lease) are rate-limited and the last one is flushed by the keep-alive
thread; ``report_progress(..., wait=False)`` never blocks its caller on etcd (the due write runs on a
short-lived thread, one at a time), so a slow etcd link cannot stall the agent's monitor loop.
``keepalive_once`` is the thread's body, callable directly by tests that drive time themselves.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Callable

from resilient import events
from resilient.config import Timeouts
from resilient.errors import EtcdError, LeaseExpiredError
from resilient.etcd.api import KVStore
from resilient.keys import JobKeys
from resilient.logs import get_logger
from resilient.rendezvous.model import NodeInfo

log = get_logger(__name__)


class Membership:
    def __init__(
        self,
        kv: KVStore,
        keys: JobKeys,
        node: NodeInfo,
        timeouts: Timeouts,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_lease_lost: Callable[[int], None] | None = None,
    ) -> None:
        self.kv = kv
        self.keys = keys
        self.node = node
        self.timeouts = timeouts
        self.clock = clock
        self.wall = wall
        self.on_lease_lost = on_lease_lost
        self._lock = threading.Lock()
        self._lease: int | None = None
        self._announced = False  # nodes/<node> written under the current lease
        self._last_ok: float | None = None
        self._failures = 0
        self._lost = False
        self._pending_progress: bytes | None = None
        self._last_progress_put = float("-inf")
        self._flushing = False  # a background progress write is in flight
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the lease ----------------------------------------------------------------------------------------
    @property
    def lease(self) -> int | None:
        with self._lock:
            return None if self._lost else self._lease

    @property
    def announced(self) -> bool:
        with self._lock:
            return self._announced and not self._lost

    def mark_announced(self, lease: int) -> None:
        with self._lock:
            if self._lease == lease:
                self._announced = True

    def ensure(self) -> int:
        """The current lease, granting a new one if there is none or it was lost."""
        with self._lock:
            if self._lease is not None and not self._lost:
                return self._lease
        lease = self.kv.lease_grant(self.timeouts.lease_ttl)
        with self._lock:
            self._lease = lease
            self._announced = False
            self._lost = False
            self._failures = 0
            self._last_ok = self.clock()
        log.info("holding etcd lease %x (ttl %ds)", lease, self.timeouts.lease_ttl)
        return lease

    def node_value(self) -> bytes:
        return self.node.to_json()

    def mark_lost(self, lease: int | None = None) -> None:
        """The lease is gone (etcd said so): forget it and tell the owner once."""
        with self._lock:
            if self._lease is None or self._lost or (lease is not None and lease != self._lease):
                return
            self._lost = True
            lost = self._lease
        log.warning("etcd lease %x is gone: this node must rejoin", lost)
        events.emit("lease.lost", lease=f"{lost:x}")
        if self.on_lease_lost is not None:
            self.on_lease_lost(lost)

    def healthy(self) -> bool:
        """A lease is held and was refreshed within its TTL."""
        with self._lock:
            if self._lease is None or self._lost or self._last_ok is None:
                return False
            return self.clock() - self._last_ok < self.timeouts.lease_ttl

    # -- keep-alive ---------------------------------------------------------------------------------------
    def keepalive_once(self) -> float:
        """Refresh the lease once; returns the delay before the next refresh (shorter after an error)."""
        with self._lock:
            lease = None if self._lost else self._lease
        interval = self.timeouts.keepalive_interval
        if lease is None:
            return interval
        try:
            self.kv.lease_keepalive(lease)
        except LeaseExpiredError:
            self.mark_lost(lease)
            return interval
        except EtcdError as exc:
            with self._lock:
                self._failures += 1
                failures = self._failures
            delay = min(interval, 0.05 * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
            log.warning("lease %x keep-alive failed (%d in a row): %s; retrying in %.2fs", lease, failures, exc, delay)
            return delay
        with self._lock:
            self._failures = 0
            self._last_ok = self.clock()
        self.flush_progress()
        return interval

    def _run(self) -> None:
        delay = self.timeouts.keepalive_interval
        while not self._stop.wait(delay):
            try:
                delay = self.keepalive_once()
            except Exception:  # the keep-alive must outlive any one failure; logged with its traceback
                log.exception("lease keep-alive raised unexpectedly; retrying")
                delay = min(self.timeouts.keepalive_interval, 0.5)

    def start(self) -> None:
        """Start the keep-alive thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"lease-keepalive:{self.node.node_id}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.timeouts.request_deadline + 1)

    def revoke(self) -> None:
        """Graceful leave: stop refreshing and revoke the lease (its keys vanish at once)."""
        self.stop()
        with self._lock:
            lease, self._lease = self._lease, None
            self._announced = False
        if lease is not None:
            self.kv.lease_revoke(lease)
            log.info("revoked etcd lease %x (left the job)", lease)

    # -- progress -----------------------------------------------------------------------------------------
    def report_progress(self, step: int, generation: int | None, *, wait: bool = True) -> None:
        """Record the last step seen on this node; written at most once per keep-alive interval. With
        ``wait=False`` a due write goes to a background thread (skipped while one is in flight: the value
        stays pending for the next report or the keep-alive thread)."""
        value = json.dumps({"step": step, "gen": generation, "t": self.wall()}, separators=(",", ":")).encode()
        now = self.clock()
        with self._lock:
            self._pending_progress = value
            due = now - self._last_progress_put >= self.timeouts.keepalive_interval
        if due and wait:
            self.flush_progress()
        elif due:
            self._flush_in_background()

    def _flush_in_background(self) -> None:
        with self._lock:
            if self._flushing:
                return
            self._flushing = True

        def run() -> None:
            try:
                self.flush_progress()
            finally:
                with self._lock:
                    self._flushing = False

        threading.Thread(target=run, name=f"progress:{self.node.node_id}", daemon=True).start()

    def flush_progress(self) -> None:
        with self._lock:
            value, self._pending_progress = self._pending_progress, None
            lease = None if self._lost else self._lease
            if value is None or lease is None:
                return
            self._last_progress_put = self.clock()
        try:
            self.kv.put(self.keys.progress(self.node.node_id), value, lease=lease)
        except LeaseExpiredError:
            self.mark_lost(lease)
        except EtcdError as exc:
            log.warning("could not record progress: %s (will retry with the next report)", exc)
            with self._lock:
                if self._pending_progress is None:
                    self._pending_progress = value
