"""FakeKV's test controls: the injected clock, leader changes renewing leases, injected failures (before
and after applying), synchronous and threaded watch delivery, and callbacks that write."""

from __future__ import annotations

import threading

import pytest

from resilient.errors import EtcdError, EtcdIndeterminateError, EtcdUnavailableError, LeaseExpiredError
from resilient.etcd.api import Compare, Put, WatchEvent
from resilient.etcd.fake import FakeKV, ManualClock
from resilient.testing.etcd import wait_until


def test_leases_expire_on_the_injected_clock_only() -> None:
    clock = ManualClock()
    kv = FakeKV(clock)
    lease = kv.lease_grant(5)
    kv.put("/n/a", b"1", lease=lease)
    clock.advance(4.9)
    assert kv.get("/n/a") is not None
    assert kv.lease_keepalive(lease) == 5
    clock.advance(4.9)
    assert kv.lease_ttl(lease) == 0 and kv.get("/n/a") is not None
    rev = kv.revision()
    clock.advance(0.2)
    assert kv.expire_leases() == [lease]
    assert kv.get("/n/a") is None and kv.revision() == rev + 1
    with pytest.raises(LeaseExpiredError):
        kv.lease_keepalive(lease)


def test_advance_moves_the_store_clock_over_any_clock() -> None:
    kv = FakeKV()  # real monotonic clock underneath
    lease = kv.lease_grant(60)
    kv.put("/n/a", b"1", lease=lease)
    kv.advance(61)
    assert kv.get("/n/a") is None


def test_leader_change_renews_every_lease() -> None:
    clock = ManualClock()
    kv = FakeKV(clock)
    lease = kv.lease_grant(3)
    kv.put("/n/a", b"1", lease=lease)
    clock.advance(2.5)
    kv.leader_change()
    clock.advance(2.5)
    assert kv.get("/n/a") is not None
    clock.advance(0.6)
    assert kv.get("/n/a") is None


def test_fail_next_before_applying_leaves_the_store_unchanged() -> None:
    kv = FakeKV(ManualClock())
    kv.fail_next(2, ops=("put",))
    for _ in range(2):
        with pytest.raises(EtcdUnavailableError):
            kv.put("/k", b"v")
    assert kv.get("/k") is None  # gets were not armed
    assert kv.put("/k", b"v") == 2


def test_fail_next_after_applying_is_an_indeterminate_write() -> None:
    kv = FakeKV(ManualClock())
    kv.fail_next(1, EtcdIndeterminateError("leader changed mid-write"), after=True, ops=("txn",))
    with pytest.raises(EtcdIndeterminateError):
        kv.txn([Compare("/gen", "version", "==", 0)], [Put("/gen", b"1")])
    assert kv.get("/gen").value == b"1"  # type: ignore[union-attr]
    retry = kv.txn([Compare("/gen", "version", "==", 0)], [Put("/gen", b"1")])
    assert not retry.succeeded  # the caller's CAS makes the retry safe


def test_txn_refuses_a_dead_lease_without_applying_anything() -> None:
    kv = FakeKV(ManualClock())
    lease = kv.lease_grant(5)
    kv.lease_revoke(lease)
    with pytest.raises(LeaseExpiredError):
        kv.txn([], [Put("/a", b"1"), Put("/b", b"2", lease=lease)])
    assert kv.get("/a") is None
    with pytest.raises(EtcdError, match="same key twice"):
        kv.txn([], [Put("/a", b"1"), Put("/a", b"2")])


def test_sync_watch_delivers_writes_made_by_callbacks_after_the_callback_in_order() -> None:
    kv = FakeKV(ManualClock())
    seen: list[tuple[str, int]] = []

    def react(event: WatchEvent) -> None:
        seen.append((event.key, event.mod_revision))
        if event.key == "/w/a":
            kv.put("/w/reaction", b"r")  # delivered after this callback returns

    kv.watch_prefix("/w/", react)
    kv.put("/w/a", b"1")
    assert seen == [("/w/a", 2), ("/w/reaction", 3)]


def test_sync_watch_keeps_revision_order_under_concurrent_writers() -> None:
    kv = FakeKV()
    revs: list[int] = []
    kv.watch_prefix("/c/", lambda e: revs.append(e.mod_revision))

    def writer(i: int) -> None:
        for j in range(200):
            kv.put(f"/c/{i}/{j}", b"x")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(revs) == 800 and revs == sorted(revs)


def test_threaded_watch_delivers_from_a_background_thread() -> None:
    kv = FakeKV(ManualClock(), threaded_watches=True)
    try:
        got: list[tuple[str, str]] = []
        kv.watch_prefix("/t/", lambda e: got.append((e.key, threading.current_thread().name)))
        kv.put("/t/a", b"1")
        kv.delete("/t/a")
        wait_until(lambda: len(got) == 2, 5, "2 events")
        assert [k for k, _ in got] == ["/t/a", "/t/a"]
        assert all(name == "fakekv-watch" for _, name in got)
    finally:
        kv.close()


def test_a_failing_callback_does_not_stop_delivery() -> None:
    kv = FakeKV(ManualClock())
    got: list[str] = []

    def flaky(event: WatchEvent) -> None:
        if event.key == "/f/bad":
            raise RuntimeError("callback bug")
        got.append(event.key)

    kv.watch_prefix("/f/", flaky)
    kv.put("/f/bad", b"1")
    kv.put("/f/good", b"2")
    assert got == ["/f/good"]
