"""``resilient top`` against a real etcd, with the job's keys written by the real rendezvous and commit code:
two nodes join generation 1, report progress and commit a step; one publishes a fault; both rejoin as
generation 2, which commits a later step. ``--once`` must show the generation, the members, the committed
step, the last change and the fault; an unreachable etcd exits 2 with a clear message. The step-rate
bookkeeping (``Rates``) is pure and checked with plain values."""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import threading
from typing import Iterator

import pytest

from resilient.cli_top import Rates, run_live, top_main
from resilient.config import Timeouts
from resilient.etcd.client import EtcdKV
from resilient.keys import JobKeys
from resilient.rendezvous import Assignment, NodeInfo, Rendezvous, RendezvousSettings
from resilient.replication.commit import COMMIT, CommitExecutor
from resilient.replication.manifest import ShardManifest
from resilient.testing.etcd import running_etcd

TIMEOUTS = Timeouts.from_lease_ttl(5, last_call=0.2, join_timeout=30.0)
_jobs = itertools.count()


def _node(name: str, i: int) -> NodeInfo:
    return NodeInfo(name, "127.0.0.1", f"127.0.0.1:{41000 + i}", f"127.0.0.1:{42000 + i}", 2, 43000 + i)


def _join_all(rs: list[Rendezvous]) -> dict[str, Assignment]:
    out: dict[str, Assignment] = {}
    errors: list[BaseException] = []

    def one(r: Rendezvous) -> None:
        try:
            out[r.node.node_id] = r.join(timeout=30.0)
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(r,)) for r in rs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40.0)
    if errors:
        raise errors[0]
    assert len(out) == len(rs), f"only {sorted(out)} joined"
    return out


def _commit(kv: EtcdKV, job: str, rdzv: Rendezvous, a: Assignment, step: int) -> None:
    """Commit ``step`` the way the ShardManager does: one fenced manifest per rank, then ``try_commit``."""
    executor = CommitExecutor(kv, JobKeys(job), rdzv)
    for entry in a.nodes:
        for rank in entry.ranks:
            executor.write_manifest(a.generation, ShardManifest(
                rank=rank, step=step, generation=a.generation, world_size=a.world_size, nbytes=1024,
                checksum="00" * 16, owner=entry.node_id, holders=tuple(a.node_ids)))
    decision = executor.try_commit(a.generation, a.world_size, step, required=2, replicas=2)
    assert decision.action == COMMIT, decision.reason


@pytest.fixture(scope="module")
def etcd() -> Iterator:
    with running_etcd() as server:
        yield server


@pytest.fixture(scope="module")
def endpoint(etcd) -> str:
    return ",".join(etcd.endpoints)


@pytest.fixture(scope="module")
def recovered_job(etcd) -> Iterator[str]:
    """A two-node job that went through one fault: generation 2 formed, step 7 committed, progress 9."""
    job = f"top-{os.getpid()}-{next(_jobs)}"
    kv = EtcdKV.connect(etcd.settings)
    settings = RendezvousSettings(2, 2, last_call=0.2, join_timeout=30.0, timeouts=TIMEOUTS)
    rs = [Rendezvous(kv, job, _node(name, i), settings) for i, name in enumerate(("node-a", "node-b"))]
    try:
        g1 = _join_all(rs)["node-a"]
        _commit(kv, job, rs[0], g1, 3)
        rs[1].publish_fault(g1.generation, "worker.exit", {"rank": 3, "exitcode": -9})
        rs[1].consume_restart("rank 3 on node node-b: signal SIGKILL")
        g2 = _join_all(rs)["node-a"]
        assert g2.generation == 2
        _commit(kv, job, rs[0], g2, 7)
        for r in rs:
            r.report_progress(9)
        yield job
    finally:
        for r in rs:
            r.leave()
        kv.close()


