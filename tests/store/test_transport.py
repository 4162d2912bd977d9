"""Bulk transport between two processes: good token, bad token, truncated stream, corrupted payload."""

from __future__ import annotations

import subprocess

import pytest
import torch

from store_children import spawn_child
from resilient.errors import TransportError
from resilient.store import Segment
from resilient.store.transport import BulkReceiver, send_slot
from resilient.testing.etcd import wait_until

TOKEN = "job-token-123"


@pytest.fixture
def pair(shm_dir, engine):
    src = Segment.create("src", 16 << 20, job="tjob", rank=1, shm_dir=shm_dir, chunk_size=256 << 10)
    dst = Segment.create("dst", 16 << 20, job="tjob", rank=1, shm_dir=shm_dir)
    yield src, dst
    for s in (src, dst):
        s.close()
        s.unlink()


def tensors(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(1_000_000, generator=g), "b": torch.arange(33, dtype=torch.bfloat16) + step,
            "empty": torch.empty(0)}


def run_sender(mode: str, shm_dir: str, address) -> subprocess.CompletedProcess:
    child = spawn_child(mode, "src", shm_dir, address[0], str(address[1]), TOKEN,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def wait_for(cond, timeout=30.0):
    wait_until(cond, timeout, "the receiver to record the transfer")


def resolver(dst):
    return lambda header: dst if (header.job, header.rank) == (dst.job, dst.rank) else None


def test_good_token_delivers_bit_exact(pair, shm_dir):
    src, dst = pair
    src.write(tensors(5), step=5, generation=3, meta=b"meta!")
    src.seal()
    with BulkReceiver("127.0.0.1", 0, TOKEN.encode(), resolver(dst)) as rx:
        res = run_sender("send", shm_dir, rx.address)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: rx.received)
        assert rx.errors == []
    snap = dst.read()
    assert (snap.step, snap.generation, snap.meta) == (5, 3, b"meta!")
    for k, t in tensors(5).items():
        assert torch.equal(snap.tensors[k].view(torch.uint8), t.view(torch.uint8))


def test_bad_token_is_refused_before_data(pair, shm_dir):
    src, dst = pair
    src.write(tensors(1), step=1, generation=0)
    src.seal()
    with BulkReceiver("127.0.0.1", 0, b"another-job-token", resolver(dst)) as rx:
        res = run_sender("send", shm_dir, rx.address)
        assert res.returncode == 3 and "bad token" in res.stderr
        wait_for(lambda: rx.errors)
        assert "bad token" in str(rx.errors[0])
    assert dst.latest() is None


def test_sendfile_path_delivers_bit_exact(pair):
    src, dst = pair
    src.write(tensors(8), step=8, generation=0)
    src.seal()
    with BulkReceiver("127.0.0.1", 0, TOKEN.encode(), resolver(dst)) as rx:
        sent = send_slot(src, src.latest().slot, rx.address, TOKEN.encode(), timeout=10, sendfile=True)
        assert sent > 4_000_000 and rx.errors == []
    assert torch.equal(dst.read().tensors["w"], tensors(8)["w"])


def test_unknown_peer_is_refused(pair):
    src, dst = pair
    src.write(tensors(1), step=1, generation=0)
    src.seal()
    with BulkReceiver("127.0.0.1", 0, TOKEN.encode(), lambda header: None) as rx:
        with pytest.raises(TransportError, match="unknown peer"):
            send_slot(src, src.latest().slot, rx.address, TOKEN.encode(), timeout=10)


def test_truncated_stream_keeps_previous_snapshot(pair, shm_dir):
    src, dst = pair
    dst.write(tensors(1), step=1, generation=0)
    dst.seal()
    src.write(tensors(2), step=2, generation=0)
    src.seal()
    with BulkReceiver("127.0.0.1", 0, TOKEN.encode(), resolver(dst), timeout=10) as rx:
        res = run_sender("truncate", shm_dir, rx.address)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: rx.errors)
        assert "short read" in str(rx.errors[0])
        assert rx.received == []
    snap = dst.read()
    assert snap.step == 1 and torch.equal(snap.tensors["w"], tensors(1)["w"])


def test_corrupted_payload_is_rejected_naming_the_chunk(pair, shm_dir):
    src, dst = pair
    src.write(tensors(3), step=3, generation=0)
    info = src.seal()
    spec = next(t for t in src.slot_index(info.slot).tensors if t.name == "w")
    buf = src.slot_buffer(info.slot)
    buf[spec.offset + (256 << 10) * 3 + 5] ^= 0x10  # chunk 3 of "w"
    del buf
    with BulkReceiver("127.0.0.1", 0, TOKEN.encode(), resolver(dst)) as rx:
        res = run_sender("send", shm_dir, rx.address)
        assert res.returncode == 3
        assert "bad checksum" in res.stderr and "'w' chunk 3" in res.stderr
        wait_for(lambda: rx.errors)
    assert dst.latest() is None


def test_receiver_gone_is_a_transport_error(pair):
    src, _ = pair
    src.write(tensors(1), step=1, generation=0)
    src.seal()
    rx = BulkReceiver("127.0.0.1", 0, TOKEN.encode(), lambda h: None)
    address = rx.address
    rx.close()
    with pytest.raises(TransportError, match="Cannot connect"):
        send_slot(src, src.latest().slot, address, TOKEN.encode(), timeout=5)
