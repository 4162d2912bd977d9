"""The rendezvous against a real etcd (``resilient.testing.etcd``): join and leave, lease expiry of a
killed and of a SIGSTOPped node agent (in subprocesses), fencing of the paused one, scale-up, too few
nodes, an etcd member lost from a 3-member cluster, fault publication, the restart budget, closing."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from resilient.config import Timeouts
from resilient.errors import (
    FencedError,
    RendezvousClosedError,
    RendezvousTimeoutError,
    RestartBudgetExceededError,
)
from resilient.etcd.api import Put
from resilient.etcd.client import EtcdKV
from resilient.keys import JobKeys
from resilient.rendezvous import Assignment, NodeInfo, Rendezvous, RendezvousSettings
from resilient.testing.etcd import running_cluster, running_etcd, wait_until

REPO = Path(__file__).resolve().parents[2]
TIMEOUTS = Timeouts.from_lease_ttl(2, last_call=0.3, join_timeout=30.0)
_jobs = itertools.count()


def settings(lo: int, hi: int, **kw) -> RendezvousSettings:
    kw.setdefault("last_call", 0.3)
    kw.setdefault("join_timeout", 30.0)
    return RendezvousSettings(lo, hi, timeouts=TIMEOUTS, **kw)


def node(i: int, slots: int = 2) -> NodeInfo:
    return NodeInfo(f"n{i}", "127.0.0.1", f"127.0.0.1:{31000 + i}", f"127.0.0.1:{32000 + i}", slots, 33000 + i)


@pytest.fixture(scope="module")
def etcd() -> Iterator:
    with running_etcd() as server:
        yield server


@pytest.fixture
def kv(etcd) -> Iterator[EtcdKV]:
    client = EtcdKV.connect(etcd.settings)
    yield client
    client.close()


@pytest.fixture
def job() -> str:
    return f"rdzv-{os.getpid()}-{next(_jobs)}"


class Nodes:
    """In-process node agents sharing one client; every one still present is made to leave at the end."""

    def __init__(self, kv: EtcdKV, job: str, s: RendezvousSettings) -> None:
        self.kv, self.job, self.s = kv, job, s
        self.all: list[Rendezvous] = []

    def make(self, i: int, slots: int = 2) -> Rendezvous:
        r = Rendezvous(self.kv, self.job, node(i, slots), self.s)
        self.all.append(r)
        return r

    def join_all(self, rs: list[Rendezvous], timeout: float | None = None) -> dict[str, Assignment]:
        out: dict[str, Assignment] = {}
        errors: list[BaseException] = []

        def run(r: Rendezvous) -> None:
            try:
                out[r.node.node_id] = r.join(timeout)
            except BaseException as exc:  # surfaced to the test below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in rs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        return out

    def close(self) -> None:
        for r in self.all:
            r.leave()


@pytest.fixture
def nodes(kv, job) -> Iterator:
    made: list[Nodes] = []

    def factory(lo: int, hi: int, **kw) -> Nodes:
        n = Nodes(kv, job, settings(lo, hi, **kw))
        made.append(n)
        return n

    yield factory
    for n in made:
        n.close()


class Rounds:
    """Collects on_new_round reasons per node."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.cond = threading.Condition()

    def watch(self, r: Rendezvous) -> None:
        r.watch(lambda reason, n=r.node.node_id: self._add(n, reason))

    def _add(self, n: str, reason: str) -> None:
        with self.cond:
            self.reasons[n] = reason
            self.cond.notify_all()

    def wait_for(self, names: list[str], timeout: float = 20.0) -> dict[str, str]:
        with self.cond:
            ok = self.cond.wait_for(lambda: all(n in self.reasons for n in names), timeout)
        assert ok, f"new round not seen by {names}: got {self.reasons}"
        return dict(self.reasons)


def same_assignment(out: dict[str, Assignment]) -> Assignment:
    values = list(out.values())
    assert all(v == values[0] for v in values), out
    return values[0]


