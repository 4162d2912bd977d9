"""The KVStore contract, run against a real etcd (``EtcdKV``) and the in-memory ``FakeKV`` alike."""

from __future__ import annotations

import threading

import pytest

from resilient.errors import LeaseExpiredError
from resilient.etcd.api import Compare, Delete, Get, KVStore, Put, WatchEvent
from resilient.etcd.fake import FakeKV
from resilient.testing.etcd import wait_until


class Recorder:
    """Collects watch events delivered from another thread."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: WatchEvent) -> None:
        with self._lock:
            self.events.append(event)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[WatchEvent]:
        wait_until(lambda: len(self.snapshot()) >= n, timeout, f"{n} watch events")
        return self.snapshot()

    def snapshot(self) -> list[WatchEvent]:
        with self._lock:
            return list(self.events)


def test_put_get_and_prefix_sorted_with_metadata(kv: KVStore, prefix: str) -> None:
    r1 = kv.put(prefix + "b", b"2")
    r2 = kv.put(prefix + "a", b"1")
    r3 = kv.put(prefix + "b", b"22")
    assert r1 < r2 < r3
    kvs, rev = kv.get_prefix(prefix)
    assert [(k.key, k.value) for k in kvs] == [(prefix + "a", b"1"), (prefix + "b", b"22")]
    assert rev >= r3
    b = kv.get(prefix + "b")
    assert b is not None
    assert (b.create_revision, b.mod_revision, b.version, b.lease) == (r1, r3, 2, 0)
    assert kv.get(prefix + "missing") is None
    assert kv.revision() >= r3


def test_prefix_does_not_match_sibling_keys(kv: KVStore, prefix: str) -> None:
    kv.put(prefix + "x/1", b"in")
    kv.put(prefix + "x1", b"sibling")
    kvs, _ = kv.get_prefix(prefix + "x/")
    assert [k.key for k in kvs] == [prefix + "x/1"]


def test_delete_one_key_and_prefix_return_counts(kv: KVStore, prefix: str) -> None:
    for name in ("a", "b", "c"):
        kv.put(prefix + name, b"v")
    assert kv.delete(prefix + "a") == 1
    assert kv.delete(prefix + "a") == 0
    assert kv.delete(prefix, prefix=True) == 2
    assert kv.get_prefix(prefix)[0] == []


def test_txn_applies_success_or_failure_branch_atomically(kv: KVStore, prefix: str) -> None:
    k, other = prefix + "k", prefix + "other"
    kv.put(k, b"v1")
    ok = kv.txn([Compare(k, "value", "==", b"v1")], [Put(k, b"v2"), Put(other, b"o"), Get(prefix, prefix=True)], [])
    assert ok.succeeded
    assert ok.responses[0] is None and ok.responses[1] is None
    assert [x.value for x in ok.responses[2]] == [b"v2", b"o"]
    # both writes of one transaction share one revision
    assert kv.get(k).mod_revision == kv.get(other).mod_revision == ok.revision  # type: ignore[union-attr]

    failed = kv.txn([Compare(k, "value", "==", b"v1")], [Delete(k)], [Get(k)])
    assert not failed.succeeded
    assert [x.value for x in failed.responses[0]] == [b"v2"]
    assert kv.get(k) is not None


def test_a_prefix_compare_holds_only_when_every_key_under_it_does(kv: KVStore, prefix: str) -> None:
    """etcd's range compare: ``nothing under p changed after revision r`` in one guard; an empty range
    passes a revision compare and fails a value compare."""
    p = prefix + "step/"
    kv.put(p + "0", b"a")
    kv.put(p + "1", b"b")
    kv.put(prefix + "step0", b"sibling")  # outside the range
    _, read_at = kv.get_prefix(p)
    unchanged = Compare(p, "mod", "<", read_at + 1, prefix=True)
    assert kv.txn([unchanged], []).succeeded
    kv.put(prefix + "step0", b"sibling changed")
    assert kv.txn([unchanged], []).succeeded, "a key beside the range is not in it"
    kv.put(p + "1", b"b2")
    assert not kv.txn([unchanged], []).succeeded, "one key of the range changed after the read"
    assert kv.txn([Compare(p, "version", ">", 0, prefix=True)], []).succeeded
    empty = prefix + "none/"
    assert kv.txn([Compare(empty, "mod", "<", 1, prefix=True)], []).succeeded
    assert not kv.txn([Compare(empty, "value", "==", b"", prefix=True)], []).succeeded


def test_create_if_absent_with_version_zero(kv: KVStore, prefix: str) -> None:
    k = prefix + "leader"
    first = kv.txn([Compare(k, "version", "==", 0)], [Put(k, b"node-a")], [Get(k)])
    second = kv.txn([Compare(k, "version", "==", 0)], [Put(k, b"node-b")], [Get(k)])
    assert first.succeeded and not second.succeeded
    assert second.responses[0][0].value == b"node-a"
    assert kv.get(k).value == b"node-a"  # type: ignore[union-attr]


def test_mod_revision_cas_refuses_a_stale_writer(kv: KVStore, prefix: str) -> None:
    k = prefix + "gen"
    kv.put(k, b"1")
    seen = kv.get(k)
    assert seen is not None
    winner = kv.txn([Compare(k, "mod", "==", seen.mod_revision)], [Put(k, b"2")])
    stale = kv.txn([Compare(k, "mod", "==", seen.mod_revision)], [Put(k, b"2-stale")])
    assert winner.succeeded and not stale.succeeded
    assert kv.get(k).value == b"2"  # type: ignore[union-attr]
    assert kv.txn([Compare(k, "mod", ">", seen.mod_revision)], []).succeeded
    assert kv.txn([Compare(k, "create", "==", seen.create_revision)], []).succeeded


def test_lease_keepalive_and_revoke_deletes_keys(kv: KVStore, prefix: str) -> None:
    lease = kv.lease_grant(10)
    kv.put(prefix + "node", b"alive", lease=lease)
    assert kv.get(prefix + "node").lease == lease  # type: ignore[union-attr]
    assert kv.txn([Compare(prefix + "node", "lease", "==", lease)], []).succeeded
    assert kv.lease_keepalive(lease) == 10
    assert 0 < kv.lease_ttl(lease) <= 10
    kv.lease_revoke(lease)
    assert kv.get(prefix + "node") is None
    assert kv.lease_ttl(lease) == -1
    kv.lease_revoke(lease)  # already gone: not an error
    with pytest.raises(LeaseExpiredError):
        kv.lease_keepalive(lease)
    with pytest.raises(LeaseExpiredError):
        kv.put(prefix + "node", b"zombie", lease=lease)


def test_lease_expiry_deletes_keys(kv: KVStore, prefix: str) -> None:
    lease = kv.lease_grant(2)
    kv.put(prefix + "node", b"alive", lease=lease)
    kv.put(prefix + "kept", b"no lease")
    if isinstance(kv, FakeKV):
        kv.advance(1.5)
        assert kv.get(prefix + "node") is not None
        kv.advance(0.6)
    wait_until(lambda: kv.get(prefix + "node") is None, 10.0, "the leased key to expire")
    assert kv.lease_ttl(lease) == -1
    assert kv.get(prefix + "kept") is not None


def test_watch_delivers_in_order_with_deletes_and_prev_value(kv: KVStore, prefix: str) -> None:
    rec = Recorder()
    handle = kv.watch_prefix(prefix, rec)
    try:
        kv.put(prefix + "a", b"1")
        kv.put(prefix + "a", b"2")
        kv.txn([], [Put(prefix + "b", b"x"), Put(prefix + "c", b"y")])
        kv.put("/elsewhere" + prefix, b"not watched")
        kv.delete(prefix + "a")
        lease = kv.lease_grant(10)
        kv.put(prefix + "l", b"L", lease=lease)
        kv.lease_revoke(lease)
        events = rec.wait_for(7)
    finally:
        handle.cancel()
    got = [(e.type, e.key[len(prefix):], e.value, e.prev_value) for e in events]
    assert got == [
        ("put", "a", b"1", None),
        ("put", "a", b"2", b"1"),
        ("put", "b", b"x", None),
        ("put", "c", b"y", None),
        ("delete", "a", b"", b"2"),
        ("put", "l", b"L", None),
        ("delete", "l", b"", b"L"),
    ]
    revs = [e.mod_revision for e in events]
    assert revs == sorted(revs) and revs[2] == revs[3]


def test_watch_from_a_revision_replays_later_changes_only(kv: KVStore, prefix: str) -> None:
    kv.put(prefix + "old", b"0")
    _, rev = kv.get_prefix(prefix)
    kv.put(prefix + "new", b"1")
    kv.delete(prefix + "old")
    rec = Recorder()
    handle = kv.watch_prefix(prefix, rec, start_revision=rev)
    try:
        kv.put(prefix + "live", b"2")
        events = rec.wait_for(3)
    finally:
        handle.cancel()
    assert [(e.type, e.key[len(prefix):]) for e in events] == [("put", "new"), ("delete", "old"), ("put", "live")]


def test_cancelled_watch_delivers_nothing_more(kv: KVStore, prefix: str) -> None:
    rec = Recorder()
    handle = kv.watch_prefix(prefix, rec)
    kv.put(prefix + "a", b"1")
    rec.wait_for(1)
    handle.cancel()
    handle.cancel()  # idempotent
    kv.put(prefix + "b", b"2")
    marker = Recorder()
    h2 = kv.watch_prefix(prefix, marker, start_revision=kv.revision() - 1)
    marker.wait_for(1)  # the second write has been delivered to a live watch by now
    h2.cancel()
    assert [e.key for e in rec.snapshot()] == [prefix + "a"]
