"""Bulk transport, stripes and pacing: a slot assembled from disjoint byte ranges sent by several
senders (every chunk verified: inside a stripe as it arrives, across stripe boundaries once all are in),
and a paced send of N bytes at R B/s taking at least N / R."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from resilient.errors import TransportError
from resilient.replication.ratelimit import Pacer, TokenBucket
from resilient.replication.restore import stripes
from resilient.store import Segment
from resilient.store.transport import BulkReceiver, send_slot
from resilient.testing.etcd import wait_until

TOKEN = b"job-token-stripes"
CHUNK = 64 << 10


def tensors(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(300_000, generator=g), "b": torch.arange(33, dtype=torch.bfloat16) + step,
            "empty": torch.empty(0), "v": torch.randn(77_777, generator=g, dtype=torch.float64)}


@pytest.fixture
def holders(shm_dir, engine):
    """Three holders of the same sealed slot and one destination segment."""
    segs = []
    for i in range(3):
        s = Segment.create(f"h{i}", 8 << 20, job="sjob", rank=2, shm_dir=shm_dir, chunk_size=CHUNK)
        s.write(tensors(7), step=7, generation=4, meta=b"meta-7")
        s.seal()
        segs.append(s)
    dst = Segment.create("dst", 8 << 20, job="sjob", rank=2, shm_dir=shm_dir, chunk_size=CHUNK)
    yield segs, dst
    for s in (*segs, dst):
        s.close()
        s.unlink()


def wait_for(cond, timeout=30.0):
    wait_until(cond, timeout, "the receiver to record the transfer")


def resolver(dst):
    return lambda header: dst if (header.job, header.rank) == (dst.job, dst.rank) else None


def send_all(pairs, address) -> list[BaseException | int]:
    """Send each (segment, byte range) from its own thread at once; returns bytes sent or the error."""
    out: list[BaseException | int] = [0] * len(pairs)

    def go(i, seg, rng):
        try:
            out[i] = send_slot(seg, seg.latest().slot, address, TOKEN, timeout=20, byte_range=rng)
        except TransportError as exc:
            out[i] = exc

    threads = [threading.Thread(target=go, args=(i, s, r)) for i, (s, r) in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def assert_delivered(dst) -> None:
    snap = dst.read(step=7)
    assert (snap.step, snap.generation, snap.meta) == (7, 4, b"meta-7")
    for k, t in tensors(7).items():
        assert torch.equal(snap.tensors[k].view(torch.uint8), t.view(torch.uint8))


def test_three_holders_send_disjoint_stripes_assembled_bit_exact(holders):
    segs, dst = holders
    nbytes = segs[0].latest().nbytes
    ranges = stripes(nbytes, 3)
    assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == nbytes
    with BulkReceiver("127.0.0.1", 0, TOKEN, resolver(dst)) as rx:
        sent = send_all(list(zip(segs, ranges)), rx.address)
        wait_for(lambda: rx.received)
        assert rx.errors == []
    assert len(rx.received) == 1, "sealed once, by the stripe that completed it"
    blob = len(segs[0]._index_blob(segs[0].latest().slot))
    assert sent == [hi - lo + blob for lo, hi in ranges]
    assert_delivered(dst)


def test_odd_stripe_boundaries_verify_the_straddling_chunks(holders):
    segs, dst = holders
    nbytes = segs[0].latest().nbytes
    cuts = [(0, 12_345), (12_345, nbytes // 2 + 7), (nbytes // 2 + 7, nbytes)]
    with BulkReceiver("127.0.0.1", 0, TOKEN, resolver(dst)) as rx:
        assert all(isinstance(n, int) for n in send_all(list(zip(segs, cuts)), rx.address))
    assert_delivered(dst)


def test_a_corrupt_stripe_is_refused_and_fetched_again_from_another_holder(holders):
    segs, dst = holders
    nbytes = segs[0].latest().nbytes
    ranges = stripes(nbytes, 2)
    bad = segs[1]
    buf = bad.slot_buffer(bad.latest().slot)
    buf[ranges[1][0] + 3 * CHUNK + 5] ^= 0xFF  # inside the second stripe, far from its edges
    buf.release()
    with BulkReceiver("127.0.0.1", 0, TOKEN, resolver(dst)) as rx:
        first = send_all([(segs[0], ranges[0]), (bad, ranges[1])], rx.address)
        assert isinstance(first[1], TransportError) and "bad checksum" in str(first[1])
        assert dst.latest() is None or dst.latest().step != 7, "nothing sealed from a corrupt stripe"
        again = send_all([(segs[2], ranges[1])], rx.address)
        assert isinstance(again[0], int)
    assert_delivered(dst)


def test_corruption_in_a_chunk_straddling_two_stripes_is_caught(holders):
    segs, dst = holders
    nbytes = segs[0].latest().nbytes
    cut = 5 * CHUNK + 1000  # the chunk [5*CHUNK, 6*CHUNK) of tensor "w" (offset 0) straddles the cut
    bad = segs[1]
    buf = bad.slot_buffer(bad.latest().slot)
    buf[cut + 10] ^= 0x01
    buf.release()
    with BulkReceiver("127.0.0.1", 0, TOKEN, resolver(dst)) as rx:
        out = send_all([(segs[0], (0, cut))], rx.address)
        out += send_all([(bad, (cut, nbytes))], rx.address)
        assert isinstance(out[0], int)
        assert isinstance(out[1], TransportError) and "stripes" in str(out[1])
    latest = dst.latest()
    assert latest is None or latest.step != 7


def test_a_paced_send_takes_at_least_n_over_r(holders):
    segs, dst = holders
    src = segs[0]
    nbytes = src.latest().nbytes
    rate = 8 << 20  # 8 MiB/s: the ~1.5 MB slot takes >= ~0.18 s
    pacer = Pacer(rate, 0)  # what the shard manager passes
    calls = []

    def pace(n: int) -> None:
        calls.append(n)
        pacer(n)

    with BulkReceiver("127.0.0.1", 0, TOKEN, resolver(dst)) as rx:
        began = time.monotonic()
        send_slot(src, src.latest().slot, rx.address, TOKEN, timeout=20, pace=pace, pace_bytes=256 << 10)
        elapsed = time.monotonic() - began
    assert sum(calls) == nbytes and len(calls) == -(-nbytes // (256 << 10)), "paced piece by piece"
    assert elapsed >= 0.95 * nbytes / rate, (elapsed, nbytes / rate)
    assert_delivered(dst)


def test_token_bucket_reservations_never_exceed_the_rate():
    b = TokenBucket(100.0, 0.0, now=0.0)
    assert b.reserve(50, 0.0) == 0.5
    assert b.reserve(50, 0.0) == 1.0  # queued behind the first reservation
    assert b.reserve(100, 1.0) == 1.0  # at t=1 the first 100 bytes are paid for: these go at t=2
    b2 = TokenBucket(100.0, 30.0, now=0.0)
    assert b2.reserve(30, 0.0) == 0.0  # the burst goes at once
    assert b2.reserve(10, 0.0) == pytest.approx(0.1)
