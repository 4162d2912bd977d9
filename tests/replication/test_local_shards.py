"""``LocalShards`` on real segments: a segment regrown for a larger shard keeps its committed copy, and
the slot a received transfer goes over is the one ``make_room`` frees."""

from __future__ import annotations

import os

import pytest
import torch

from resilient.replication.local import GROW_SUFFIX, LocalShards, receive_target
from resilient.store import Segment


def _seal(seg: Segment, step: int, n: int = 1000, keep: int | None = None) -> None:
    seg.write({"w": torch.full((n,), float(step))}, step=step, generation=1, meta=f"step={step}".encode(), keep_step=keep)
    seg.seal()


@pytest.fixture
def shards(shm_root):
    s = LocalShards("job", "n0", shm_root)
    yield s
    s.close(unlink=True)


def test_a_regrown_segment_keeps_the_committed_copy_under_the_same_name(shards, shm_root):
    dropped = []
    shards.on_drop = dropped.append
    seg = shards.ensure(0, own=False, nbytes=8192)
    _seal(seg, 9)
    _seal(seg, 10)
    # the next step's meta is a byte longer: well inside the headroom, the same segment
    assert shards.ensure(0, own=False, nbytes=seg.slots()[0].nbytes + 1, keep=(9, 1)) is seg
    grown = shards.ensure(0, own=False, nbytes=seg.capacity * 4, keep=(9, 1))
    assert grown is not seg and grown.name == seg.name and grown.capacity >= seg.capacity * 4
    assert {i.step for i in grown.slots() if i.sealed} == {9}, "the committed copy, not the newer one"
    assert torch.equal(grown.read(step=9).tensors["w"], torch.full((1000,), 9.0))
    assert dropped == [seg.name]
    assert not [f for f in os.listdir(shm_root) if f.endswith(GROW_SUFFIX)]
    assert shards.find(0, 9, 1), "found by the agent under its usual name"


def test_a_regrown_segment_without_a_committed_copy_starts_empty(shards):
    seg = shards.ensure(0, own=True, nbytes=8192)
    _seal(seg, 1)
    grown = shards.ensure(0, own=True, nbytes=1 << 20, keep=None)
    assert not any(i.sealed for i in grown.slots())


def test_an_unfinished_growth_is_removed_when_a_restarted_agent_adopts_the_segments(shm_root):
    first = LocalShards("job", "n0", shm_root)
    seg = first.ensure(0, own=False, nbytes=8192)
    _seal(seg, 4)
    leftover = Segment.create(seg.name + GROW_SUFFIX, 1 << 20, job="job", rank=0, shm_dir=shm_root)
    leftover.close()
    first.close(unlink=False)
    second = LocalShards("job", "n0", shm_root)
    try:
        assert second.adopt() == [seg.name]
        assert not [f for f in os.listdir(shm_root) if f.endswith(GROW_SUFFIX)]
        assert second.find(0, 4, 1)
    finally:
        second.close(unlink=True)


def test_receive_target_is_the_slot_make_room_frees(shards):
    seg = shards.ensure(1, own=False, nbytes=8192)
    assert receive_target(seg, None) == seg.target_slot()
    _seal(seg, 1)
    _seal(seg, 2)
    newest = seg.latest().slot
    assert receive_target(seg, None) == 1 - newest
    assert receive_target(seg, (1, 1)) == newest, "1 is committed: the newest, uncommitted 2 is replaced"
    shards.make_room(seg, (1, 1))
    assert not seg.slots()[newest].sealed and seg.target_slot() == newest
    assert receive_target(seg, (2, 1)) == seg.target_slot()
