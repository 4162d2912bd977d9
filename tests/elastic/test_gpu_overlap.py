"""Overlapped CUDA snapshots (skipped without a GPU and a CUDA-enabled native store): ``ctx.snapshot()`` and
the optimizer step after it return while the copy of 1 GB still waits behind kernels queued before it,
the step's update is ordered after the copy on the GPU, and a restore brings back the snapshot bit for bit.
How long the snapshot blocks is measured by ``bench/snapshot_stall.py --device cuda``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
import torch

from resilient import env
from resilient.elastic.context import Context
from resilient.elastic.snapshots import SnapshotWriter
from resilient.store import Segment, backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and Segment.overlap_available()),
        reason=f"needs a CUDA device and a CUDA-enabled resilient._native ({backend().cuda_status()})",
    ),
]

GB = 1 << 30
PARAM_BYTES = 32 << 20


class Blob(torch.nn.Module):
    def __init__(self, nbytes: int, device: torch.device, fill: float | None = None) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter(torch.rand(PARAM_BYTES // 4, device=device) if fill is None
                               else torch.full((PARAM_BYTES // 4,), fill, device=device))
            for _ in range(nbytes // PARAM_BYTES)
        )
        self.register_buffer("count", torch.zeros(1000, device=device))  # unguarded: cloned before the copy


@pytest.fixture
def shm_dir(monkeypatch):
    """This test's segments (about 3 GB) under $RESILIENT_SHM_DIR when set (a large tmpfs), else /dev/shm."""
    base = os.environ.get(env.SHM_DIR) or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = tempfile.mkdtemp(prefix="resilient-test-overlap-", dir=base)
    monkeypatch.setenv(env.SHM_DIR, path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8).cpu(), b.reshape(-1).view(torch.uint8).cpu()
    )


def make_context(runtime, writer, device) -> Context:
    return Context(runtime=runtime, assignment=runtime.assignment(), device=device, writer=writer,
                   snapshot_every=0, seed=0)


def _busy(dev: torch.device, iters: int = 200) -> torch.Tensor:
    """Queue a long run of matmuls on the current stream (hundreds of ms on an H100) and return its result."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(iters):
        a = (a @ a).clamp_(-1, 1)
    return a


def test_overlapped_snapshot_returns_before_its_copy_and_restores_bitwise(local_runtime, shm_dir):
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    model = Blob(GB, dev)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    writer = SnapshotWriter(local_runtime)
    try:
        ctx = make_context(local_runtime, writer, dev)
        ctx.protect(model=model, optimizer=opt)
        for _ in range(2):  # segment created, mapping registered, both slots faulted in
            ctx.snapshot()
            writer.finish()
        # Every kernel the timed part below launches runs once here: a kernel's first launch loads its module
        # (CUDA lazy loading), which waits for all work on the device, the queued copy included.
        opt.step()
        model.count.add_(1.0)
        torch.cuda.synchronize(dev)

        expected = {k: v.clone() for k, v in model.state_dict().items()}
        model.count.fill_(5.0)
        expected["count"] = model.count.clone()
        torch.cuda.synchronize(dev)
        _busy(dev)  # the copy is ordered after these kernels: it cannot finish before they do
        busy_done = torch.cuda.Event()
        busy_done.record()
        ctx.snapshot()
        assert writer.in_flight and not writer.copy_done(), "snapshot() waited for its copy"
        model.count.add_(1.0)  # a buffer changed by the next forward: the snapshot holds its clone
        began = time.perf_counter()
        opt.step()  # the step pre-hook orders the update after the copy on the GPU, without blocking
        step_s = time.perf_counter() - began
        assert not writer.copy_done(), (
            f"the optimizer step waited for the copy on the host (it took {step_s:.3f} s; the matmuls queued "
            f"before the snapshot had {'' if busy_done.query() else 'not '}finished)"
        )
        torch.cuda.synchronize(dev)
        writer.poll()  # the copy has finished: seals it (the step pre-hook found it still running)
        assert not writer.in_flight
        assert writer.segment.latest().step == ctx.completed_steps  # the overlapped snapshot is sealed

        snap = writer.segment.read()
        for k, v in expected.items():
            assert same_bits(snap.tensors[f"model/{k}"], v), k
        assert torch.equal(model.params[0], expected["params.0"] - 1.0)  # the step ran after the copy

        restored = Blob(GB, dev, fill=0.0)
        opt2 = torch.optim.SGD(restored.parameters(), lr=1.0)
        make_context(local_runtime, writer, dev).protect(model=restored, optimizer=opt2)
        for k, v in restored.state_dict().items():
            assert same_bits(v, expected[k]), k
    finally:
        writer.close()
        torch.cuda.empty_cache()