class StandIn:
    """A node agent in a subprocess (tests/rendezvous/standin.py)."""

    def __init__(self, endpoints: str, job: str, name: str, lo: int, hi: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RESILIENT_LOG_LEVEL="WARNING")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("standin.py")), endpoints, job, name, str(lo), str(hi), "2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )

    def line(self, timeout: float = 30.0) -> str:
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))
        t.start()
        t.join(timeout)
        assert result and result[0], f"stand-in said nothing within {timeout}s (exit code {self.proc.poll()})"
        return result[0].strip()

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# --- tests ---------------------------------------------------------------------------------------------------
def test_join_and_leave(nodes):
    ns = nodes(2, 4)
    rs = [ns.make(i) for i in range(3)]
    a = same_assignment(ns.join_all(rs))
    assert a.generation == 1 and a.world_size == 6 and a.node_ids == ("n0", "n1", "n2")
    assert all(r.lease_healthy() and r.current() == a for r in rs)
    rounds = Rounds()
    for r in rs[:2]:
        rounds.watch(r)
    rs[2].leave()
    assert rounds.wait_for(["n0", "n1"]) == {"n0": "node-lost:n2", "n1": "node-lost:n2"}
    b = same_assignment(ns.join_all(rs[:2]))
    assert b.generation == 2 and b.node_ids == ("n0", "n1")
    assert b.ranks_of("n0") == a.ranks_of("n0") and b.ranks_of("n1") == a.ranks_of("n1")


def test_killed_node_is_dropped_when_its_lease_expires(nodes, etcd, kv, job):
    ns = nodes(2, 3)
    rs = [ns.make(0), ns.make(1)]
    standin = StandIn(",".join(etcd.endpoints), job, "n9", 2, 3)
    wait_until(lambda: kv.get(JobKeys(job).waiting("n9")), 30, "the stand-in to ask in")
    try:
        a = same_assignment(ns.join_all(rs))
        assert standin.line().startswith(f"JOINED {a.generation}")
        assert "n9" in a.node_ids
        rounds = Rounds()
        for r in rs:
            rounds.watch(r)
        standin.proc.send_signal(signal.SIGKILL)
        assert rounds.wait_for(["n0", "n1"]) == {"n0": "node-lost:n9", "n1": "node-lost:n9"}
        b = same_assignment(ns.join_all(rs))
        assert b.generation == a.generation + 1 and b.node_ids == ("n0", "n1")
    finally:
        standin.close()


def test_sigstopped_node_is_fenced_after_its_lease_expires_and_must_rejoin(nodes, etcd, kv, job):
    ns = nodes(2, 3)
    standin = StandIn(",".join(etcd.endpoints), job, "n9", 2, 3)
    keys = JobKeys(job)
    wait_until(lambda: kv.get(keys.waiting("n9")), 30, "the stand-in to ask in")
    rs = [ns.make(0), ns.make(1)]
    try:
        a = same_assignment(ns.join_all(rs))
        assert standin.line() == f"JOINED {a.generation} {a.ranks_of('n9')[0]}"
        rounds = Rounds()
        for r in rs:
            rounds.watch(r)
        standin.proc.send_signal(signal.SIGSTOP)
        assert rounds.wait_for(["n0", "n1"])["n0"] == "node-lost:n9"
        b = same_assignment(ns.join_all(rs))
        assert b.node_ids == ("n0", "n1")
        rounds = Rounds()
        for r in rs:
            rounds.watch(r)
        standin.proc.send_signal(signal.SIGCONT)
        standin.send("write")
        reply = standin.line()
        assert reply.startswith("FENCED"), reply
        assert kv.get(JobKeys(job).fault(a.generation, "n9")) is None  # nothing was written
        standin.send("join")  # it must rejoin: the members see it ask in and re-form with it
        assert rounds.wait_for(["n0", "n1"])["n0"] == "join:n9"
        c = same_assignment(ns.join_all(rs))
        assert standin.line() == f"JOINED {c.generation} {c.ranks_of('n9')[0]}"
        assert c.generation == b.generation + 1 and set(c.node_ids) == {"n0", "n1", "n9"}
    finally:
        standin.proc.send_signal(signal.SIGCONT)
        standin.close()


