"""``FakeKV``: an in-memory twin of the etcd v3 semantics resilient uses, for pure-logic and property-based
tests (no process, no network, time injected).

What it models, as etcd does: one global revision bumped once per write request (a transaction with
several writes is one revision; a delete that removes nothing is none); per-key ``create_revision``,
``mod_revision``, ``version`` and lease; transactions whose compares are evaluated atomically (a missing
key has version/create/mod/lease 0 and fails every value compare); leases that expire ``ttl`` seconds
after the last keep-alive on the injected clock and delete their keys in one revision; watches that
deliver every change under a prefix in revision order with the previous value, replaying history from a
start revision.

Test controls: ``advance(dt)`` moves the clock forward (and expires leases), ``expire_leases()`` applies
expiry at the current time, ``leader_change()`` renews every lease as a new etcd leader does,
``fail_next(n, exc, after=...)`` makes the next ``n`` requests raise (before applying them, or after —
an indeterminate failure).

Watch delivery is synchronous by default: events are delivered in the writer's thread after the write
commits and the store lock is released, in revision order even with concurrent writers, and writes made
from inside a callback are delivered after that callback returns. ``FakeKV(threaded_watches=True)``
delivers from one background thread instead, like the real client.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from resilient.errors import ConfigError, EtcdError, EtcdUnavailableError, LeaseExpiredError
from resilient.etcd.api import (
    Compare,
    Delete,
    Get,
    KeyValue,
    KVStore,
    Op,
    Put,
    TxnResult,
    WatchEvent,
    WatchHandle,
)
from resilient.logs import get_logger

log = get_logger(__name__)


@dataclass
class _Lease:
    ttl: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


@dataclass
class _Failure:
    remaining: int
    exc: BaseException
    after: bool
    ops: frozenset[str] | None


class _FakeWatch(WatchHandle):
    def __init__(self, kv: "FakeKV", prefix: str, callback: Callable[[WatchEvent], None], next_revision: int) -> None:
        self.kv = kv
        self.prefix = prefix
        self.callback = callback
        self.next_revision = next_revision
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.kv._remove_watch(self)


class ManualClock:
    """A clock for tests: ``clock()`` returns the time, ``clock.advance(dt)`` moves it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"time cannot go backwards (dt={dt})")
        with self._lock:
            self._now += dt


