"""A snapshot copy that stops part-way (``StopWhen``): when the int64 it watches rises above its value the
copy ends before its next chunk, the write raises ``WriteStoppedError`` and the sealed snapshots stay.
Both engines (the native copy engine and the pure-Python twin); the C++ test checks a stop mid-run."""

from __future__ import annotations

import ctypes

import pytest
import torch

from resilient.errors import StoreError, WriteStoppedError
from resilient.store import Segment, StopWhen

CHUNK = 64 << 10


@pytest.fixture
def seg(shm_dir, engine):
    s = Segment.create("stoppable", 8 << 20, job="job-s", rank=0, shm_dir=shm_dir, chunk_size=CHUNK)
    yield s
    s.close()
    s.unlink()


def _buffers(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A source of ``n`` known bytes and a zeroed destination of the same size."""
    src = torch.arange(n, dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    return src, dst


def test_a_word_not_above_its_value_lets_the_copy_run_to_the_end(engine):
    src, dst = _buffers(10 * CHUNK + 17)
    word = ctypes.c_int64(3)
    plain = engine.copy_checksum_batch([dst.data_ptr()], [src.data_ptr()], [src.numel()], CHUNK)
    dst.zero_()
    got = engine.copy_checksum_batch([dst.data_ptr()], [src.data_ptr()], [src.numel()], CHUNK,
                                     stop_word=ctypes.addressof(word), stop_above=3)
    assert got == plain and len(got) == 11
    assert torch.equal(dst, src)


def test_a_word_above_its_value_stops_the_copy_before_any_chunk(engine):
    src, dst = _buffers(10 * CHUNK)
    word = ctypes.c_int64(4)
    got = engine.copy_checksum_batch([dst.data_ptr()], [src.data_ptr()], [src.numel()], CHUNK,
                                     stop_word=ctypes.addressof(word), stop_above=3)
    assert got is None
    assert int(dst.count_nonzero()) == 0


def test_a_word_raised_part_way_stops_the_copy_before_the_next_chunk(engine):
    # on one thread the chunks are copied in order, and the first region's copy is what raises the word
    src, dst = _buffers(10 * CHUNK)
    word, raised = ctypes.c_int64(0), ctypes.c_int64(9)
    got = engine.copy_checksum_batch([ctypes.addressof(word), dst.data_ptr()],
                                     [ctypes.addressof(raised), src.data_ptr()], [8, src.numel()], CHUNK,
                                     threads=1, stop_word=ctypes.addressof(word), stop_above=0)
    assert got is None
    assert word.value == 9  # the first region was copied
    assert int(dst.count_nonzero()) == 0  # and not one chunk after it


def test_a_misaligned_stop_word_is_refused(engine):
    src, dst = _buffers(CHUNK)
    words = (ctypes.c_int64 * 2)()
    with pytest.raises(ValueError, match="8-byte aligned"):
        engine.copy_checksum_batch([dst.data_ptr()], [src.data_ptr()], [src.numel()], CHUNK,
                                   stop_word=ctypes.addressof(words) + 4, stop_above=0)


def test_a_stopped_write_raises_and_leaves_the_sealed_snapshot_the_latest(seg):
    seg.write({"w": torch.full((300_000,), 1.0)}, step=1, generation=2)
    seg.seal()
    word = ctypes.c_int64(2)  # a member of generation 2 failed
    with pytest.raises(WriteStoppedError, match="stopped part-way"):
        seg.write({"w": torch.full((300_000,), 7.0)}, step=2, generation=2,
                  stop=StopWhen(ctypes.addressof(word), 1))
    with pytest.raises(StoreError, match="call write"):
        seg.seal()  # nothing to seal
    assert seg.latest().step == 1
    assert [i.step for i in seg.slots() if i.sealed] == [1]
    assert torch.equal(seg.read().tensors["w"], torch.full((300_000,), 1.0))
    # the next write (of the next generation) goes on as usual
    seg.write({"w": torch.full((300_000,), 3.0)}, step=1, generation=3, stop=StopWhen(ctypes.addressof(word), 2))
    seg.seal()
    snap = seg.read()
    assert (snap.step, snap.generation) == (1, 3)
    assert torch.equal(snap.tensors["w"], torch.full((300_000,), 3.0))
