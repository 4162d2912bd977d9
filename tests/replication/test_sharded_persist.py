"""Durable tier with several hosts, against a real etcd and real segments: each agent writes its own
shards, group rank 0 commits the manifest, ENOSPC keeps the previous checkpoint latest, and restore falls
back to disk when no copy in memory survives (all ranks together, never a mix of steps)."""

from __future__ import annotations

import json

import pytest
import torch

from resilient import events
from resilient.persist import latest_complete, load
from resilient.replication.commit import read_commit
from resilient.replication.durable import ShardedPersist
from resilient.testing.etcd import wait_until

from tests.replication.conftest import state
from tests.replication.test_replication_real import commit_step


@pytest.fixture
def persisted(make_cluster, tmp_path):
    made = []

    def make(c, every=1, failpoints=None):
        ps = [ShardedPersist(m, str(tmp_path / "ckpt"), job=c.keys.job, keep=2, every=every, wait_s=20.0,
                             failpoints=failpoints) for m in c.mgrs]
        made.extend(ps)
        return ps

    yield make
    for p in made:
        p.close()


def kinds(path):
    return [e for e in events.read(path)]


def test_each_agent_writes_its_shards_and_rank0_commits_the_manifest(make_cluster, persisted, tmp_path, event_log):
    c = make_cluster(3, replicas=2)
    c.form(1, [0, 1, 2])
    ps = persisted(c)
    commit_step(c, [0, 1, 2], 4)
    for p in ps:
        p.tick(final=False)
    # the committer's persist.done comes once the round is over (manifest written, persisted/latest updated)
    wait_until(lambda: any(e["kind"] == "persist.done" for e in kinds(event_log)), 90, "the manifest commit")
    m = latest_complete(str(tmp_path / "ckpt"))
    assert (m.step, m.world_size) == (4, 3)
    loaded = load(m)
    for rank in range(3):
        assert torch.equal(loaded[rank].tensors["w"], state(rank, 4))
        assert bytes(loaded[rank].meta) == f"rank{rank}".encode()
    evs = kinds(event_log)
    writers = {e["rank"]: e["node"] for e in evs if e["kind"] == "persist.shard"}
    assert writers.keys() == {0, 1, 2}
    assert [e["step"] for e in evs if e["kind"] == "persist.done"] == [4]
    latest = json.loads(c.kv.get(c.keys.persisted_latest).value)
    assert latest["step"] == 4


def test_enospc_on_one_writer_fails_cleanly_and_keeps_the_previous_latest(make_cluster, persisted, tmp_path,
                                                                          event_log):
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    ps = persisted(c)
    commit_step(c, [0, 1], 2)
    ps[0].tick(final=False)
    wait_until(lambda: latest_complete(str(tmp_path / "ckpt")) is not None, 90, "the first persist")
    # the writer of rank 1 hits a full disk on the next one
    ps[1]._fp = __import__("resilient.failpoints", fromlist=["Registry"]).Registry("persist.shard.after_write=enospc")
    # a newer step's shard that a host is writing meanwhile (no manifest yet): the failed round's tidy-up must
    # leave it (removing it made the next manifest name a shard that was gone: chaos corrupt-replica)
    in_flight = tmp_path / "ckpt" / "step-00000009"
    in_flight.mkdir()
    (in_flight / "rank-1.safetensors").write_bytes(b"being written")
    commit_step(c, [0, 1], 3)
    ps[0].tick(final=False)
    # the committer's event names the checkpoint directory (a writer's names its rank's error instead)
    wait_until(lambda: any(e["kind"] == "persist.failed" and "dir" in e for e in kinds(event_log)), 90,
               "the committer to give up")
    failed = [e for e in kinds(event_log) if e["kind"] == "persist.failed"]
    assert all(e["errno"] == "ENOSPC" for e in failed)
    assert latest_complete(str(tmp_path / "ckpt")).step == 2
    assert not (tmp_path / "ckpt" / "step-00000003").exists()
    assert (in_flight / "rank-1.safetensors").read_bytes() == b"being written"
    assert json.loads(c.kv.get(c.keys.persisted_latest).value)["step"] == 2
    # what the exit summary reports: the committer's failed round and the writer's failed shard
    committer, writer = ps[0].last_attempt(), ps[1].last_attempt()
    assert (committer.step, committer.final) == (3, False) and committer.error.startswith("ENOSPC: ")
    assert writer.step == 3 and writer.error.startswith("rank 1: ENOSPC: ")