def test_scale_up_join_keeps_ranks_of_members(nodes):
    ns = nodes(2, 3)
    rs = [ns.make(0), ns.make(1)]
    a = same_assignment(ns.join_all(rs))
    rounds = Rounds()
    for r in rs:
        rounds.watch(r)
    newcomer = ns.make(2)
    result: dict[str, Assignment] = {}
    t = threading.Thread(target=lambda: result.update(ns.join_all([newcomer])))
    t.start()
    assert rounds.wait_for(["n0", "n1"]) == {"n0": "join:n2", "n1": "join:n2"}
    b = same_assignment(ns.join_all(rs))
    t.join(30)
    assert result["n2"] == b and b.generation == 2 and b.world_size == 6
    assert b.ranks_of("n0") == a.ranks_of("n0") and b.ranks_of("n1") == a.ranks_of("n1")


def test_fewer_than_min_nodes_waits_then_fails_clearly(nodes):
    ns = nodes(3, 4, last_call=0.2, join_timeout=1.5)
    rs = [ns.make(0), ns.make(1)]
    with pytest.raises(RendezvousTimeoutError, match=r"MIN=3.*nodes present: n0, n1"):
        ns.join_all(rs)


def test_fault_publication_starts_a_new_round_everywhere(nodes, kv, job):
    ns = nodes(3, 3)
    rs = [ns.make(i) for i in range(3)]
    a = same_assignment(ns.join_all(rs))
    rounds = Rounds()
    for r in rs:
        rounds.watch(r)
    rs[1].publish_fault(a.generation, "worker-exit", {"rank": 2, "exitcode": 1})
    assert set(rounds.wait_for(["n0", "n1", "n2"]).values()) == {"fault:n1"}
    b = same_assignment(ns.join_all(rs))  # every member is back: closes without the last-call wait
    assert b.generation == 2 and all(b.ranks_of(n) == a.ranks_of(n) for n in a.node_ids)


def test_writes_for_an_old_generation_are_fenced(nodes, kv, job):
    ns = nodes(1, 2)
    r = ns.make(0)
    a = ns.join_all([r])["n0"]
    keys = JobKeys(job)
    assert r.fenced_txn(a.generation, [], [Put(keys.committed, b"7")]).succeeded
    ns.join_all([r])
    with pytest.raises(FencedError, match="moved on to a newer generation"):
        r.fenced_txn(a.generation, [], [Put(keys.committed, b"8")])
    assert kv.get(keys.committed).value == b"7"


def test_restart_budget_is_job_wide_and_runs_out(nodes):
    ns = nodes(2, 2, max_restarts=2)
    r0, r1 = ns.make(0), ns.make(1)
    ns.join_all([r0, r1])
    assert r0.consume_restart("fault:n0") == 1
    assert r1.consume_restart("fault:n0") == 1  # same generation: charged once
    ns.join_all([r0, r1])
    assert r1.consume_restart("node-lost:n0") == 2
    ns.join_all([r0, r1])
    with pytest.raises(RestartBudgetExceededError, match="max_restarts=2"):
        r0.consume_restart("fault:n1")
    r1.leave()  # a node that rejoins with a fresh agent does not get a fresh budget
    fresh = ns.make(1)
    ns.join_all([r0, fresh])
    with pytest.raises(RestartBudgetExceededError):
        fresh.consume_restart("fault:n1")


def test_closed_job_refuses_new_joins_and_ends_watches(nodes):
    ns = nodes(1, 3)
    r0 = ns.make(0)
    ns.join_all([r0])
    rounds = Rounds()
    rounds.watch(r0)
    r0.close_job("failed", "restart budget spent")
    assert rounds.wait_for(["n0"]) == {"n0": "closed"}
    with pytest.raises(RendezvousClosedError, match="failed .restart budget spent."):
        ns.join_all([ns.make(1)])


def test_losing_one_etcd_member_changes_no_generation(job):
    with running_cluster(3) as cluster:
        kv = EtcdKV.connect(cluster.settings)
        try:
            ns = Nodes(kv, job, settings(2, 2))
            rs = [ns.make(0), ns.make(1)]
            a = same_assignment(ns.join_all(rs))
            rounds = Rounds()
            for r in rs:
                rounds.watch(r)
            cluster.kill(cluster.leader())
            # three lease TTLs later both leases are still kept alive and nobody saw a new round
            deadline = time.monotonic() + 3 * TIMEOUTS.lease_ttl
            while time.monotonic() < deadline:
                assert not rounds.reasons, rounds.reasons
                time.sleep(0.1)
            wait_until(lambda: all(r.lease_healthy() for r in rs), 5, "leases refreshed after the election")
            assert not rounds.reasons and all(r.current() == a for r in rs)
            assert kv.get(JobKeys(job).gen(a.generation + 1)) is None
            ns.close()
        finally:
            kv.close()


