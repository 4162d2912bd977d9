"""The replication commit sequence's failpoints (``repl.*``) are reached, in the sequence's order, by a
real replication between two ShardManagers against a real etcd; a failpoint that stalls the commit
after etcd accepted it delays nothing but that agent's own view."""

from __future__ import annotations

import pytest
import torch

from resilient import events, failpoints
from resilient.replication.commit import read_commit
from resilient.store import Segment
from resilient.testing.etcd import wait_until

REPL_POINTS = ("repl.manifest.after_write", "repl.send.after_offer", "repl.send.after_transfer",
               "repl.commit.before_txn", "repl.commit.after_txn")


def state(rank: int, step: int, n: int = 20_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, generator=g)


@pytest.fixture
def armed():
    def arm(spec: str) -> None:
        failpoints.configure(spec)

    yield arm
    failpoints.configure(None)


def test_each_repl_failpoint_fires_in_the_commit_sequence_order(make_cluster, event_log, armed):
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    armed(",".join(f"{name}=sleep(0)" for name in REPL_POINTS))
    for rank in range(2):
        c.seal(rank, rank, 3, state(rank, 3))
    c.wait_committed(3, [0, 1])
    c.wait_idle([0, 1])
    evs = events.read(event_log)
    fired = [e for e in evs if e["kind"] == "failpoint.fired"]
    assert {e["name"] for e in fired} == set(REPL_POINTS)

    def first(pred) -> int:
        return next(i for i, e in enumerate(evs) if pred(e))

    for rank in range(2):
        seq = [
            first(lambda e: e["kind"] == "failpoint.fired" and e["name"] == "repl.manifest.after_write" and e["rank"] == rank),
            first(lambda e: e["kind"] == "failpoint.fired" and e["name"] == "repl.send.after_offer" and e["rank"] == rank),
            first(lambda e: e["kind"] == "replica.sent" and e["rank"] == rank),
            first(lambda e: e["kind"] == "failpoint.fired" and e["name"] == "repl.send.after_transfer" and e["rank"] == rank),
        ]
        assert seq == sorted(seq), f"rank {rank}: {seq}"
        assert next(e for e in fired if e["name"] == "repl.send.after_offer" and e["rank"] == rank)["to"] == f"n{1 - rank}"
    commit = [first(lambda e: e["kind"] == "failpoint.fired" and e["name"] == "repl.commit.before_txn"),
              first(lambda e: e["kind"] == "failpoint.fired" and e["name"] == "repl.commit.after_txn"),
              first(lambda e: e["kind"] == "ckpt.committed")]
    assert commit == sorted(commit)
    assert next(e for e in fired if e["name"] == "repl.commit.after_txn")["step"] == 3


def test_stall_after_the_commit_txn_leaves_etcd_committed_and_peers_advance(make_cluster, event_log, armed):
    """The committer stalls for 4 s right after etcd accepted its commit: both agents see step 4 committed
    (etcd's watch) while it is still stalled, before it reports the commit itself."""
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    armed("repl.commit.after_txn=1*sleep(4000)")
    for rank in range(2):
        c.seal(rank, rank, 4, state(rank, 4))
    wait_until(lambda: any(e["kind"] == "failpoint.fired" and e["name"] == "repl.commit.after_txn"
                           for e in events.read(event_log)), 30, "the committer past its transaction")
    c.wait_committed(4, [0, 1], timeout=3.0)  # the stalled agent learns it from etcd's watch, the other too
    assert not [e for e in events.read(event_log) if e["kind"] == "ckpt.committed"], "the committer was not stalled"
    record, _ = read_commit(c.kv, c.keys)
    assert (record.step, record.generation) == (4, 1)
    c.wait_idle([0, 1])
    kinds = [e["kind"] for e in events.read(event_log)]
    assert kinds.count("ckpt.committed") == 1


def test_a_step_overwritten_after_its_manifest_is_never_committed(make_cluster, event_log, armed):
    """One host, one copy: the worker may seal a newer snapshot over an uncommitted one (the committed
    copy is what it keeps). When that happens after the older step's manifest named this host, the
    older step must not be committed on that stale claim (the chaos scenario partition-host did: the
    commit of 12 landed 40 ms after 16 had been sealed over it, and the job lost its committed step)."""
    c = make_cluster(1, replicas=1)
    c.form(1, [0])
    c.seal(0, 0, 1, state(0, 1))
    c.wait_committed(1, [0])
    armed("repl.manifest.after_write=1*sleep(4000)")  # step 2's commit waits after its manifest (4 s: room for a slow CI)
    c.seal(0, 0, 2, state(0, 2))
    wait_until(lambda: any(e["kind"] == "failpoint.fired" for e in events.read(event_log)), 10, "step 2's manifest")
    mgr = c.mgrs[0]
    t = state(0, 3)
    nbytes = t.numel() * t.element_size() + 4096
    seg = Segment.open(mgr.segment_for(0, nbytes), c.shm(0))
    try:  # what the worker does: keep the committed 1, so 3 goes over the uncommitted 2
        seg.write({"w": t}, step=3, generation=1, meta=b"rank0", keep_step=1)
        seg.seal()
        assert {i.step for i in seg.slots() if i.sealed} == {1, 3}
    finally:
        seg.close()
    mgr.on_sealed(0, 3, 1, nbytes)
    c.wait_committed(3, [0])
    c.wait_idle([0])
    committed = [e["step"] for e in events.read(event_log) if e["kind"] == "ckpt.committed"]
    assert committed == [1, 3], committed
