"""CUDA path (skipped without a GPU): D2H/H2D bit-exact, GPU CRC32C == CPU CRC32C, copy/compute overlap."""

from __future__ import annotations

import time

import pytest
import torch

from resilient.store import Segment, _pynative, backend

be = backend()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and be.cuda_available()),
        reason=f"needs a CUDA device and a CUDA-enabled resilient._native ({be.cuda_status()})",
    ),
]

MB = 1 << 20


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8).cpu(), b.reshape(-1).view(torch.uint8).cpu()
    )


def test_d2h_h2d_round_trip_bit_exact(shm_dir):
    dev = torch.device("cuda", 0)
    state = {
        "w": torch.randn(3_000_001, device=dev),
        "h": torch.randn(4097, device=dev).to(torch.bfloat16),
        "i": torch.randint(-(2**40), 2**40, (1000,), device=dev, dtype=torch.int64),
        "cpu": torch.arange(100, dtype=torch.float64),
        "empty": torch.empty(0, device=dev),
    }
    seg = Segment.create("gpu-rt", 64 * MB, job="gpu", rank=0, shm_dir=shm_dir, chunk_size=MB)
    try:
        seg.write(state, step=3, generation=1, meta=b"gpu")
        seg.seal()
        snap = seg.read()  # host verification of chunk CRCs that the GPU computed
        for k, t in state.items():
            assert same_bits(snap.tensors[k], t), k
        targets = {k: torch.empty_like(t) for k, t in state.items()}
        seg.read_into(targets)  # H2D, CRC32C computed on the GPU where the data landed
        for k, t in state.items():
            assert targets[k].device == t.device and same_bits(targets[k], t), k
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.parametrize("n", [1, 3, 255, 4096, MB - 1, MB, MB + 1, 5 * MB + 123])
@pytest.mark.parametrize("chunk", [1000, 4096, MB])
def test_gpu_checksum_equals_cpu_checksum(n, chunk):
    data = torch.randint(0, 256, (n + 3,), dtype=torch.uint8, device="cuda")
    view = data[3:]  # unaligned start
    host = view.cpu()
    stream = torch.cuda.current_stream().cuda_stream
    gpu_crcs = list(be.crc32c_device(view.data_ptr(), n, chunk, stream))
    cpu_crcs = list(be.checksum_batch([host.data_ptr()], [n], chunk))
    assert gpu_crcs == cpu_crcs
    if n <= MB:
        assert gpu_crcs == list(_pynative.checksum_batch([host.data_ptr()], [n], chunk))


def test_d2h_overlaps_a_concurrent_matmul(shm_dir):
    dev = torch.device("cuda", 0)
    n = 512 * MB
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    seg = Segment.create("gpu-overlap", n, job="gpu", rank=0, shm_dir=shm_dir)
    try:
        seg.write({"x": src}, step=0, generation=0)  # registers the mapping once
        seg.seal()
        arena = seg.slot_address(1)
        compute, copy = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        ev = {k: torch.cuda.Event(enable_timing=True) for k in ("base", "mm0", "mm1", "cp0", "cp1")}
        torch.cuda.synchronize(dev)
        ev["base"].record()
        compute.wait_event(ev["base"])
        copy.wait_event(ev["base"])
        with torch.cuda.stream(compute):
            ev["mm0"].record(compute)
            for _ in range(40):
                a = (a @ a).clamp_(-1, 1)
            ev["mm1"].record(compute)
        ev["cp0"].record(copy)
        be.copy_d2h_async(arena, src.data_ptr(), n, copy.cuda_stream, 64 * MB)
        ev["cp1"].record(copy)
        torch.cuda.synchronize(dev)
        t = {k: ev["base"].elapsed_time(e) for k, e in ev.items() if k != "base"}
        overlap = min(t["mm1"], t["cp1"]) - max(t["mm0"], t["cp0"])
        shorter = min(t["mm1"] - t["mm0"], t["cp1"] - t["cp0"])
        assert overlap > 0.5 * shorter, f"copy and matmul did not overlap: {t}"
        host_crcs = list(be.checksum_batch([arena], [n], MB))
        assert host_crcs == list(be.crc32c_device(src.data_ptr(), n, MB, copy.cuda_stream))  # bytes landed intact
    finally:
        seg.close()
        seg.unlink()


