"""Copies about to be overwritten are withdrawn before any node can commit on them (real etcd, real
segments and transfers): the owner's worker and a peer receiving the next step both take their claim
off the manifest, and a commit transaction fails when a claim it counted went meanwhile."""

from __future__ import annotations

import threading

from resilient import events, failpoints
from resilient.replication import placement
from resilient.replication.commit import COMMIT, WAIT, CommitExecutor, read_commit, read_manifests
from resilient.replication.manifest import ShardManifest
from resilient.testing.etcd import wait_until
from tests.replication.conftest import state


def _commit(c, members, step):
    for k, i in enumerate(members):
        c.seal(i, k, step, state(k, step), as_worker=True)
    c.wait_committed(step, members)


def test_a_lagging_node_cannot_commit_a_step_whose_copies_were_overwritten(make_cluster):
    """Three hosts, two copies of each rank. Rank 0 snapshots 2 and 3 while another rank still works on 2.
    Writing 3, rank 0's worker goes over its uncommitted 2 and the peer receiving rank 0's 3 goes over its
    replica of 2: both withdraw their claims. When the lagging rank finally seals 2, its node (which holds
    no copy of rank 0, so its own check cannot see the loss) must not commit 2: rank 0's manifest names no
    copy left. Before, it committed 2 on the stale manifest and a restore then found no copy of rank 0."""
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    _commit(c, [0, 1, 2], 1)
    (holder,) = placement.for_assignment(c.assignment, 2).peers(0)
    peer = int(holder[1:])
    lagging = next(i for i in (1, 2) if i != peer)
    for i in (0, peer):
        c.seal(i, i, 2, state(i, 2), as_worker=True)
    c.wait_idle([0, 1, 2])
    assert set(read_manifests(c.kv, c.keys, 1, 2)[0].holders) == {"n0", f"n{peer}"}
    c.seal(0, 0, 3, state(0, 3), as_worker=True)  # over 2 on n0; replicated over 2 on the peer
    c.wait_idle([0, 1, 2])
    assert read_manifests(c.kv, c.keys, 1, 2)[0].holders == ()
    assert not c.mgrs[0].local.find(0, 2, 1) and not c.mgrs[peer].local.find(0, 2, 1)
    c.seal(lagging, lagging, 2, state(lagging, 2), as_worker=True)  # the last manifest of 2, then its commit check
    c.wait_idle([0, 1, 2])
    assert read_commit(c.kv, c.keys)[0].step == 1
    for i in (peer, lagging):
        c.seal(i, i, 3, state(i, 3), as_worker=True)
    c.wait_committed(3, [0, 1, 2])
    for i in (0, 1, 2):
        for rank in (0, 1, 2):
            src = c.mgrs[i].prepare_restore(rank, c.assignment)
            assert src.step == 3 and c.read(i, src).equal(state(rank, 3))


def test_a_peer_withdraws_the_replica_a_transfer_goes_over_once(make_cluster):
    """Nothing committed (rank 1 never snapshots): the peer's replica of rank 0 holds 1 and 2, and step 3
    goes over 1. The offer withdraws that replica (claim off the manifest); the transfer finds it withdrawn
    already and asks etcd nothing more."""
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    for step in (1, 2):
        c.seal(0, 0, step, state(0, step), as_worker=True)
        c.wait_idle([0, 1])
    asked = []
    withdraw = c.mgrs[1].executor.withdraw
    c.mgrs[1].executor.withdraw = lambda *a: asked.append(a) or withdraw(*a)
    c.seal(0, 0, 3, state(0, 3), as_worker=True)
    c.wait_idle([0, 1])
    assert asked == [(1, 1, 0, "n1")]
    assert read_manifests(c.kv, c.keys, 1, 1)[0].holders == ()
    assert {i.step for i in c.mgrs[1].local.get(0, own=False).slots() if i.sealed} == {2, 3}


def _manifests(c, step: int, holders: dict[int, tuple[str, ...]]) -> None:
    for rank, h in holders.items():
        m = ShardManifest(rank=rank, step=step, generation=1, world_size=len(holders), nbytes=10, checksum="x",
                          owner=h[0] if h else "n0", holders=h)
        c.kv.put(c.keys.ckpt(1, step, rank), m.encode())


def test_a_claim_withdrawn_while_a_commit_is_in_flight_fails_that_commit(make_cluster, event_log):
    """The committer read both manifests (two copies each) and is about to write the commit record; the
    holder n1 withdraws its copy of rank 0 in between. The transaction must fail on the changed manifest,
    and the next attempt sees one copy: no commit."""
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    _manifests(c, 5, {0: ("n0", "n1"), 1: ("n1", "n0")})
    txns = []
    fenced_txn = c.fences[0].fenced_txn

    def recording_txn(*args, **kwargs):
        result = fenced_txn(*args, **kwargs)
        txns.append(result.succeeded)
        return result

    c.fences[0].fenced_txn = recording_txn
    executor = CommitExecutor(c.kv, c.keys, c.fences[0])
    failpoints.arm("repl.commit.before_txn", "1*sleep(2000)")
    decisions = []
    try:
        t = threading.Thread(target=lambda: decisions.append(executor.try_commit(1, 2, 5, 2, 2)))
        t.start()
        # the committer read the manifests, decided to commit and now sleeps before its transaction
        wait_until(lambda: any(e["kind"] == "failpoint.fired" and e["name"] == "repl.commit.before_txn"
                               for e in events.read(event_log)), 10, "the committer at its transaction")
        assert CommitExecutor(c.kv, c.keys, None).withdraw(1, 5, 0, "n1") is None
        t.join(15)
    finally:
        failpoints.arm("repl.commit.before_txn", "off")
    assert txns == [False], txns  # the one transaction tried failed on the changed manifest
    assert decisions and decisions[0].action == WAIT, decisions
    assert read_commit(c.kv, c.keys)[0] is None
    assert read_manifests(c.kv, c.keys, 1, 5)[0].holders == ("n0",)


def test_a_withdrawal_after_the_commit_keeps_the_copy(make_cluster):
    """The commit landed first: withdrawing answers the commit record and leaves the manifest alone (the
    writer then keeps that copy)."""
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    _manifests(c, 5, {0: ("n0", "n1"), 1: ("n1", "n0")})
    executor = CommitExecutor(c.kv, c.keys, c.fences[0])
    assert executor.try_commit(1, 2, 5, 2, 2).action == COMMIT
    record = executor.withdraw(1, 5, 0, "n1")
    assert record is not None and (record.step, record.generation) == (5, 1)
    assert read_manifests(c.kv, c.keys, 1, 5)[0].holders == ("n0", "n1")
    assert executor.withdraw(1, 4, 0, "n1") is None, "an older step can never commit: nothing to keep"