def test_once_shows_generation_members_and_committed_step(endpoint, recovered_job, capsys):
    assert top_main(["--rdzv-endpoint", endpoint, "--rdzv-id", recovered_job, "--once"]) == 0
    out = capsys.readouterr().out
    assert f"job {recovered_job}" in out
    assert "generation   2   world size 4   nodes 2" in out
    assert "committed    step 7 (gen 2," in out
    assert "restarts 1" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  node-")}
    assert sorted(rows) == ["node-a", "node-b"]
    # node, group rank, ranks, alive, lease left, step
    assert rows["node-a"][1:4] == ["0", "0-1", "yes"] and rows["node-a"][5] == "9"
    assert rows["node-b"][1:4] == ["1", "2-3", "yes"] and rows["node-b"][5] == "9"
    assert "\x1b[" not in out  # --once prints no terminal escapes


def test_once_shows_the_last_change_and_the_fault_that_caused_it(endpoint, recovered_job, capsys):
    assert top_main(["--rdzv-endpoint", endpoint, "--rdzv-id", recovered_job, "--once"]) == 0
    out = capsys.readouterr().out
    change = next(line for line in out.splitlines() if line.startswith("last change"))
    assert "gen 1 -> 2" in change and "world size 4 -> 4" in change
    assert "worker.exit on node-b (rank=3 exitcode=-9)" in change
    fault = next(line for line in out.splitlines() if line.startswith("last fault"))
    assert "gen 1" in fault and "worker.exit on node-b" in fault and "generation 2 formed" in fault
    assert "RECOVERING" not in out


