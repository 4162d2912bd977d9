"""Transient etcd errors while a ShardManager replicates: its sender threads survive them (the snapshot is
retried once or skipped with ``cause="etcd"``) and later snapshots still commit. Real etcd, real segments,
real gRPC and bulk TCP; only the fencing path of one node is wrapped to fail its manifest writes."""

from __future__ import annotations

import threading

import torch

from resilient import events
from resilient.errors import EtcdIndeterminateError
from resilient.etcd.api import Put
from resilient.replication.commit import read_commit


def state(rank: int, step: int, n: int = 20_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, generator=g)


class FailingManifestWrites:
    """The node's fencing, except that its next ``failures`` manifest writes raise EtcdIndeterminateError
    (what an etcd leader kill surfaces as: DEADLINE_EXCEEDED on a transaction)."""

    def __init__(self, fence, ckpt_prefix: str, failures: int) -> None:
        self.fence, self.ckpt_prefix, self.failures = fence, ckpt_prefix, failures
        self.raised = 0
        self._lock = threading.Lock()

    def fenced_txn(self, generation, compares, success, failure=()):
        if any(isinstance(op, Put) and op.key.startswith(self.ckpt_prefix) for op in success):
            with self._lock:
                fail = self.raised < self.failures
                if fail:
                    self.raised += 1
            if fail:
                raise EtcdIndeterminateError(
                    "The transaction on etcd 127.0.0.1:2379 failed with DEADLINE_EXCEEDED; its outcome is unknown.")
        return self.fence.fenced_txn(generation, compares, success, failure)


def seal_all(c, step: int) -> None:
    for rank in range(2):
        c.seal(rank, rank, step, state(rank, step))


def test_skipped_on_etcd_error_then_next_step_commits(make_cluster, event_log):
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    shim = FailingManifestWrites(c.fences[0], c.keys.ckpt_prefix, failures=2)  # the try and its one retry
    c.mgrs[0].executor.rendezvous = shim
    seal_all(c, 1)
    c.wait_idle([0, 1])
    assert shim.raised == 2
    assert c.mgrs[0].committed_step() is None, "rank 0's shard of step 1 never got a manifest"
    skipped = [e for e in events.read(event_log) if e["kind"] == "replica.skipped"]
    assert [(e["rank"], e["step"], e["cause"]) for e in skipped] == [(0, 1, "etcd")]
    assert "EtcdIndeterminateError" in skipped[0]["reason"]
    assert all(t.is_alive() for t in c.mgrs[0]._threads), "a sender thread died of the etcd error"
    seal_all(c, 2)
    c.wait_committed(2, [0, 1])
    record, _ = read_commit(c.kv, c.keys)
    assert (record.step, record.generation) == (2, 1)


def test_one_etcd_error_is_retried_and_the_step_commits(make_cluster, event_log):
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    shim = FailingManifestWrites(c.fences[0], c.keys.ckpt_prefix, failures=1)
    c.mgrs[0].executor.rendezvous = shim
    seal_all(c, 1)
    c.wait_committed(1, [0, 1])
    assert shim.raised == 1
    assert c.mgrs[0].stats.skipped == 0
    seal_all(c, 2)
    c.wait_committed(2, [0, 1])