def test_a_request_for_a_step_whose_manifests_are_gone_ends_at_once_as_superseded(make_cluster, persisted, tmp_path,
                                                                                   event_log):
    # the committer's view of the committed step lagged (chaos corrupt-replica): a newer commit had already
    # dropped step 4's shard manifests when the request went out, so no agent can tell it writes them. The
    # round used to wait wait_s (60 s in the agent) for shards nobody writes, and no step was persisted meanwhile.
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    ps = persisted(c)
    commit_step(c, [0, 1], 4)
    c.kv.delete(c.keys.ckpt_step_prefix(1, 4), prefix=True)
    ps[0].tick(final=False)
    wait_until(lambda: any(e["kind"] == "persist.superseded" for e in kinds(event_log)), 90, "the round to end")
    evs = kinds(event_log)
    [superseded] = [e for e in evs if e["kind"] == "persist.superseded"]
    assert (superseded["step"], superseded["by_step"]) == (4, 4)
    assert not [e for e in evs if e["kind"] in ("persist.failed", "persist.shard", "persist.done")]
    assert ps[0].last_attempt() is None  # not a failed persist: nothing for the exit summary to report
    assert latest_complete(str(tmp_path / "ckpt")) is None
    assert not (tmp_path / "ckpt" / "step-00000004").exists()
    # the next due step persists as usual
    commit_step(c, [0, 1], 5)
    ps[0].tick(final=False)
    wait_until(lambda: any(e["kind"] == "persist.done" for e in kinds(event_log)), 90, "the next persist")
    assert latest_complete(str(tmp_path / "ckpt")).step == 5


def test_no_surviving_copy_restores_every_rank_from_disk(make_cluster, persisted, tmp_path, event_log):
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    ps = persisted(c)
    commit_step(c, [0, 1], 6)
    ps[0].tick(final=True)
    ps[1].tick(final=True)
    assert latest_complete(str(tmp_path / "ckpt")).step == 6
    commit_step(c, [0, 1], 7)  # in memory only
    for p in ps:
        p.close()
    c.kill(0)
    c.kill(1)
    c.add_node(2, "host2")
    c.add_node(3, "host3")
    a = c.form(2, [2, 3])
    fresh = [ShardedPersist(c.mgrs[i], str(tmp_path / "ckpt"), job=c.keys.job, keep=2, every=1) for i in (2, 3)]
    try:
        assert read_commit(c.kv, c.keys)[0].step == 7
        for k, i in enumerate([2, 3]):
            src = c.mgrs[i].prepare_restore(k, a)
            assert (src.origin, src.step, src.source_rank) == ("durable", 6, k)
            assert torch.equal(c.read(i, src), state(k, 6))
        assert {e["origin"] for e in kinds(event_log) if e["kind"] == "restore.plan"} == {"durable"}
    finally:
        for p in fresh:
            p.close()


def test_replica_segments_stay_in_the_holders_shm_dir(make_cluster):
    """What the chaos harness corrupts: a peer's copy, a file in the holder's own shm directory, present
    (not unlinked while mapped) after every commit."""
    import os

    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    for step in range(1, 7):
        commit_step(c, [0, 1], step)
        c.wait_idle([0, 1])
        for i in (0, 1):
            rep = c.mgrs[i].local.name(1 - i, False)
            assert os.path.exists(os.path.join(c.shm(i), f"resilient-{rep}")), (step, i, os.listdir(c.shm(i)))