def test_once_json_carries_the_same_snapshot(endpoint, recovered_job, capsys):
    assert top_main(["--rdzv-endpoint", endpoint, "--rdzv-id", recovered_job, "--once", "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["generation"] == 2 and snap["world_size"] == 4
    assert [m["node"] for m in snap["members"]] == ["node-a", "node-b"]
    assert snap["committed"]["step"] == 7
    assert snap["history"]["fault"]["node"] == "node-b" and snap["history"]["fault"]["generation"] == 1
    assert snap["history"]["change"]["faults"][0]["what"] == "worker.exit"


def test_unknown_job_says_no_generation_and_hints_at_the_id(endpoint, capsys):
    assert top_main(["--rdzv-endpoint", endpoint, "--rdzv-id", "no-such-job", "--once"]) == 0
    out = capsys.readouterr().out
    assert "none has formed yet" in out and "check --rdzv-id" in out


def test_unreachable_etcd_exits_2_with_a_clear_message(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = top_main(["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "x", "--once", "--connect-timeout", "0.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "resilient top: cannot reach etcd" in err and f"127.0.0.1:{port}" in err


def test_live_mode_prints_n_frames_to_a_pipe(endpoint, recovered_job, capsys):
    code = top_main(["--rdzv-endpoint", endpoint, "--rdzv-id", recovered_job, "-n", "2", "--interval", "0.05"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count(f"resilient top - job {recovered_job}") == 2
    assert "\x1b[" not in out  # not a terminal: no escapes


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_mode_on_a_terminal_redraws_in_place_and_restores_the_screen():
    snap = {"job": "j", "generation": 1, "world_size": 1, "formed_at": 0.0, "master": "h:1", "members": [],
            "other_nodes": [], "waiting": [], "closer": None, "committed": None, "restarts": 0, "closed": None}
    out = _Tty()
    assert run_live(lambda now: snap, out, interval=0.01, iterations=3, clock=lambda: 100.0, sleep=lambda s: None) == 0
    text = out.getvalue()
    assert text.startswith("\x1b[?1049h") and text.endswith("\x1b[?25h\x1b[?1049l")
    assert text.count("\x1b[H") == 3  # cursor home once per frame: redrawn in place, not scrolled


def test_rates_follow_progress_reports():
    r = Rates()
    row = lambda step, age: {"node": "a", "step": step, "progress_age_s": age}  # noqa: E731
    assert r.update([row(10, 0.0)], now=100.0) == {}
    assert r.update([row(10, 0.5)], now=100.5) == {}  # the same report read again
    assert r.update([row(30, 0.0)], now=102.0) == {"a": 10.0}  # 20 steps in 2 s
    assert r.update([row(30, 1.0)], now=103.0) == {"a": 10.0}  # no new report: the last rate stays
    assert r.update([row(5, 0.0)], now=104.0) == {}  # rolled back to a committed step: start over
    assert r.update([row(9, 0.0)], now=106.0) == {"a": 2.0}


# --- resilient status (the same etcd; its helpers are shared with top) -------------------------------------

def _status(endpoint: str, job: str, *extra: str) -> int:
    from resilient.cli_status import status_main

    return status_main(["--rdzv-endpoint", endpoint, "--rdzv-id", job, *extra])


def test_status_of_a_job_etcd_holds_no_key_of_says_so_and_hints_at_the_id(endpoint, capsys):
    assert _status(endpoint, "no-such-job") == 0
    out = capsys.readouterr().out
    assert "no key of job 'no-such-job' in etcd" in out and "check --rdzv-id" in out
    assert "no generation has formed yet" not in out  # not a job waiting for its first generation
    assert _status(endpoint, "no-such-job", "--json") == 0
    assert json.loads(capsys.readouterr().out)["exists"] is False


def test_a_job_with_keys_but_no_generation_gets_no_missing_job_hint(etcd, endpoint, capsys):
    job = f"closed-early-{os.getpid()}-{next(_jobs)}"
    with EtcdKV.connect(etcd.settings) as kv:
        kv.put(JobKeys(job).closed, json.dumps({"status": "failed", "reason": "join timeout", "by": "n0",
                                                "t": 1.0}).encode())
    assert _status(endpoint, job) == 0
    out = capsys.readouterr().out
    assert "no generation has formed yet" in out and "check --rdzv-id" not in out
    assert "CLOSED: failed (join timeout) by n0, " in out
    assert top_main(["--rdzv-endpoint", endpoint, "--rdzv-id", job, "--once"]) == 0
    top = capsys.readouterr().out
    assert "none has formed yet" in top and "check --rdzv-id" not in top
    assert "CLOSED       failed (join timeout) by n0, " in top


def test_status_of_a_closed_job_formats_the_close_record_and_shows_the_committed_step(etcd, endpoint, capsys):
    job = f"closed-{os.getpid()}-{next(_jobs)}"
    kv = EtcdKV.connect(etcd.settings)
    settings = RendezvousSettings(2, 2, last_call=0.2, join_timeout=30.0, timeouts=TIMEOUTS)
    rs = [Rendezvous(kv, job, _node(name, 10 + i), settings) for i, name in enumerate(("node-a", "node-b"))]
    try:
        g1 = _join_all(rs)["node-a"]
        _commit(kv, job, rs[0], g1, 3)
        rs[0].close_job("succeeded", "every worker of node node-a finished")
    finally:
        for r in rs:
            r.leave()
        kv.close()
    assert _status(endpoint, job) == 0
    out = capsys.readouterr().out
    closed = next(line for line in out.splitlines() if "CLOSED" in line)
    assert closed.startswith("  CLOSED: succeeded (every worker of node node-a finished) by node-a, ")
    assert closed.endswith("s ago") and "{" not in closed  # readable, not a Python dict
    assert "committed step: 3 " in out


def test_status_of_a_single_node_job_says_why_etcd_holds_no_committed_step(etcd, endpoint, capsys):
    job = f"single-{os.getpid()}-{next(_jobs)}"
    kv = EtcdKV.connect(etcd.settings)
    r = Rendezvous(kv, job, _node("solo", 20), RendezvousSettings(1, 1, last_call=0.2, join_timeout=30.0,
                                                                 timeouts=TIMEOUTS))
    try:
        _join_all([r])
        r.close_job("succeeded", "every worker of node solo finished")
    finally:
        r.leave()
        kv.close()
    assert _status(endpoint, job) == 0
    out = capsys.readouterr().out
    assert "committed step: - (none in etcd yet; a job of --nnodes 1 or --standalone keeps its commits in its agent)" in out
