"""Segment API: round trips, both slots, read_into, errors naming what is wrong, corruption reports."""

from __future__ import annotations

import os

import pytest
import torch

from resilient.errors import ChecksumError, StateError, StoreError, StoreSpaceError
from resilient.store import Segment, list_segments

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]


def sample(dtype: torch.dtype, shape=(33, 17)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


@pytest.fixture
def seg(shm_dir, engine):
    s = Segment.create("unit", 8 << 20, job="job-a", rank=2, shm_dir=shm_dir, chunk_size=64 << 10)
    yield s
    s.close()
    s.unlink()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k  # bit-exact


def test_round_trip_every_dtype_and_empty_tensors(seg):
    tensors = {f"t_{str(d).split('.')[-1]}": sample(d) for d in DTYPES}
    tensors["empty"] = torch.empty(0, 4)
    tensors["scalar"] = torch.tensor(3.5)
    seg.write(tensors, step=11, generation=2, meta=b"\x00opaque\xff")
    info = seg.seal()
    assert info.sealed and info.step == 11 and info.generation == 2
    snap = seg.read()
    assert (snap.step, snap.generation, snap.meta) == (11, 2, b"\x00opaque\xff")
    assert_same(snap.tensors, tensors)


def test_many_small_tensors(seg):
    tensors = {f"p{i}": torch.full((i % 7 + 1,), float(i)) for i in range(3000)}
    seg.write(tensors, step=1, generation=0)
    seg.seal()
    assert_same(seg.read().tensors, tensors)


def test_two_slots_alternate_and_read_by_step(seg):
    assert seg.latest() is None
    with pytest.raises(StoreError, match="no sealed snapshot"):
        seg.read()
    for step in (1, 2, 3):
        seg.write({"w": torch.full((1000,), float(step))}, step=step, generation=0)
        seg.seal()
    assert seg.latest().step == 3
    assert sorted(i.step for i in seg.slots() if i.sealed) == [2, 3]
    assert seg.read(step=2).tensors["w"][0].item() == 2.0
    with pytest.raises(StoreError, match="no sealed snapshot of step 1"):
        seg.read(step=1)


def test_sealed_slot_names_step_and_generation_and_not_a_slot_being_written(seg):
    seg.write({"w": torch.ones(10)}, step=4, generation=2)
    seg.seal()
    slot = seg.latest().slot
    assert seg.sealed_slot(4, 2) == slot
    assert seg.sealed_slot(4, 1) is None  # the same step of another generation
    assert seg.sealed_slot(5, 2) is None
    seg.write({"w": torch.ones(10)}, step=5, generation=2)  # the other slot, not sealed yet
    assert seg.sealed_slot(5, 2) is None and seg.sealed_slot(4, 2) == slot
    seg.seal()
    assert seg.sealed_slot(5, 2) == 1 - slot


def test_unsealed_write_does_not_replace_latest(seg):
    seg.write({"w": torch.ones(10)}, step=1, generation=0)
    seg.seal()
    seg.write({"w": torch.zeros(10)}, step=2, generation=0)
    assert seg.latest().step == 1
    assert seg.read().tensors["w"].sum().item() == 10
    seg.seal()
    assert seg.read().step == 2


def test_seal_without_write_is_refused(seg):
    with pytest.raises(StoreError, match="call write"):
        seg.seal()


def test_open_from_another_mapping_sees_the_same_snapshot(seg, shm_dir):
    seg.write({"w": torch.arange(100)}, step=5, generation=1, meta=b"m")
    seg.seal()
    other = Segment.open("unit", shm_dir=shm_dir)
    try:
        assert (other.job, other.rank, other.capacity) == ("job-a", 2, 8 << 20)
        snap = other.read()
        assert snap.step == 5 and torch.equal(snap.tensors["w"], torch.arange(100))
    finally:
        other.close()


def test_read_into_fills_targets(seg):
    src = {"a": torch.randn(300, 300), "b": torch.arange(5, dtype=torch.bfloat16)}
    seg.write(src, step=4, generation=0, meta=b"xyz")
    seg.seal()
    targets = {"a": torch.empty(300, 300), "b": torch.empty(5, dtype=torch.bfloat16)}
    snap = seg.read_into(targets)
    assert snap.meta == b"xyz" and snap.tensors["a"] is targets["a"]
    assert_same(targets, src)
    with pytest.raises(StateError, match="holds no tensor 'zzz'"):
        seg.read_into({"zzz": torch.empty(1)})
    with pytest.raises(StateError, match="float64"):
        seg.read_into({"a": torch.empty(300, 300, dtype=torch.float64)})


def test_read_into_live_tensors_where_they_fit_fresh_elsewhere(seg):
    src = {"w": torch.randn(64, 32), "b": torch.randn(32), "n": torch.arange(7)}
    seg.write(src, step=5, generation=1)
    seg.seal()
    live_w = torch.zeros(64, 32)
    wrong_shape = torch.zeros(33)
    wrong_dtype = torch.zeros(7, dtype=torch.float32)
    snap = seg.read(into={"w": live_w, "b": wrong_shape, "n": wrong_dtype, "absent": torch.zeros(1)})
    assert snap.tensors["w"] is live_w  # read in place: no allocation, no second copy
    assert snap.tensors["b"] is not wrong_shape and snap.tensors["n"] is not wrong_dtype
    assert torch.equal(wrong_shape, torch.zeros(33)) and torch.equal(wrong_dtype, torch.zeros(7))  # untouched
    assert "absent" not in snap.tensors
    assert_same(snap.tensors, src)


def test_read_into_live_tensor_still_detects_corruption(seg):
    seg.write({"w": torch.randn(100_000)}, step=2, generation=0)
    info = seg.seal()
    seg.slot_buffer(info.slot)[100] ^= 0x01
    with pytest.raises(ChecksumError, match="'w' chunk 0"):
        seg.read(into={"w": torch.empty(100_000)})


def test_non_contiguous_tensor_is_refused_by_name(seg):
    with pytest.raises(StateError, match="'weight.T'.*not contiguous"):
        seg.write({"ok": torch.ones(3), "weight.T": torch.ones(4, 5).t()}, step=1, generation=0)


def test_snapshot_larger_than_a_slot_is_refused(seg):
    with pytest.raises(StoreSpaceError, match=r"needs \d+ bytes.*holds 8388608 bytes per slot"):
        seg.write({"huge": torch.empty(3 << 20)}, step=1, generation=0)


def test_flipped_byte_is_reported_with_tensor_and_chunk(seg):
    seg.write({"first": torch.zeros(1000), "weights": torch.randn(100_000)}, step=9, generation=0)
    info = seg.seal()
    spec = next(t for t in seg.slot_index(info.slot).tensors if t.name == "weights")
    where = spec.offset + 2 * (64 << 10) + 123  # inside chunk 2 of "weights"
    buf = seg.slot_buffer(info.slot)
    buf[where] ^= 0x40
    del buf
    with pytest.raises(ChecksumError, match=r"tensor 'weights' chunk 2 ") as exc:
        seg.read()
    assert (exc.value.tensor, exc.value.chunk) == ("weights", 2)
    with pytest.raises(ChecksumError, match="'weights' chunk 2"):
        seg.read_into({"weights": torch.empty(100_000)})
    assert seg.read(verify=False).step == 9  # unverified reads still work


def test_corrupt_index_is_reported(seg):
    seg.write({"w": torch.ones(10)}, step=1, generation=0)
    info = seg.seal()
    off = seg._header.index_offset(info.slot) + 6
    seg._mm[off] ^= 0x01
    with pytest.raises(ChecksumError, match="tensor index fails its checksum"):
        seg.read()


def test_create_twice_and_open_missing(shm_dir, engine):
    s = Segment.create("dup", 1 << 16, job="j", rank=0, shm_dir=shm_dir)
    try:
        with pytest.raises(StoreError, match="already exists"):
            Segment.create("dup", 1 << 16, job="j", rank=0, shm_dir=shm_dir)
    finally:
        s.close()
        s.unlink()
    with pytest.raises(StoreError, match="No segment 'nope'"):
        Segment.open("nope", shm_dir=shm_dir)
    with pytest.raises(StoreError, match="invalid"):
        Segment.create("a/b", 1 << 16, job="j", rank=0, shm_dir=shm_dir)


def test_files_are_named_and_listed(shm_dir, engine):
    s = Segment.create("job-x-r0", 1 << 16, job="job-x", rank=0, shm_dir=shm_dir)
    try:
        assert os.path.exists(os.path.join(shm_dir, "resilient-job-x-r0"))
        infos = list_segments("job-x", shm_dir=shm_dir)
        assert [(i.name, i.rank, i.owner_pid, i.owner_alive) for i in infos] == [("job-x-r0", 0, os.getpid(), True)]
        assert list_segments("other", shm_dir=shm_dir) == []
    finally:
        s.close()
        s.unlink()


def test_close_refuses_while_a_view_is_held(seg):
    seg.write({"w": torch.ones(10)}, step=1, generation=0)
    info = seg.seal()
    view = seg.slot_buffer(info.slot)
    with pytest.raises(StoreError, match="still referenced"):
        seg.close()
    assert bytes(view[:4]) == torch.ones(1).numpy().tobytes()
    del view
    seg.close()
    assert seg.closed


def test_a_seal_over_the_newest_slot_never_reuses_its_sequence_number(seg):
    """A write keeping the older slot (the committed step) goes over the newest one; its seal must not get
    the number the copy it replaced had, or a check "same seq, same copy" takes the new copy for the old."""
    seg.write({"w": torch.ones(10)}, step=1, generation=0)
    seg.seal()
    seg.write({"w": torch.ones(10) * 2}, step=2, generation=0)
    two = seg.seal()
    before = (seg.slot_seq(two.slot), seg.seal_id(two.slot))
    seg.write({"w": torch.ones(10) * 3}, step=3, generation=0, keep_step=1)
    three = seg.seal()
    assert three.slot == two.slot
    assert seg.slot_seq(three.slot) > before[0]
    assert seg.seal_id(three.slot) != before[1]
    assert seg.seal_id(1 - three.slot)[0] < seg.slot_seq(three.slot)


def test_seal_id_differs_across_writers_that_number_alike(seg, shm_dir):
    """A writer that died mid-write had invalidated the newest slot; its successor (a new handle, which never
    saw that slot's number) seals into it with the very same seq. The seal time still tells the copies
    apart, so a record of the old copy does not match the new one."""
    seg.write({"w": torch.ones(10)}, step=1, generation=0)
    seg.seal()
    seg.write({"w": torch.ones(10)}, step=2, generation=0)
    old = seg.seal()
    old_seq, old_id = seg.slot_seq(old.slot), seg.seal_id(old.slot)
    seg._invalidate(old.slot)  # the write of the next snapshot began there, and its writer died
    assert seg.seal_id(old.slot) is None
    successor = Segment.open(seg.name, shm_dir)
    try:
        successor.write({"w": torch.ones(10)}, step=2, generation=0, keep_step=1)
        new = successor.seal()
        assert new.slot == old.slot
        assert seg.slot_seq(new.slot) == old_seq, "the same number: the successor cannot know better"
        assert seg.seal_id(new.slot) != old_id
    finally:
        successor.close()


def test_copy_slot_from_carries_a_verified_copy_and_refuses_a_corrupt_one(seg, shm_dir):
    tensors = {"a": torch.randn(1000), "b": torch.arange(300, dtype=torch.int64)}
    seg.write(tensors, step=7, generation=3, meta=b"meta")
    info = seg.seal()
    bigger = Segment.create("unit-bigger", 16 << 20, job="job-a", rank=2, shm_dir=shm_dir, chunk_size=64 << 10)
    try:
        copied = bigger.copy_slot_from(seg, info.slot)
        assert (copied.step, copied.generation, copied.sealed) == (7, 3, True)
        back = bigger.read(step=7)
        assert_same(back.tensors, tensors)
        assert back.meta == b"meta"
        buf = seg.slot_buffer(info.slot)
        buf[100] ^= 0x01
        del buf
        with pytest.raises(ChecksumError, match="fails its checksum"):
            bigger.copy_slot_from(seg, info.slot)
        assert bigger.read(step=7).step == 7, "the copy made before stays"
    finally:
        bigger.close()
        bigger.unlink()