def test_status_command_shows_generation_members_progress_and_commit(nodes, etcd, kv, job, capsys):
    from resilient.cli_status import status_main

    ns = nodes(2, 2)
    rs = [ns.make(0), ns.make(1)]
    a = same_assignment(ns.join_all(rs))
    rs[0].report_progress(41)
    rs[1].report_progress(42)
    rs[0].fenced_txn(a.generation, [], [Put(JobKeys(job).committed, b'{"step": 40, "gen": 1}')])
    assert status_main(["--rdzv-endpoint", ",".join(etcd.endpoints), "--rdzv-id", job, "--json"]) == 0
    import json

    s = json.loads(capsys.readouterr().out)
    assert s["generation"] == 1 and s["world_size"] == 4 and s["committed"]["step"] == 40
    rows = {m["node"]: m for m in s["members"]}
    assert rows["n0"]["ranks"] == list(a.ranks_of("n0")) and rows["n1"]["step"] == 42
    assert all(m["alive"] and 0 <= m["lease_left_s"] <= TIMEOUTS.lease_ttl for m in s["members"])
    assert status_main(["--rdzv-endpoint", ",".join(etcd.endpoints), "--rdzv-id", job]) == 0
    text = capsys.readouterr().out
    assert "generation 1: world size 4, 2 nodes" in text and "committed step: 40" in text and "n1" in text


def test_status_command_etcd_tls_auth_flags_and_exit_2_when_etcd_cannot_be_read(tmp_path, capsys, monkeypatch):
    """``resilient status`` takes resilient-run's etcd TLS/auth flags, and exits 2 naming the endpoints
    when etcd cannot be read (unreachable, or the handshake / credentials are refused)."""
    import dataclasses
    import json

    from resilient.cli_status import status_main
    from resilient.etcd.server import FAST, ServerTLS, find_etcd_binary, free_ports
    from resilient.testing.etcd import write_test_certificates

    (port,) = free_ports(1)  # nothing listens there
    assert status_main(["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "j", "--connect-timeout", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "cannot read job 'j'" in err

    certs = write_test_certificates(tmp_path / "pki", client_cn="root")
    tls = ServerTLS(certs.server_cert, certs.server_key, certs.ca_cert, client_cert_auth=True)
    with running_etcd(dataclasses.replace(FAST, tls=tls)) as server:
        base = ["--rdzv-endpoint", server.endpoint, "--rdzv-id", "tlsjob", "--connect-timeout", "2"]
        mtls = ["--etcd-ca", certs.ca_cert, "--etcd-cert", certs.client_cert, "--etcd-key", certs.client_key]
        assert status_main([*base, *mtls, "--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert s["job"] == "tlsjob" and s["generation"] == 0
        assert status_main([*base, "--etcd-ca", certs.ca_cert]) == 2  # no client certificate: refused
        assert server.endpoint in capsys.readouterr().err

    with running_etcd() as server:
        etcdctl = str(Path(find_etcd_binary()).with_name("etcdctl"))
        for cmd in (["user", "add", "root:s3cret"], ["auth", "enable"]):
            subprocess.run([etcdctl, f"--endpoints={server.endpoint}", *cmd], check=True, capture_output=True,
                           timeout=30)
        base = ["--rdzv-endpoint", server.endpoint, "--rdzv-id", "authjob", "--connect-timeout", "2"]
        monkeypatch.setenv("RESILIENT_ETCD_PASSWORD", "s3cret")
        assert status_main([*base, "--etcd-user", "root"]) == 0
        assert "job authjob" in capsys.readouterr().out
        monkeypatch.setenv("RESILIENT_ETCD_PASSWORD", "wrong")
        assert status_main([*base, "--etcd-user", "root"]) == 2
        err = capsys.readouterr().err
        assert server.endpoint in err and "password" in err
