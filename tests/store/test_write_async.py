"""Segment.write_async without CUDA tensors: a completed PendingWrite, sealed, same bytes as write+seal."""

from __future__ import annotations

import torch

from resilient.store import PendingWrite, Segment

MB = 1 << 20


def test_cpu_write_async_is_complete_and_sealed(shm_dir, engine):
    state = {"w": torch.randn(100_003), "i": torch.arange(77, dtype=torch.int64), "empty": torch.empty(0)}
    seg = Segment.create("wa-cpu", 4 * MB, job="j", rank=0, shm_dir=shm_dir, chunk_size=4096)
    try:
        pending = seg.write_async(state, step=5, generation=2, meta=b"meta")
        assert isinstance(pending, PendingWrite)
        assert pending.done() and pending.sealed
        info = pending.wait()
        assert info == seg.latest() and (info.step, info.generation, info.sealed) == (5, 2, True)
        assert pending.wait() == info  # idempotent
        assert seg.wait_pending() is None  # nothing left in flight
        snap = seg.read()
        assert snap.meta == b"meta" and snap.step == 5
        for k, t in state.items():
            assert torch.equal(snap.tensors[k], t), k
    finally:
        seg.close()
        seg.unlink()


def test_write_async_alternates_slots_like_write_and_seal(shm_dir, engine):
    seg = Segment.create("wa-alt", MB, job="j", rank=0, shm_dir=shm_dir)
    try:
        first = seg.write_async({"x": torch.full((1000,), 1.0)}, step=1, generation=0).wait()
        second = seg.write_async({"x": torch.full((1000,), 2.0)}, step=2, generation=0).wait()
        assert first.slot != second.slot
        assert seg.latest().step == 2
        assert torch.equal(seg.read(step=1).tensors["x"], torch.full((1000,), 1.0))
        seg.write({"x": torch.full((1000,), 3.0)}, step=3, generation=0)  # the synchronous path is unchanged
        assert seg.seal().slot == first.slot
        assert torch.equal(seg.read().tensors["x"], torch.full((1000,), 3.0))
    finally:
        seg.close()
        seg.unlink()


def test_write_async_checksums_match_write(shm_dir, engine):
    state = {"a": torch.randint(0, 1 << 30, (300_000,), dtype=torch.int32)}
    seg = Segment.create("wa-crc", 4 * MB, job="j", rank=0, shm_dir=shm_dir, chunk_size=64 << 10)
    try:
        seg.write(state, step=1, generation=0, meta=b"m")
        sync = seg.slot_index(seg.seal().slot).crcs
        overlapped = seg.slot_index(seg.write_async(state, step=2, generation=0, meta=b"m").wait().slot).crcs
        assert sync == overlapped
    finally:
        seg.close()
        seg.unlink()