class FakeKV(KVStore):
    """See base class and module docstring."""

    def __init__(self, now: Callable[[], float] | None = None, *, threaded_watches: bool = False) -> None:
        self._clock = now or time.monotonic
        self._offset = 0.0
        self._lock = threading.RLock()
        self._rev = 1  # an empty etcd is at revision 1
        self._data: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 0x7E57_0000_0000_0001
        self._history: list[tuple[int, WatchEvent]] = []
        self._watches: list[_FakeWatch] = []
        self._failures: list[_Failure] = []
        self._pending: collections.deque[tuple[_FakeWatch, WatchEvent]] = collections.deque()
        self._deliver_lock = threading.Lock()
        self._delivering = threading.local()
        self._closed = False
        self._threaded = threaded_watches
        self._wakeup = threading.Condition()
        self._dispatcher: threading.Thread | None = None
        if threaded_watches:
            self._dispatcher = threading.Thread(target=self._dispatch_loop, name="fakekv-watch", daemon=True)
            self._dispatcher.start()
        self.requests = 0  # how many requests were made (for request-count assertions and benchmarks)

    # -- test controls --------------------------------------------------------------------------------------
    def now(self) -> float:
        return self._clock() + self._offset

    def advance(self, dt: float) -> None:
        """Move this store's clock forward by ``dt`` seconds and expire the leases that ran out."""
        if dt < 0:
            raise ValueError(f"time cannot go backwards (dt={dt})")
        with self._lock:
            self._offset += dt
        self.expire_leases()

    def expire_leases(self) -> list[int]:
        """Revoke every lease whose TTL ran out by now; returns their ids."""
        with self._lock:
            now = self.now()
            expired = [lid for lid, lease in self._leases.items() if lease.expires_at <= now]
            for lid in expired:
                self._revoke_locked(lid)
        self._drain()
        return expired

    def leader_change(self) -> None:
        """What a new etcd leader does to leases: every lease gets its full TTL again."""
        with self._lock:
            now = self.now()
            for lease in self._leases.values():
                lease.expires_at = now + lease.ttl

    def fail_next(
        self,
        n: int = 1,
        exc: BaseException | None = None,
        *,
        after: bool = False,
        ops: Sequence[str] | None = None,
    ) -> None:
        """The next ``n`` requests (of the named ``ops``, e.g. ``("txn", "put")``, or any) raise ``exc``
        (default: EtcdUnavailableError). With ``after=True`` the request is applied first and then raises:
        an indeterminate failure, as when etcd's leader changes while a write is in flight."""
        if n < 1:
            raise ValueError(f"fail_next needs n >= 1, got {n}")
        exc = exc or EtcdUnavailableError("Injected failure: etcd unavailable (FakeKV.fail_next).")
        with self._lock:
            self._failures.append(_Failure(n, exc, after, frozenset(ops) if ops else None))

    def lease_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._leases)

    # -- plumbing -------------------------------------------------------------------------------------------
    def _begin(self, op: str) -> _Failure | None:
        """Count the request, apply lazy lease expiry, and return an armed failure for it (if any)."""
        with self._lock:
            if self._closed:
                raise EtcdError("This FakeKV is closed.")
            self.requests += 1
            now = self.now()
            for lid in [lid for lid, lease in self._leases.items() if lease.expires_at <= now]:
                self._revoke_locked(lid)
            for failure in self._failures:
                if failure.ops is None or op in failure.ops:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    if not failure.after:
                        raise failure.exc
                    return failure
        return None

    def _finish(self, failure: _Failure | None) -> None:
        self._drain()
        if failure is not None:
            raise failure.exc

    def _record(self, event: WatchEvent) -> None:
        self._history.append((event.mod_revision, event))
        for w in self._watches:
            if event.key.startswith(w.prefix) and event.mod_revision >= w.next_revision:
                self._pending.append((w, event))

    def _put_locked(self, key: str, value: bytes, lease: int, rev: int) -> None:
        if lease and lease not in self._leases:
            raise LeaseExpiredError(
                f"FakeKV put of {key!r}: requested lease {lease:x} not found; it expired or was revoked and this "
                "node must rejoin with a new lease."
            )
        old = self._data.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        kv = KeyValue(
            key=key,
            value=bytes(value),
            create_revision=old.create_revision if old else rev,
            mod_revision=rev,
            version=(old.version + 1) if old else 1,
            lease=lease,
        )
        self._data[key] = kv
        if lease:
            self._leases[lease].keys.add(key)
        self._record(WatchEvent("put", key, kv.value, rev, old.value if old else None))

    def _delete_locked(self, key: str, prefix: bool, rev: int) -> int:
        keys = sorted(k for k in self._data if k.startswith(key)) if prefix else ([key] if key in self._data else [])
        for k in keys:
            old = self._data.pop(k)
            if old.lease and old.lease in self._leases:
                self._leases[old.lease].keys.discard(k)
            self._record(WatchEvent("delete", k, b"", rev, old.value))
        return len(keys)

    def _revoke_locked(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None or not lease.keys:
            return
        rev = self._rev + 1
        for k in sorted(lease.keys):
            old = self._data.pop(k, None)
            if old is not None:
                self._record(WatchEvent("delete", k, b"", rev, old.value))
        self._rev = rev

    def _range_locked(self, key: str, prefix: bool) -> list[KeyValue]:
        if prefix:
            return [self._data[k] for k in sorted(k for k in self._data if k.startswith(key))]
        kv = self._data.get(key)
        return [kv] if kv is not None else []

    # -- watch delivery -------------------------------------------------------------------------------------
    def _drain(self) -> None:
        if self._threaded:
            with self._wakeup:
                self._wakeup.notify_all()
            return
        if getattr(self._delivering, "active", False):
            return  # a write made from inside a callback: the outer drain delivers it next
        while True:
            with self._deliver_lock:
                self._delivering.active = True
                try:
                    self._deliver_pending()
                finally:
                    self._delivering.active = False
            with self._lock:
                if not self._pending:
                    return

    def _deliver_pending(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                watch, event = self._pending.popleft()
                if watch.cancelled:
                    continue
            try:
                watch.callback(event)
            except Exception:  # a faulty callback must not stop delivery to the others; logged with traceback
                log.exception("FakeKV watch callback for %r failed on %s %s", watch.prefix, event.type, event.key)

    def _dispatch_loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._closed and not self._pending:
                    self._wakeup.wait(0.1)
                if self._closed:
                    return
            self._deliver_pending()

    def _remove_watch(self, watch: _FakeWatch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    # -- KVStore --------------------------------------------------------------------------------------------
    def get(self, key: str) -> KeyValue | None:
        failure = self._begin("get")
        with self._lock:
            kv = self._data.get(key)
        self._finish(failure)
        return kv

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        failure = self._begin("get_prefix")
        with self._lock:
            result = (self._range_locked(prefix, True), self._rev)
        self._finish(failure)
        return result

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        failure = self._begin("put")
        with self._lock:
            rev = self._rev + 1
            self._put_locked(key, value, lease, rev)
            self._rev = rev
        self._finish(failure)
        return rev

    def delete(self, key: str, prefix: bool = False) -> int:
        failure = self._begin("delete")
        with self._lock:
            n = self._delete_locked(key, prefix, self._rev + 1)
            if n:
                self._rev += 1
        self._finish(failure)
        return n

    def _compare_locked(self, c: Compare) -> bool:
        if c.prefix:
            # etcd's range compare: every key in the range must pass; an empty range passes (as a missing
            # key, with zero revisions), except a compare on value, which fails
            kvs = self._range_locked(c.key, True)
            if not kvs:
                return c.target != "value" and self._compare_kv_locked(c, None)
            return all(self._compare_kv_locked(c, kv) for kv in kvs)
        return self._compare_kv_locked(c, self._data.get(c.key))

    def _compare_kv_locked(self, c: Compare, kv: KeyValue | None) -> bool:
        if c.target == "value":
            if not isinstance(c.value, (bytes, bytearray)):
                raise ConfigError(f"Compare on value needs bytes, got {type(c.value).__name__} in {c!r}.")
            if kv is None:
                return False
            left: object = kv.value
            right: object = bytes(c.value)
        else:
            if not isinstance(c.value, int):
                raise ConfigError(f"Compare on {c.target} needs an int, got {type(c.value).__name__} in {c!r}.")
            attr = {"version": "version", "create": "create_revision", "mod": "mod_revision", "lease": "lease"}
            if c.target not in attr:
                raise ConfigError(f"Unsupported transaction compare {c!r}: target unknown.")
            left = getattr(kv, attr[c.target]) if kv is not None else 0
            right = c.value
        if c.op == "==":
            return left == right
        if c.op == "!=":
            return left != right
        if c.op == "<":
            return left < right  # type: ignore[operator]
        if c.op == ">":
            return left > right  # type: ignore[operator]
        raise ConfigError(f"Unsupported transaction compare {c!r}: op unknown.")

    def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        for op in list(success) + list(failure):
            if not isinstance(op, (Put, Delete, Get)):
                raise ConfigError(f"Unsupported transaction operation {op!r}: use Put, Delete or Get.")
        for branch in (success, failure):
            puts = [op.key for op in branch if isinstance(op, Put)]
            if len(puts) != len(set(puts)):
                raise EtcdError(f"etcd refuses a transaction that puts the same key twice: {sorted(puts)}.")
        injected = self._begin("txn")
        with self._lock:
            ok = all(self._compare_locked(c) for c in compares)
            ops = success if ok else failure
            for op in ops:  # validate before applying anything: a transaction is all or nothing
                if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                    raise LeaseExpiredError(
                        f"FakeKV txn put of {op.key!r}: requested lease {op.lease:x} not found; it expired or was "
                        "revoked and this node must rejoin with a new lease."
                    )
            rev = self._rev + 1
            wrote = False
            responses: list = []
            for op in ops:
                if isinstance(op, Put):
                    self._put_locked(op.key, op.value, op.lease, rev)
                    wrote = True
                    responses.append(None)
                elif isinstance(op, Delete):
                    wrote = self._delete_locked(op.key, op.prefix, rev) > 0 or wrote
                    responses.append(None)
                else:
                    responses.append(self._range_locked(op.key, op.prefix))
            if wrote:
                self._rev = rev
            result = TxnResult(succeeded=ok, revision=self._rev, responses=responses)
        self._finish(injected)
        return result

    def lease_grant(self, ttl: int) -> int:
        if int(ttl) != ttl or ttl < 1:
            raise ConfigError(f"Lease TTL {ttl!r} must be a whole number of seconds >= 1.")
        failure = self._begin("lease_grant")
        with self._lock:
            lid = self._next_lease
            self._next_lease += 1
            self._leases[lid] = _Lease(int(ttl), self.now() + int(ttl))
        self._finish(failure)
        return lid

    def lease_keepalive(self, lease_id: int) -> int:
        failure = self._begin("lease_keepalive")
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise LeaseExpiredError(
                    f"etcd lease {lease_id:x} no longer exists (expired or revoked): this node was paused or cut "
                    "off past its TTL and must rejoin with a new lease."
                )
            lease.expires_at = self.now() + lease.ttl
            ttl = lease.ttl
        self._finish(failure)
        return ttl

    def lease_revoke(self, lease_id: int) -> None:
        failure = self._begin("lease_revoke")
        with self._lock:
            self._revoke_locked(lease_id)
        self._finish(failure)

    def lease_ttl(self, lease_id: int) -> int:
        failure = self._begin("lease_ttl")
        with self._lock:
            lease = self._leases.get(lease_id)
            ttl = -1 if lease is None else max(0, int(lease.expires_at - self.now()))
        self._finish(failure)
        return ttl

    def watch_prefix(
        self, prefix: str, callback: Callable[[WatchEvent], None], start_revision: int | None = None
    ) -> WatchHandle:
        """See base class. Delivers every change at a revision > ``start_revision`` (default: the current
        revision), replaying history first."""
        with self._lock:
            if self._closed:
                raise EtcdError("This FakeKV is closed.")
            first = (start_revision if start_revision is not None else self._rev) + 1
            watch = _FakeWatch(self, prefix, callback, first)
            for rev, event in self._history:
                if rev >= first and event.key.startswith(prefix):
                    self._pending.append((watch, event))
            self._watches.append(watch)
        self._drain()
        return watch

    def revision(self) -> int:
        failure = self._begin("revision")
        with self._lock:
            rev = self._rev
        self._finish(failure)
        return rev

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._watches:
                w.cancelled = True
            self._watches.clear()
        if self._dispatcher is not None:
            with self._wakeup:
                self._wakeup.notify_all()
            if threading.current_thread() is not self._dispatcher:
                self._dispatcher.join(timeout=5)

    def snapshot(self) -> dict[str, KeyValue]:
        """Every key and its metadata (for assertions)."""
        with self._lock:
            return {k: replace(v) for k, v in self._data.items()}
