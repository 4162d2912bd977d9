"""Commit decision (pure): every rank needs `required` verified holders; commits only move forward;
pruning keeps the committed step and newer in-flight steps."""

from __future__ import annotations

from resilient.keys import JobKeys
from resilient.replication import commit
from resilient.replication.manifest import CommitRecord, ShardManifest, parse_ckpt_key


def man(rank, step=10, gen=3, ws=3, holders=("a", "b")):
    return ShardManifest(rank=rank, step=step, generation=gen, world_size=ws, nbytes=100, checksum="x",
                         owner=holders[0] if holders else "a", holders=tuple(holders))


def test_commit_when_every_rank_has_required_copies():
    ms = {r: man(r) for r in range(3)}
    d = commit.decide(3, 3, 10, ms, 2, None)
    assert d.action == commit.COMMIT


def test_wait_names_ranks_missing_copies():
    ms = {0: man(0), 1: man(1, holders=("b",))}
    d = commit.decide(3, 3, 10, ms, 2, None)
    assert d.action == commit.WAIT
    assert d.missing == (1, 2)


def test_duplicate_holders_count_once():
    ms = {r: man(r, holders=("a", "a")) for r in range(3)}
    assert commit.decide(3, 3, 10, ms, 2, None).action == commit.WAIT


def test_manifests_of_other_step_or_generation_do_not_count():
    ms = {0: man(0), 1: man(1, gen=2), 2: man(2, step=9)}
    assert commit.decide(3, 3, 10, ms, 2, None).missing == (1, 2)


def test_committed_steps_only_move_forward():
    ms = {r: man(r) for r in range(3)}
    assert commit.decide(3, 3, 10, ms, 2, CommitRecord(10, 3, 3, 2)).action == commit.STALE
    assert commit.decide(3, 3, 10, ms, 2, CommitRecord(12, 2, 3, 2)).action == commit.STALE
    assert commit.decide(3, 3, 10, ms, 2, CommitRecord(8, 3, 3, 2)).action == commit.COMMIT


def test_prunable_keeps_committed_and_newer_in_flight():
    keys = [(2, 5, 0), (2, 8, 0), (3, 8, 0), (3, 10, 0), (3, 10, 1), (3, 12, 0), (4, 14, 0), (2, 12, 0)]
    doomed = commit.prunable(keys, CommitRecord(10, 3, 2, 2))
    assert sorted(doomed) == [(2, 5, 0), (2, 8, 0), (2, 12, 0), (3, 8, 0)]


def test_manifest_round_trip_and_key_parse():
    m = man(1)
    assert ShardManifest.decode(m.encode()) == m
    assert m.with_holder("c").holders == ("a", "b", "c")
    keys = JobKeys("j")
    assert parse_ckpt_key(keys, keys.ckpt(3, 10, 1)) == (3, 10, 1)
    assert parse_ckpt_key(keys, keys.committed) is None


# --- restore planning (pure) ---------------------------------------------------------------------------
from resilient.replication import restore  # noqa: E402


def test_restore_same_world_uses_own_rank_and_rotates_holders():
    rec = CommitRecord(10, 3, 3, 2)
    ms = {r: man(r, holders=("a", "b", "c")) for r in range(3)}
    p0 = restore.plan(0, 3, "z", rec, ms, set(), {"a", "b", "c"})
    p1 = restore.plan(1, 3, "z", rec, ms, set(), {"a", "b", "c"})
    assert p0.source_rank == 0 and p1.source_rank == 1
    assert p0.peers == ("a", "b", "c") and p1.peers == ("b", "c", "a")
    assert not p0.local


def test_restore_skips_dead_holders_and_self():
    rec = CommitRecord(10, 3, 3, 2)
    ms = {r: man(r, holders=("a", "b")) for r in range(3)}
    p = restore.plan(2, 3, "b", rec, ms, {2}, {"b", "c"})
    assert p.local and p.peers == ()


def test_restore_world_change_prefers_local_shard():
    rec = CommitRecord(10, 3, 4, 2)
    ms = {r: man(r, ws=4) for r in range(4)}
    assert restore.plan(5, 6, "z", rec, ms, {2}, {"a"}).source_rank == 2
    assert restore.plan(5, 6, "z", rec, ms, set(), {"a"}).source_rank == 1
    assert restore.plan(1, 2, "z", rec, {}, set(), {"a"}) is None


# --- rate limiting (pure) -------------------------------------------------------------------------------
from resilient.replication.ratelimit import TokenBucket  # noqa: E402


def test_token_bucket_bounds_average_rate():
    b = TokenBucket(100.0, 50.0, now=0.0)
    assert b.reserve(50, 0.0) == 0.0  # the burst goes at once
    assert b.reserve(200, 0.0) == 2.0  # 200 bytes of debt
    assert b.reserve(0, 1.0) == 1.0
    assert b.reserve(0, 2.0) == 0.0
    assert b.reserve(50, 2.0) == 0.5
    assert b.reserve(0, 100.0) == 0.0 and b.tokens == 50.0  # refill is capped at the burst


def test_pacer_sleeps_what_the_bucket_asks_and_shares_it_between_senders():
    from resilient.replication.ratelimit import Pacer

    now, slept = [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pace = Pacer(100.0, 0.0, clock=lambda: now[0], sleep=sleep)
    pace(50)
    pace(50)
    assert slept == [0.5, 0.5] and now[0] == 1.0  # 100 bytes at 100 B/s: one second, whoever sends them


def test_restore_world_change_takes_the_same_ranks_shard_when_held_here():
    rec = CommitRecord(10, 3, 2, 2)
    ms = {r: man(r, ws=2) for r in range(2)}
    # a survivor that holds its own rank 1 and a replica of the lost rank 0 becomes rank 0 of a world of 1
    assert restore.plan(0, 1, "z", rec, ms, {0, 1}, {"z"}).source_rank == 0
    assert restore.source_order(0, 1, rec, {0, 1}, {0, 1}) == [0, 1]
    assert restore.source_order(1, 2, CommitRecord(10, 3, 2, 2), {1}, {0, 1}) == [1]


def test_unrecoverable_names_shards_without_a_live_holder():
    rec = CommitRecord(10, 3, 3, 2)
    ms = {0: man(0, holders=("a", "b")), 1: man(1, holders=("b", "c")), 2: man(2, holders=("c", "a"))}
    assert restore.unrecoverable(rec, ms, set(), {"a", "b", "c"}, 3) == []
    assert restore.unrecoverable(rec, ms, set(), {"a"}, 3) == [1]
    assert restore.unrecoverable(rec, ms, {1}, {"a"}, 3) == []
    assert restore.unrecoverable(rec, ms, set(), {"a"}, 2) == []  # world change: any one shard serves
    assert restore.unrecoverable(rec, ms, set(), {"d"}, 2) == [0, 1, 2]
