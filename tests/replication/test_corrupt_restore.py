"""A copy found corrupt only at fetch time must not split the ranks of a generation between the committed
memory step and the durable step: two hosts against a real etcd, h1's replica of rank 0 corrupted after
h0 (and its memory) is lost; rank 1 plans its intact local copy first, rank 0 then finds no verified copy.
Every rank of the generation that follows restores the same (durable) step, bit for bit."""

from __future__ import annotations

import json
import threading

import torch

from resilient import events
from resilient.errors import ReplicationError
from resilient.etcd.api import Put
from resilient.replication.commit import read_manifests
from resilient.runtime.api import RestoreSource
from resilient.testing.etcd import wait_until
from tests.replication.conftest import state

DURABLE_STEP = 1
MEMORY_STEP = 2


def publish_fault(self, generation, what, detail):
    """The rendezvous' ``publish_fault``: a fenced ``fault/<generation>/<node>``."""
    body = json.dumps({"what": what, "detail": detail, "by": self.node.node_id}).encode()
    self.fenced_txn(generation, [], [Put(self.keys.fault(generation, self.node.node_id), body)])


def durable_tier(c, i):
    """Stands in for ShardedPersist.restore: step DURABLE_STEP of the rank's shard, copied into a segment."""
    def restore(rank, assignment, reason):
        mgr = c.mgrs[i]
        t = state(rank, DURABLE_STEP)
        seg = mgr.local.ensure(rank, own=False, nbytes=t.numel() * t.element_size() + 4096)
        seg.write({"w": t}, step=DURABLE_STEP, generation=1, meta=f"rank{rank}".encode())
        seg.seal()
        return RestoreSource(step=DURABLE_STEP, generation=1, segment=seg.name, source_rank=rank, origin="durable",
                             world_size=assignment.world_size)
    return restore


def test_corrupt_copy_found_at_fetch_never_splits_the_ranks(make_cluster, event_log, monkeypatch):
    c = make_cluster(2, replicas=2)
    monkeypatch.setattr(type(c.fences[0]), "publish_fault", publish_fault, raising=False)
    c.form(1, [0, 1])
    for step in (DURABLE_STEP, MEMORY_STEP):
        for rank in (0, 1):
            c.seal(rank, rank, step, state(rank, step))
        c.wait_committed(step, [0, 1])
    c.wait_idle([0, 1])
    seg, slot = c.mgrs[1].local.find(0, MEMORY_STEP, 1)[0]  # h1's replica of rank 0: the only copy left
    c.kill(0)
    buf = seg.slot_buffer(slot)
    buf[100] ^= 0xFF
    buf.release()
    c.add_node(0, "host0")  # the replacement h0, same node id, empty memory
    for i in (0, 1):
        c.mgrs[i].durable_fallback = durable_tier(c, i)
    a2 = c.form(2, [0, 1])

    first = c.mgrs[1].prepare_restore(1, a2)  # rank 1 plans its intact local copy of the memory step
    assert (first.step, first.origin) == (MEMORY_STEP, "local")
    out = {}

    def plan_rank0():
        try:
            out[0] = c.mgrs[0].prepare_restore(0, a2)
        except ReplicationError as exc:
            out[0] = exc

    t = threading.Thread(target=plan_rank0)
    t.start()
    try:
        # rank 0 finds no verified copy: the verdict goes to etcd and generation 2 is faulted
        wait_until(lambda: c.kv.get(c.keys.fault(2, "n0")) is not None, 30, "the restore fault of generation 2")
        assert read_manifests(c.kv, c.keys, 1, MEMORY_STEP)[0].holders == ()
        a3 = c.form(3, [0, 1])
    finally:
        t.join(60)
    # generation 2 is over: rank 0 gets no source in it (never a step different from rank 1's there)
    assert not t.is_alive() and isinstance(out[0], ReplicationError)
    failed = [e for e in events.read(event_log) if e["kind"] == "ckpt.verify_failed"]
    assert failed and all(e["rank"] == 0 and e["step"] == MEMORY_STEP for e in failed)

    sources = {rank: c.mgrs[rank].prepare_restore(rank, a3) for rank in (0, 1)}
    assert {s.step for s in sources.values()} == {DURABLE_STEP}  # never a mix
    assert {s.origin for s in sources.values()} == {"durable"}
    for rank, src in sources.items():
        assert torch.equal(c.read(rank, src), state(rank, DURABLE_STEP))