def test_corrupt_held_replica_after_shrink_falls_back_to_another_shard(make_cluster, event_log):
    """The corrupt-replica scenario: the survivor's copy of the lost host's shard is damaged; the world
    shrinks, so the survivor's own shard (data-parallel state) serves instead, and the damage is reported."""
    from resilient.replication.commit import read_manifests

    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    commit_step(c, [0, 1], 5)
    assert read_manifests(c.kv, c.keys, 1, 5)[0].holders == ("n0", "n1")
    seg, slot = c.mgrs[1].local.find(0, 5, 1)[-1]
    assert seg.name == c.mgrs[1].local.name(0, False)
    buf = seg.slot_buffer(slot)
    buf[64] ^= 0xFF
    buf.release()
    c.kill(0)
    a = c.form(2, [1])
    src = c.mgrs[1].prepare_restore(0, a)
    assert (src.source_rank, src.origin, src.step) == (1, "local", 5)
    assert torch.equal(c.read(1, src), state(1, 5))
    failed = [e for e in kinds(event_log) if e["kind"] == "ckpt.verify_failed"]
    assert failed and failed[0]["rank"] == 0 and failed[0]["holder"] == "n1"


def test_surviving_replica_of_the_lost_rank_is_its_restore_source(make_cluster, event_log):
    c = make_cluster(2, replicas=2)
    c.form(1, [0, 1])
    commit_step(c, [0, 1], 5)
    c.kill(0)
    a = c.form(2, [1])
    src = c.mgrs[1].prepare_restore(0, a)
    assert (src.source_rank, src.origin, src.step) == (0, "peer:n0", 5)
    assert torch.equal(c.read(1, src), state(0, 5))


def _persist_steps(c, ps, *steps):
    for step in steps:
        commit_step(c, [0, 1], step)
        ps[0].tick(final=True)
        ps[1].tick(final=True)
        assert latest_complete(str(ps[0].directory)).step == step


def test_a_corrupt_shard_on_disk_fails_that_rank_and_sets_the_checkpoint_aside_so_all_restore_the_older_one(
        make_cluster, persisted, tmp_path, event_log):
    """Before, the rank whose shard failed its crc32 got no source (a fresh start for it alone) while the others
    restored the newest step, and the damaged checkpoint stayed to be counted by retention."""
    from resilient.errors import CheckpointCorruptError
    from resilient.persist import open_storage
    from resilient.persist.reader import set_aside_dirs

    c = make_cluster(2, replicas=2)
    a = c.form(1, [0, 1])
    ps = persisted(c)
    _persist_steps(c, ps, 2, 6)
    ckpt = tmp_path / "ckpt"
    shard = ckpt / "step-00000006" / "rank-1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="set aside") as info:
        ps[1].restore(1, a, "test: nothing in memory")
    assert "rank-1.safetensors" in str(info.value) and "crc32" in str(info.value)
    [aside] = set_aside_dirs(open_storage(str(ckpt)))
    assert aside.startswith("step-00000006.corrupt-") and (ckpt / aside / "rank-1.safetensors").exists()
    # the next attempt of every rank restores the same older step
    for k in (0, 1):
        src = ps[k].restore(k, a, "test: nothing in memory")
        assert (src.origin, src.step) == ("durable", 2)
        assert torch.equal(c.read(k, src), state(k, 2))


def test_every_committed_checkpoint_damaged_fails_the_restore_rather_than_start_from_scratch(
        make_cluster, persisted, tmp_path):
    from resilient.errors import CheckpointCorruptError

    c = make_cluster(2, replicas=2)
    a = c.form(1, [0, 1])
    ps = persisted(c)
    _persist_steps(c, ps, 2, 6)
    ckpt = tmp_path / "ckpt"
    for step in (2, 6):
        (ckpt / f"step-{step:08d}" / "manifest.json").write_text("{")
    damaged = r"Every committed checkpoint in .* is damaged, so rank 0 cannot resume from it"
    with pytest.raises(CheckpointCorruptError, match=damaged) as info:
        ps[0].restore(0, a, "test: nothing in memory")
    assert str(ckpt / "step-00000002") in str(info.value) and str(ckpt / "step-00000006") in str(info.value)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002", "step-00000006"]
