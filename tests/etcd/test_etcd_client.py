"""EtcdKV against real etcd: unreachable endpoints, retries across a restart, failover in a 3-member
cluster, TLS with client certificates, user/password auth, and the shared lease keep-alive stream."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from pathlib import Path

import pytest

from resilient.config import EtcdSettings
from resilient.errors import EtcdAuthError, EtcdError, EtcdUnavailableError, LeaseExpiredError
from resilient.etcd.api import Compare, Put, WatchEvent
from resilient.etcd.client import EtcdKV
from resilient.etcd.server import FAST, EmbeddedCluster, EmbeddedEtcd, ServerTLS, find_etcd_binary, free_ports
from resilient.testing.etcd import running_etcd, wait_until, write_test_certificates


def _keepalive_threads(endpoints: tuple[str, ...] | list[str]) -> int:
    """Live keep-alive stream readers talking to any of ``endpoints``."""
    names = {f"etcd-keepalive:{ep}" for ep in endpoints}
    return sum(1 for t in threading.enumerate() if t.name in names)


class Recorder:
    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: WatchEvent) -> None:
        with self._lock:
            self.events.append(event)

    def keys(self) -> list[str]:
        with self._lock:
            return [e.key for e in self.events]


def test_unreachable_endpoints_fail_within_connect_timeout_naming_them() -> None:
    a, b = free_ports(2)  # nothing listens there
    settings = EtcdSettings(endpoints=(f"127.0.0.1:{a}", f"127.0.0.1:{b}"), connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(EtcdUnavailableError) as info:
        EtcdKV.connect(settings)
    elapsed = time.monotonic() - started
    assert f"127.0.0.1:{a}" in str(info.value) and f"127.0.0.1:{b}" in str(info.value)
    assert "connect timeout" in str(info.value)
    assert elapsed < settings.connect_timeout + 2.0  # bounded by the connect timeout, not a hang


def test_requests_fail_with_unavailable_after_the_deadline_when_etcd_is_gone(fresh_etcd: EmbeddedEtcd) -> None:
    settings = dataclasses.replace(fresh_etcd.settings, connect_timeout=1.0, request_deadline=1.0)
    with EtcdKV.connect(settings) as kv:
        kv.put("/gone/a", b"1")
        fresh_etcd.kill()
        with pytest.raises(EtcdUnavailableError) as info:
            kv.get("/gone/a")
    assert fresh_etcd.endpoint in str(info.value)
    assert "request deadline" in str(info.value)


def test_requests_and_watch_ride_through_a_server_restart(fresh_etcd: EmbeddedEtcd) -> None:
    with EtcdKV.connect(fresh_etcd.settings) as kv:
        rec = Recorder()
        handle = kv.watch_prefix("/restart/", rec)
        kv.put("/restart/before", b"1")
        wait_until(lambda: rec.keys() == ["/restart/before"], 10, "the first watch event")
        lease = kv.lease_grant(30)
        assert kv.lease_keepalive(lease) == 30
        fresh_etcd.kill()
        restarter = threading.Timer(0.5, fresh_etcd.start)
        restarter.start()
        try:
            kv.put("/restart/after", b"2")  # retried until the server is back (within the deadline)
        finally:
            restarter.join()
        assert kv.lease_keepalive(lease) == 30  # the broken keep-alive stream is replaced
        kv.put("/restart/later", b"3")
        wait_until(lambda: len(rec.keys()) >= 3, 10, "watch events after the restart")
        handle.cancel()
        assert rec.keys() == ["/restart/before", "/restart/after", "/restart/later"]
        assert kv.get("/restart/after").value == b"2"  # type: ignore[union-attr]


def test_failover_when_the_member_in_use_is_killed(etcd_cluster: EmbeddedCluster) -> None:
    leader = etcd_cluster.leader()
    order = [leader] + [i for i in range(3) if i != leader]
    settings = etcd_cluster.settings_for(order)
    with EtcdKV.connect(settings) as kv:
        assert kv.current_endpoint == etcd_cluster.endpoint(leader)
        assert len(kv.member_list()) == 3
        rec = Recorder()
        handle = kv.watch_prefix("/fo/", rec)
        kv.put("/fo/1", b"before")
        wait_until(lambda: rec.keys() == ["/fo/1"], 10, "the first watch event")

        lease = kv.lease_grant(30)
        assert kv.lease_keepalive(lease) == 30
        etcd_cluster.kill(leader)  # the member this client talks to, and the raft leader
        assert kv.lease_keepalive(lease) == 30  # a new keep-alive stream on another member
        wait_until(lambda: _keepalive_threads(etcd_cluster.endpoints) == 1, 10, "the broken keep-alive stream to end")
        kv.put("/fo/2", b"after")
        seen = kv.get("/fo/2")
        assert seen is not None and seen.value == b"after"
        cas = kv.txn([Compare("/fo/2", "mod", "==", seen.mod_revision)], [Put("/fo/3", b"cas")])
        assert cas.succeeded
        assert kv.current_endpoint != etcd_cluster.endpoint(leader)
        assert etcd_cluster.leader() != leader
        wait_until(lambda: len(rec.keys()) >= 3, 15, "watch events after failover")
        assert rec.keys() == ["/fo/1", "/fo/2", "/fo/3"]

        etcd_cluster.restart(leader)
        kv.put("/fo/4", b"rejoined")
        wait_until(lambda: len(rec.keys()) >= 4, 10, "watch event after the member rejoined")
        handle.cancel()
        assert rec.keys() == ["/fo/1", "/fo/2", "/fo/3", "/fo/4"]


@pytest.fixture
def certs(tmp_path: Path):
    return write_test_certificates(tmp_path / "pki", client_cn="root")


def test_tls_with_client_certificates(certs) -> None:
    tls = ServerTLS(certs.server_cert, certs.server_key, certs.ca_cert, client_cert_auth=True)
    with running_etcd(dataclasses.replace(FAST, tls=tls)) as server:
        settings = dataclasses.replace(
            server.settings, cert_cert=certs.client_cert, cert_key=certs.client_key, connect_timeout=2.0
        )
        assert settings.ca_cert == certs.ca_cert
        with EtcdKV.connect(settings) as kv:
            kv.put("/tls/k", b"secret")
            assert kv.get("/tls/k").value == b"secret"  # type: ignore[union-attr]

        without_client_cert = dataclasses.replace(server.settings, connect_timeout=2.0)
        with pytest.raises(EtcdAuthError) as info:
            EtcdKV.connect(without_client_cert)  # the server refuses the handshake: no client certificate
        assert server.endpoint in str(info.value) and "certificate" in str(info.value)


def _etcdctl(server: EmbeddedEtcd, *args: str) -> None:
    etcdctl = str(Path(find_etcd_binary()).with_name("etcdctl"))
    subprocess.run(
        [etcdctl, f"--endpoints={server.endpoint}", "--dial-timeout=5s", *args],
        check=True,
        capture_output=True,
        timeout=30,
    )


def test_user_password_auth_and_wrong_password(fresh_etcd: EmbeddedEtcd) -> None:
    _etcdctl(fresh_etcd, "user", "add", "root:s3cret")
    _etcdctl(fresh_etcd, "auth", "enable")
    good = dataclasses.replace(fresh_etcd.settings, user="root", password="s3cret")
    with EtcdKV.connect(good) as kv:
        kv.put("/auth/k", b"v")
        assert kv.get("/auth/k").value == b"v"  # type: ignore[union-attr]
        lease = kv.lease_grant(30)
        assert kv.lease_keepalive(lease) == 30

    bad = dataclasses.replace(fresh_etcd.settings, user="root", password="wrong")
    with pytest.raises(EtcdAuthError) as info:
        EtcdKV.connect(bad)
    assert fresh_etcd.endpoint in str(info.value) and "password" in str(info.value)

    with EtcdKV.connect(fresh_etcd.settings) as anonymous, pytest.raises(EtcdAuthError):
        anonymous.put("/auth/k", b"anonymous")


def test_failover_when_the_member_in_use_is_frozen(etcd_cluster: EmbeddedCluster) -> None:
    """A SIGSTOPped member keeps its sockets open but never answers: requests time out per attempt and move
    on, and the watch notices the silence through its progress requests and re-watches elsewhere."""
    leader = etcd_cluster.leader()
    frozen = (leader + 1) % 3  # a follower: the cluster keeps its leader, only the client must react
    order = [frozen] + [i for i in range(3) if i != frozen]
    settings = dataclasses.replace(etcd_cluster.settings_for(order), request_deadline=4.0)
    with EtcdKV.connect(settings, attempt_timeout=1.0, watch_progress_interval=0.25) as kv:
        rec = Recorder()
        handle = kv.watch_prefix("/frozen/", rec)
        kv.put("/frozen/1", b"before")
        wait_until(lambda: rec.keys() == ["/frozen/1"], 10, "the first watch event")
        lease = kv.lease_grant(30)
        assert kv.lease_keepalive(lease) == 30
        etcd_cluster.pause(frozen)
        try:
            assert kv.lease_keepalive(lease) == 30  # the silent stream is dropped after attempt_timeout
            kv.put("/frozen/2", b"during")
            assert kv.current_endpoint != etcd_cluster.endpoint(frozen)
            wait_until(lambda: len(rec.keys()) >= 2, 15, "the watch to move off the frozen member")
        finally:
            etcd_cluster.resume(frozen)
        handle.cancel()
        assert rec.keys() == ["/frozen/1", "/frozen/2"]


def test_many_leases_share_one_keepalive_stream(etcd_server: EmbeddedEtcd) -> None:
    """Concurrent refreshes of many leases from many threads go over one stream, each getting its own
    lease's answer; a revoked lease is reported expired without disturbing the others."""
    with EtcdKV.connect(etcd_server.settings) as kv:
        leases = {kv.lease_grant(ttl): ttl for ttl in range(10, 50)}
        results: dict[int, list[int]] = {lease: [] for lease in leases}
        errors: list[BaseException] = []

        def refresher(mine: list[int]) -> None:
            try:
                for _ in range(5):
                    for lease in mine:
                        results[lease].append(kv.lease_keepalive(lease))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        ids = list(leases)
        threads = [threading.Thread(target=refresher, args=(ids[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert all(results[lease] == [ttl] * 5 for lease, ttl in leases.items())
        assert _keepalive_threads(etcd_server.endpoints) == 1

        gone = ids[0]
        kv.lease_revoke(gone)
        with pytest.raises(LeaseExpiredError) as info:
            kv.lease_keepalive(gone)
        assert f"{gone:x}" in str(info.value)
        assert kv.lease_keepalive(ids[1]) == leases[ids[1]]
        assert _keepalive_threads(etcd_server.endpoints) == 1
    wait_until(lambda: _keepalive_threads(etcd_server.endpoints) == 0, 10, "the keep-alive stream to end with the client")
    with pytest.raises(EtcdError):
        kv.lease_keepalive(ids[1])