def test_events_record_query_and_sync():
    stream = be.stream_create()
    try:
        ev = be.event_create(False)
        x = torch.randn(1 << 20, device="cuda")
        host = torch.empty(1 << 20, pin_memory=True)
        be.copy_d2h_async(host.data_ptr(), x.data_ptr(), x.numel() * 4, stream, 1 << 20)
        be.event_record(ev, stream)
        be.event_synchronize(ev)
        assert be.event_query(ev)
        assert torch.equal(host, x.cpu())
        be.event_destroy(ev)
    finally:
        be.stream_destroy(stream)


def _busy(dev: torch.device, iters: int = 60) -> torch.Tensor:
    """Queue a long run of matmuls on the current stream (tens of ms) and return its result."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(iters):
        a = (a @ a).clamp_(-1, 1)
    return a


def test_write_async_round_trip_bit_exact_and_gpu_crcs_equal_cpu(shm_dir):
    dev = torch.device("cuda", 0)
    state = {
        "w": torch.randn(3_000_001, device=dev),
        "h": torch.randn(4097, device=dev).to(torch.bfloat16),
        "i": torch.randint(-(2**40), 2**40, (1000,), device=dev, dtype=torch.int64),
        "cpu": torch.arange(100, dtype=torch.float64),
        "empty": torch.empty(0, device=dev),
    }
    seg = Segment.create("gpu-async-rt", 64 * MB, job="gpu", rank=0, shm_dir=shm_dir, chunk_size=MB)
    try:
        pending = seg.write_async(state, step=4, generation=1, meta=b"async")
        info = pending.wait()
        assert (info.step, info.generation) == (4, 1) and seg.latest() == info
        snap = seg.read()  # verifies every chunk on the host against the CRCs the GPU computed
        assert snap.meta == b"async"
        for k, t in state.items():
            assert same_bits(snap.tensors[k], t), k
        index = seg.slot_index(info.slot)
        arena = seg.slot_address(info.slot)
        regions = index.regions()
        host = list(be.checksum_batch([arena + off for _, off, _ in regions], [n for _, _, n in regions], MB))
        assert list(index.crcs) == host  # GPU per-chunk CRC32C == the CPU reference over the landed bytes
        seg.write(state, step=5, generation=1, meta=b"async")
        sync = seg.slot_index(seg.seal().slot).crcs
        assert sync == index.crcs  # the same checksums as the synchronous path
    finally:
        seg.close()
        seg.unlink()


def test_write_async_done_false_then_true_and_sees_queued_kernels(shm_dir):
    dev = torch.device("cuda", 0)
    x = torch.zeros(64 * MB // 4, device=dev)
    seg = Segment.create("gpu-async-done", 64 * MB, job="gpu", rank=0, shm_dir=shm_dir)
    try:
        seg.write_async({"x": x}, step=0, generation=0).wait()  # registers the mapping
        torch.cuda.synchronize(dev)
        _busy(dev)
        x.fill_(7.0)  # queued after the matmuls on the current stream: the copy must see it
        pending = seg.write_async({"x": x}, step=1, generation=0)
        assert not pending.done()  # the copy waits for the matmuls queued before it
        assert seg.latest().step == 0  # not published before wait()
        deadline = time.monotonic() + 60
        while not pending.done():
            assert time.monotonic() < deadline, "the asynchronous copy never finished"
            time.sleep(0.001)
        assert pending.done() and not pending.sealed
        info = pending.wait()
        assert info.step == 1 and pending.sealed and pending.done()
        assert torch.equal(seg.read().tensors["x"], torch.full((64 * MB // 4,), 7.0))
    finally:
        seg.close()
        seg.unlink()


def test_second_write_async_waits_for_the_first_and_stream_wait_orders_mutation(shm_dir):
    dev = torch.device("cuda", 0)
    x = torch.full((16 * MB // 4,), 1.0, device=dev)
    seg = Segment.create("gpu-async-two", 16 * MB, job="gpu", rank=0, shm_dir=shm_dir)
    try:
        seg.write_async({"x": x}, step=0, generation=0).wait()
        _busy(dev)
        first = seg.write_async({"x": x}, step=1, generation=0)
        first.stream_wait()  # later kernels of the current stream run after the copy
        x.fill_(2.0)  # must not reach snapshot 1
        second = seg.write_async({"x": x}, step=2, generation=0)
        assert first.sealed  # the second write finished the first before starting
        assert second.wait().step == 2
        assert torch.equal(seg.read(step=1).tensors["x"], torch.full((16 * MB // 4,), 1.0))
        assert torch.equal(seg.read(step=2).tensors["x"], torch.full((16 * MB // 4,), 2.0))
    finally:
        seg.close()
        seg.unlink()
