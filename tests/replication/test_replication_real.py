"""ShardManagers as hosts on loopback, against a real etcd: replication, commit, restore, corruption,
host loss during replication, and refusal of stale, unauthenticated or malformed peers."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading

import grpc
import pytest
import torch

from resilient import events
from resilient._proto import peer_pb2 as pb
from resilient.errors import TransportError
from resilient.replication.commit import read_commit, read_manifests
from resilient.replication.peer_service import PeerAuthority, PeerClient, PeerRefused
from resilient.replication.settings import DEFAULT_RPC_TIMEOUT_S
from resilient.store import Segment
from resilient.store.transport import send_slot
from resilient.testing.etcd import wait_until
from tests.replication.conftest import state




def commit_step(c, members, step):
    for k, i in enumerate(members):
        c.seal(i, k, step, state(k, step))
    c.wait_committed(step, members)


def test_seal_replicated_then_committed(make_cluster, event_log):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    commit_step(c, [0, 1, 2], 5)
    record, _ = read_commit(c.kv, c.keys)
    assert (record.step, record.generation, record.world_size, record.replicas) == (5, 1, 3, 2)
    manifests = read_manifests(c.kv, c.keys, 1, 5)
    assert sorted(manifests) == [0, 1, 2]
    for rank, m in manifests.items():
        assert len(m.holders) == 2 and m.holders[0] == f"n{rank}"
        hosts = {c.nodes[int(h[1:])].host for h in m.holders}
        assert len(hosts) == 2
    kinds = [e["kind"] for e in events.read(event_log)]
    assert kinds.count("replica.sent") == 3
    assert kinds.count("ckpt.committed") == 1
    assert all(m.host_memory_bytes() > 2 * 200_000 for m in c.mgrs)


def test_newer_commit_releases_older_and_moves_forward(make_cluster):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    commit_step(c, [0, 1, 2], 1)
    commit_step(c, [0, 1, 2], 2)

    def steps_listed():
        items, _ = c.kv.get_prefix(c.keys.ckpt_prefix)
        return {k.key.split("/")[-2] for k in items}

    # the committing agent prunes right after its commit transaction; other agents may see the commit first
    wait_until(lambda: steps_listed() == {f"{2:012d}"}, 10.0, "older manifests pruned after a newer commit")
    # every holder keeps the committed step in one slot
    for rank in range(3):
        m = read_manifests(c.kv, c.keys, 1, 2)[rank]
        for h in m.holders:
            assert c.mgrs[int(h[1:])].local.find(rank, 2, 1)


@contextlib.contextmanager
def silent_peer():
    """A listening socket that accepts connections and never says anything, as a peer paused (SIGSTOP) or cut
    off by a silent drop looks from outside; yields its address and the connections it accepted."""
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        yield f"127.0.0.1:{silent.getsockname()[1]}", accepted
    finally:
        silent.close()
        for sock in accepted:
            sock.close()


def _past_a_silent_peer(make_cluster, event_log, address_field: str, timeout: float) -> list[dict]:
    """Rank 0 replicates step 1 to a peer whose ``address_field`` is a silent one; the next generation, without
    that peer, must commit step 2 within ``timeout``. Returns the ``replica.skipped`` events of step 1."""
    with silent_peer() as (address, accepted):
        c = make_cluster(2, replicas=2)
        c.nodes[1] = dataclasses.replace(c.nodes[1], **{address_field: address})
        c.form(1, [0, 1])
        c.seal(0, 0, 1, state(0, 1))
        wait_until(lambda: accepted, 10.0, f"rank 0 to connect to the peer's {address_field}")
        c.form(2, [0])  # the peer is gone from the job
        c.seal(0, 0, 2, state(0, 2))
        c.wait_committed(2, [0], timeout=timeout)
    return [e for e in events.read(event_log) if e["kind"] == "replica.skipped" and e["step"] == 1]


def test_a_send_to_a_silent_peer_is_aborted_when_its_generation_ends(make_cluster, event_log):
    """A send to a silent peer would block up to replicate_timeout_s (60 s), holding back every newer snapshot
    of that rank, even after the generation moved on without the peer (chaos scenario pause-node-outlived).
    The new generation aborts it."""
    # well before the 60 s the blocked send would have taken
    skipped = _past_a_silent_peer(make_cluster, event_log, "bulk_addr", timeout=20.0)
    assert skipped and skipped[0]["gen"] == 1, skipped


def test_an_offer_to_a_silent_peer_is_cancelled_when_its_generation_ends(make_cluster, event_log):
    """A peer cut off by a partition (chaos scenario partition-host) or paused leaves the gRPC Offer waiting for
    rpc_timeout_s (10 s), and with it every newer snapshot of the rank, though the generation moved on without
    that peer. The new generation cancels the offer."""
    assert DEFAULT_RPC_TIMEOUT_S >= 10.0
    # before the offer's own timeout would have freed the rank
    skipped = _past_a_silent_peer(make_cluster, event_log, "addr", timeout=8.0)
    assert skipped and skipped[0]["gen"] == 1 and "cancelled" in skipped[0]["reason"], skipped


def test_restore_from_peer_is_bit_exact_after_local_loss(make_cluster, event_log):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    commit_step(c, [0, 1, 2], 7)
    c.kill(0)  # host 0's agent and shared memory are gone
    c.add_node(0, "host0")  # a replacement agent on a fresh host 0
    a = c.form(2, [0, 1, 2])
    for rank in range(3):
        src = c.mgrs[rank].prepare_restore(rank, a)
        assert src.step == 7 and src.source_rank == rank and src.world_size == 3
        assert src.origin == ("local" if rank else f"peer:{read_manifests(c.kv, c.keys, 1, 7)[0].holders[1]}")
        assert torch.equal(c.read(rank, src), state(rank, 7))
    plans = [e for e in events.read(event_log) if e["kind"] == "restore.plan"]
    assert len(plans) == 3


def test_corrupt_replica_is_skipped_reported_and_other_copy_used(make_cluster, event_log):
    c = make_cluster(3, replicas=3)
    c.form(1, [0, 1, 2])
    commit_step(c, [0, 1, 2], 3)
    holders = read_manifests(c.kv, c.keys, 1, 3)[0].holders
    first_peer = holders[1]  # rank 0 restores from holders in this order
    seg, slot = c.mgrs[int(first_peer[1:])].local.find(0, 3, 1)[0]
    buf = seg.slot_buffer(slot)
    buf[100] ^= 0xFF  # flip bits in the replica's stored bytes
    buf.release()
    c.kill(0)
    c.add_node(0, "host0")
    a = c.form(2, [0, 1, 2])
    src = c.mgrs[0].prepare_restore(0, a)
    assert src.origin == f"peer:{holders[2]}"
    assert torch.equal(c.read(0, src), state(0, 3))
    failed = [e for e in events.read(event_log) if e["kind"] == "ckpt.verify_failed"]
    assert failed and failed[0]["holder"] == first_peer and failed[0]["rank"] == 0 and failed[0]["step"] == 3


def test_host_lost_during_replication_uses_previous_commit_never_a_mix(make_cluster):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    commit_step(c, [0, 1, 2], 10)
    c.seal(0, 0, 20, state(0, 20))
    c.seal(1, 1, 20, state(1, 20))
    c.kill(2)  # dies before its own shard of step 20 is sealed, while peers may be sending to it
    c.wait_idle([0, 1])
    a = c.form(2, [0, 1])  # the survivors form a smaller world
    assert read_commit(c.kv, c.keys)[0].step == 10
    for rank in range(2):
        src = c.mgrs[rank].prepare_restore(rank, a)
        assert src.step == 10 and src.world_size == 3
        assert torch.equal(c.read(rank, src), state(src.source_rank, 10))
    # work of the old generation can no longer commit: fenced
    c.seal(0, 0, 30, state(0, 30))
    c.wait_idle([0, 1])
    assert read_commit(c.kv, c.keys)[0].step == 10


def test_world_shrink_restores_any_rank_shard(make_cluster):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    commit_step(c, [0, 1, 2], 4)
    c.kill(1)
    a = c.form(2, [0, 2])  # n0 -> rank 0, n2 -> rank 1; the snapshot's world size was 3
    src = c.mgrs[2].prepare_restore(1, a)
    # rank 1's shard when n2 holds a replica of it (origin: the node that sent it), else n2's own one
    assert src.world_size == 3
    assert (src.source_rank, src.origin) in ((1, "peer:n1"), (2, "local"))
    assert torch.equal(c.read(2, src), state(src.source_rank, 4))


def test_single_host_keeps_one_copy_and_commits(make_cluster):
    c = make_cluster(2, replicas=2, hosts=["same", "same"])
    c.form(1, [0, 1])
    commit_step(c, [0, 1], 1)
    assert read_commit(c.kv, c.keys)[0].replicas == 1
    assert all(len(m.holders) == 1 for m in read_manifests(c.kv, c.keys, 1, 1).values())


def _offer(client, mgr, rank=0, step=1, gen=1):
    return client.offer(mgr.node.addr, pb.ShardRef(rank=rank, step=step, shard_generation=gen, nbytes=100, world_size=3))


def test_stale_generation_peer_refused(make_cluster):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    a2 = c.form(2, [0, 1, 2])
    stale = PeerClient(PeerAuthority(c.keys.job, "n0", c.token), lambda: 1, 5.0, 1 << 20)
    try:
        with pytest.raises(PeerRefused) as exc:
            _offer(stale, c.mgrs[1], gen=1)
        assert exc.value.code == "FAILED_PRECONDITION"
    finally:
        stale.close()
    # an outsider with the token but outside the generation is refused too
    outsider = PeerClient(PeerAuthority(c.keys.job, "n9", c.token), lambda: a2.generation, 5.0, 1 << 20)
    try:
        with pytest.raises(PeerRefused) as exc:
            outsider.status(c.mgrs[1].node.addr)
        assert exc.value.code == "FAILED_PRECONDITION"
    finally:
        outsider.close()


def test_bad_token_refused_on_control_and_bulk(make_cluster):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    commit_step(c, [0, 1, 2], 1)
    bad = PeerClient(PeerAuthority(c.keys.job, "n0", b"not-the-token"), lambda: 1, 5.0, 1 << 20)
    try:
        with pytest.raises(PeerRefused) as exc:
            bad.status(c.mgrs[1].node.addr)
        assert exc.value.code == "UNAUTHENTICATED"
    finally:
        bad.close()
    seg, slot = c.mgrs[0].local.find(0, 1, 1)[0]
    host, port = c.mgrs[1].node.bulk_addr.split(":")
    with pytest.raises(TransportError, match="bad token"):
        send_slot(seg, slot, (host, int(port)), b"not-the-token", timeout=5)
    # the right token but no Offer first: the receiver expects nothing, refuses
    with pytest.raises(TransportError, match="unknown peer"):
        send_slot(seg, slot, (host, int(port)), c.token, timeout=5)


def test_malformed_messages_rejected_agent_survives(make_cluster):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    target = c.mgrs[1]
    channel = grpc.insecure_channel(target.node.addr)
    for method in ("Offer", "Pull", "Status"):
        raw = channel.unary_unary(f"/resilient.v1.PeerService/{method}")
        with pytest.raises(grpc.RpcError):
            raw(b"\x0a\xff\xff\xff\xff\x0fjunk", timeout=5)
        with pytest.raises(grpc.RpcError) as exc:
            raw(b"\x12\x80\x80\x08" + b"z" * (200 * 1024), timeout=5)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()
    host, port = target.node.bulk_addr.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.recv(64)
        s.sendall(b"RSLB\x01\x00\x00\x00\xff\xff\xff\x7f" + b"garbage" * 10)
    # still serving both paths: a full replicate + commit round works
    commit_step(c, [0, 1, 2], 2)
    client = PeerClient(PeerAuthority(c.keys.job, "n0", c.token), lambda: 1, 5.0, 1 << 20)
    try:
        assert client.status(target.node.addr).committed_step == 2
    finally:
        client.close()


def test_corrupt_sealed_slot_is_refused_by_receiver_skipped_and_counted(make_cluster, event_log):
    c = make_cluster(2, replicas=2)
    a = c.form(1, [0, 1])
    commit_step(c, [0, 1], 1)
    mgr = c.mgrs[0]
    seg = Segment.open(mgr.segment_for(0, 300_000), c.shm(0))
    seg.write({"w": state(0, 2)}, step=2, generation=a.generation)
    info = seg.seal()
    buf = seg.slot_buffer(info.slot)
    buf[5] ^= 0x01  # a bit flips in the sealed snapshot before it is replicated
    buf.release()
    seg.close()
    mgr.on_sealed(0, 2, a.generation, 300_000)
    c.seal(1, 1, 2, state(1, 2))
    c.wait_idle([0, 1])
    assert mgr.stats.skipped == 1
    skipped = [e for e in events.read(event_log) if e["kind"] == "replica.skipped"]
    assert [(e["rank"], e["step"]) for e in skipped] == [(0, 2)] and "checksum" in skipped[0]["reason"]
    assert read_commit(c.kv, c.keys)[0].step == 1  # the step with a corrupt shard never commits
    assert c.mgrs[1].local.find(0, 1, 1), "the peer kept its committed copy of rank 0"
