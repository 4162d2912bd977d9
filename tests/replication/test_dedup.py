"""Data-parallel deduplication across hosts: ShardManagers on loopback against a real etcd, with real
model and optimizer state sliced by ``resilient.elastic.dedup`` (each rank seals only its 1/N slice), real
replication and commit. A restore after a host loss reassembles the whole state bit for bit from the N
slices (local copies, else pulled from peer holders), also into a world of another size; each rank's
shard really is ~1/N of the shared state."""

from __future__ import annotations

import pickle

import pytest
import torch

from resilient.elastic import capture as cap
from resilient.elastic import dedup
from resilient.elastic.snapshots import load_snapshot, required_capacity
from resilient.errors import ReplicationError, StateError
from resilient.replication.commit import read_manifests
from resilient.replication.slices import marker_at
from resilient.store import Segment


def full_state(step: int) -> cap.Captured:
    """Model + optimizer the same on every rank (as under DDP), after ``step`` Adam steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 33)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(step)
    for _ in range(step):
        opt.zero_grad()
        model(torch.randn(4, 64, generator=g, dtype=torch.float64)).square().sum().backward()
        opt.step()
    return cap.capture({"model": model, "optimizer": opt}, extra_meta={"step": step})


def rank_capture(full: cap.Captured, rank: int, world: int) -> cap.Captured:
    """What rank ``rank`` captures: the shared state plus its own per-rank values."""
    meta = cap.load_meta(full.meta)
    meta.update(rank=rank, world_size=world)
    tensors = dict(full.tensors)
    tensors["_rng/torch_cpu"] = torch.full((8,), rank, dtype=torch.uint8)
    return cap.Captured(tensors, pickle.dumps(meta))


def seal_sliced(c, i: int, rank: int, world: int, step: int, full: cap.Captured) -> int:
    """A worker with dedup on: slice, write into the agent's segment, seal, tell the agent; returns the
    slot bytes of the sliced shard."""
    sliced = dedup.split(rank_capture(full, rank, world))
    nbytes = required_capacity(sliced)
    mgr = c.mgrs[i]
    seg = Segment.open(mgr.segment_for(rank, nbytes + 4096), c.shm(i))
    try:
        seg.write(sliced.tensors, step=step, generation=c.assignment.generation, meta=sliced.meta)
        info = seg.seal()
    finally:
        seg.close()
    mgr.on_sealed(rank, step, c.assignment.generation, nbytes)
    return info.nbytes


def commit_sliced(c, world: int, step: int) -> cap.Captured:
    """Generation 1 of hosts ``0..world-1``: each rank seals its slice of one state at ``step``; committed.
    Returns the whole state the slices are cut from."""
    full = full_state(step)
    c.form(1, list(range(world)))
    for k in range(world):
        seal_sliced(c, k, k, world, step, full)
    c.wait_committed(step, list(range(world)))
    return full


def restored(c, i: int, src, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("RESILIENT_SHM_DIR", c.shm(i))
    return load_snapshot(src).tensors


def assert_whole(tensors: dict[str, torch.Tensor], full: cap.Captured, rank: int) -> None:
    shared = {k: v for k, v in tensors.items() if not k.startswith("_")}
    assert shared.keys() == full.tensors.keys()
    for k, v in full.tensors.items():
        assert shared[k].dtype == v.dtype and shared[k].shape == v.shape and torch.equal(shared[k], v), k
    assert torch.equal(tensors["_rng/torch_cpu"], torch.full((8,), rank, dtype=torch.uint8))
    assert not any(k.startswith("_dedup") for k in tensors)


def test_each_rank_holds_a_1_over_n_slice(make_cluster):
    full = full_state(3)
    for world in (1, 2, 3):
        c = make_cluster(world, replicas=min(2, world))
        c.form(1, list(range(world)))
        sizes = [seal_sliced(c, i, i, world, 3, full) for i in range(world)]
        whole = required_capacity(rank_capture(full, 0, world))
        for nbytes in sizes:
            # the rank's slice + its own RNG + the meta (skeleton and slice layout) + alignment
            assert nbytes <= full.tensor_bytes / world + 12_000, (world, nbytes, full.tensor_bytes)
        if world > 1:
            assert sum(sizes) <= whole + world * 12_000
        c.wait_committed(3, list(range(world)))


def test_restore_after_host_loss_reassembles_from_peer_slices_bitwise(make_cluster, monkeypatch):
    c = make_cluster(3, replicas=2)
    full = commit_sliced(c, 3, 5)
    for k in range(3):
        seg = c.mgrs[k].local.get(k, True)
        marker = marker_at(seg, 5, 1)
        assert (marker.rank, marker.world_size) == (k, 3)
    c.kill(0)
    c.add_node(0, "host0")  # a fresh host holds nothing: every slice comes from peers
    a = c.form(2, [0, 1, 2])
    for rank in range(3):
        src = c.mgrs[rank].prepare_restore(rank, a)
        assert src.step == 5 and src.source_rank == rank and len(src.slices) == 3
        assert src.slices[rank] == src.segment
        assert_whole(restored(c, rank, src, monkeypatch), full, rank)
    # the replacement host fetched the two shards it did not hold from their holders
    assert c.mgrs[0].stats.restored_bytes > 0


def test_restore_into_a_smaller_world_reassembles_from_the_old_slices(make_cluster, monkeypatch):
    c = make_cluster(3, replicas=2)
    full = commit_sliced(c, 3, 4)
    c.kill(1)
    a = c.form(2, [0, 2])  # world 3 -> 2; the step was cut into 3 slices
    for rank, i in ((0, 0), (1, 2)):
        src = c.mgrs[i].prepare_restore(rank, a)
        assert src.world_size == 3 and len(src.slices) == 3
        tensors = restored(c, i, src, monkeypatch)
        assert_whole(tensors, full, src.source_rank)


def test_restore_into_a_larger_world(make_cluster, monkeypatch):
    c = make_cluster(3, replicas=2)
    full = commit_sliced(c, 2, 2)
    a = c.form(2, [0, 1, 2])  # world 2 -> 3: the newcomer pulls both slices
    src = c.mgrs[2].prepare_restore(2, a)
    assert src.world_size == 2 and len(src.slices) == 2
    assert_whole(restored(c, 2, src, monkeypatch), full, src.source_rank)


def test_a_slice_with_no_copy_left_is_not_restored_from_memory(make_cluster):
    c = make_cluster(3, replicas=1)  # one copy each: losing a host loses its slice
    commit_sliced(c, 3, 1)
    c.kill(2)
    a = c.form(2, [0, 1])  # another world size: a whole snapshot would restore from any shard
    with pytest.raises(ReplicationError, match="no surviving copy"):
        c.mgrs[0].prepare_restore(0, a)


def test_a_fresh_host_knows_a_step_is_sliced_from_etcd_and_decides_like_the_others(make_cluster):
    """The manifests say a step is sliced: a host holding no copy of it reaches the same verdict as one
    that does (a lost slice: durable tier), without fetching a shard first only to find it cannot be
    assembled, and without the fault that would void the step for everyone."""
    c = make_cluster(3, replicas=1)  # one copy each: losing a host loses its slice
    commit_sliced(c, 3, 1)
    assert all(m.sliced for m in read_manifests(c.kv, c.keys, 1, 1).values())
    c.kill(2)
    c.add_node(3, "host3")  # fresh hosts hold nothing
    c.add_node(4, "host4")
    a = c.form(2, [0, 1, 3, 4])  # another world size: a whole snapshot would restore from any one shard
    for i, rank in ((0, 0), (3, 2)):
        with pytest.raises(ReplicationError, match=r"no surviving copy of the shards of ranks \[2\]"):
            c.mgrs[i].prepare_restore(rank, a)
    assert c.mgrs[3].stats.restored_bytes == 0
    assert c.kv.get_prefix(c.keys.fault_prefix)[0] == []


def test_missing_slices_are_refused_by_the_worker(make_cluster, monkeypatch):
    c = make_cluster(2, replicas=2)
    commit_sliced(c, 2, 1)
    src = c.mgrs[0].prepare_restore(0, c.form(2, [0, 1]))
    monkeypatch.setenv("RESILIENT_SHM_DIR", c.shm(0))
    import dataclasses

    with pytest.raises(StateError, match="every slice"):
        load_snapshot(dataclasses.replace(src, slices=()))
    with pytest.raises(StateError, match="Slice 1 of 2"):  # slice 1 named by rank 0's segment
        load_snapshot(dataclasses.replace(src, slices=(src.segment, src.segment)))
    assert read_manifests(c.kv, c.keys, 1, 1).keys() == {0, 1}


def test_odd_dtypes_and_shapes_survive_slicing_and_per_rank_state_is_left_whole(shm_root, monkeypatch):
    monkeypatch.setenv("RESILIENT_SHM_DIR", shm_root)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)  # the same on every rank
            self.register_buffer("flag", torch.tensor([True, False, True]))
            self.register_buffer("bf", torch.arange(7, dtype=torch.bfloat16))
            self.register_buffer("scalar", torch.tensor(3.5, dtype=torch.float64))
            self.register_buffer("empty", torch.empty(0, 4))
            self.w = torch.nn.Parameter(torch.randn(5, 3))

    world = 4
    names = []
    for rank in range(world):
        c = cap.capture({"model": Holder(), "_state": {"seen": torch.full((3,), rank)}},
                        extra_meta={"step": 2, "rank": rank, "world_size": world})
        sliced = dedup.split(c)
        assert "_state/seen" in sliced.tensors and not any(k.startswith("model/") for k in sliced.tensors)
        seg = Segment.create(f"odd{rank}", required_capacity(sliced) + 4096, job="odd", rank=rank, shm_dir=shm_root)
        seg.write(sliced.tensors, step=2, generation=1, meta=sliced.meta)
        seg.seal()
        names.append(seg.name)
        seg.close()
    want = cap.capture({"model": Holder()}, extra_meta={"step": 2})
    from resilient.runtime.api import RestoreSource

    got = load_snapshot(RestoreSource(2, 1, names[3], 3, "local", world, tuple(names))).tensors
    for k, v in want.tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    assert torch.equal(got["_state/seen"], torch.full((3,), 3))


def test_no_surviving_copy_reassembles_the_slices_from_the_durable_tier(make_cluster, tmp_path, monkeypatch):
    from resilient.persist import latest_complete
    from resilient.replication.durable import ShardedPersist

    full6, full7 = full_state(6), full_state(7)
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    ps = [ShardedPersist(m, str(tmp_path / "ckpt"), job=c.keys.job, keep=2, every=1, wait_s=20.0) for m in c.mgrs]
    try:
        for k in range(2):
            seal_sliced(c, k, k, 2, 6, full6)
        c.wait_committed(6, [0, 1])
        ps[0].tick(final=True)
        ps[1].tick(final=True)
        assert latest_complete(str(tmp_path / "ckpt")).step == 6
        for k in range(2):
            seal_sliced(c, k, k, 2, 7, full7)  # in memory only
        c.wait_committed(7, [0, 1])
    finally:
        for p in ps:
            p.close()
    c.kill(0)
    c.kill(1)
    c.add_node(2, "host2")
    a = c.form(2, [2])  # one host left, a world of 1: both slices of step 6 come from disk
    fresh = ShardedPersist(c.mgrs[2], str(tmp_path / "ckpt"), job=c.keys.job, keep=2, every=1)
    try:
        src = c.mgrs[2].prepare_restore(0, a)
        assert (src.origin, src.step, src.world_size, len(src.slices)) == ("durable", 6, 2, 2)
        assert_whole(restored(c, 2, src, monkeypatch), full6, src.source_rank)
    finally:
        fresh.close()
