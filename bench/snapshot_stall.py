"""How long a snapshot blocks the training thread, next to a plain torch memcpy of the same bytes.

For each state size (100 MB, 1 GB; 4 GB with ``--big``) a module holding that many bytes of float32
parameters is protected in a ``Context`` over a ``LocalRuntime`` (the real segment and store engine:
native when built, else the pure-Python twin). The stall is the wall time of ``ctx.snapshot()``
(capture, copy + checksum into the inactive slot, seal), the median of ``--reps`` runs after two warm-ups
that create the segment and fault in both of its slots. The baseline, measured in the same run, is
``dst.copy_(src)`` over the same tensors into preallocated, touched CPU buffers (median of ``--reps``),
with torch allowed as many threads as the store's copy engine uses. With ``--device cuda`` the
parameters live on the GPU and the baseline is a device-to-host ``copy_`` into pinned buffers.

With ``--device cuda`` and a CUDA-enabled native store the snapshot overlaps the copy with the next step:
``stall_s`` is the wall time of ``ctx.snapshot()`` (capture, clones, queueing the D2H copy and the GPU
CRCs) plus the time the seal blocks once the next "step" is over (``writer.poll()`` after the copy
finished, as ``ctx.steps()`` does at each step boundary); the next step is simulated by waiting, off the
measured time, until the copy is done (``overlap_copy_s``: snapshot start to copy done). ``copy_s`` is the
synchronous snapshot of the same state (``SnapshotWriter(overlap=False)``, today's path: blocks for the
whole copy), ``memcpy_s`` the pinned ``copy_``. On CPU ``copy_s`` equals ``stall_s``. In training the host
runs ahead of the GPU, so the overlapped snapshot is also measured behind ~100 ms of matmuls queued on the
current stream (``stall_behind_queued_s``, ``queued_ms``); the benchmark fails if such a snapshot returns
only after the queued work finished (it waited for the device).

Prints one JSON line per size: ``{"bytes", "stall_s", "copy_s", "memcpy_s", "ratio", ...}`` where
``ratio`` = stall_s / memcpy_s.

    python bench/snapshot_stall.py [--big] [--reps 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from resilient.elastic.context import Context  # noqa: E402
from resilient.elastic.snapshots import SnapshotWriter  # noqa: E402
from resilient.runtime.local import LocalRuntime  # noqa: E402
from resilient.store import backend, is_native  # noqa: E402

TENSOR_BYTES = 32 << 20  # parameters of 32 MiB each, like the big layers of a model
QUEUED_MS = 100.0  # GPU work queued ahead of each snapshot in the "behind queued work" measurement


class Blob(torch.nn.Module):
    def __init__(self, nbytes: int, device: torch.device) -> None:
        super().__init__()
        sizes = [TENSOR_BYTES] * (nbytes // TENSOR_BYTES)
        if nbytes % TENSOR_BYTES:
            sizes.append(nbytes % TENSOR_BYTES)
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter(torch.rand(n // 4, device=device), requires_grad=False) for n in sizes
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class QueuedWork:
    """About ``ms`` of matmuls queued on the current stream, as a training step leaves the GPU behind the host.
    ``queue()`` returns an event recorded after them: still pending when ``snapshot()`` returns means the
    snapshot did not wait for the work queued before it."""

    def __init__(self, device: torch.device, ms: float) -> None:
        self.a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)  # ~1.4 ms per product on an H100
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        self._matmuls(20)
        torch.cuda.synchronize(device)
        per = (time.perf_counter() - began) / 20
        self.count = max(1, round(ms / 1e3 / per))
        self.ms = self.count * per * 1e3

    def _matmuls(self, n: int) -> None:
        for _ in range(n):
            torch.mm(self.a, self.a).clamp_(-1, 1)

    def queue(self) -> torch.cuda.Event:
        self._matmuls(self.count)
        done = torch.cuda.Event()
        done.record()
        return done


def snapshot_stalls(
    model: Blob, reps: int, device: torch.device, overlap: bool, queued: QueuedWork | None = None
) -> tuple[list[float], list[float], bool]:
    """Blocking time of ``reps`` snapshots (after two warm-ups) on a fresh LocalRuntime; with ``overlap``
    also the time from each snapshot's start until its copy finished. Returns (stalls, copies, overlapped).
    With ``queued`` each snapshot starts behind that GPU work, and a snapshot that returns only after the
    work finished raises (it waited for the device)."""
    runtime = LocalRuntime(mode="single")
    writer = SnapshotWriter(runtime, overlap=overlap)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # guarded: its parameters are copied without clones
    ctx = Context(
        runtime=runtime, assignment=runtime.assignment(), device=device, writer=writer, snapshot_every=0, seed=0
    )
    ctx.protect(model=model, optimizer=opt)
    stalls, copies, overlapped = [], [], False
    try:
        for i in range(reps + 2):
            sync(device)
            ahead = queued.queue() if queued is not None else None
            began = time.perf_counter()
            ctx.snapshot()
            stall = time.perf_counter() - began
            if ahead is not None and ahead.query() and i >= 2:
                raise SystemExit(f"snapshot() of {model_bytes(model)} bytes returned only after the "
                                 f"{queued.ms:.0f} ms of GPU work queued before it ({stall * 1e3:.1f} ms)")
            if writer.in_flight:  # the next step runs while the copy does: wait for it off the clock
                overlapped = True
                while not writer.copy_done():
                    time.sleep(0.0002)
                copied = time.perf_counter() - began
                sealed = time.perf_counter()
                writer.poll()
                stall += time.perf_counter() - sealed
            else:
                copied = stall
            if i >= 2:
                stalls.append(stall)
                copies.append(copied)
    finally:
        writer.close()
        runtime.close()
    return stalls, copies, overlapped


def model_bytes(model: Blob) -> int:
    return sum(p.numel() * p.element_size() for p in model.params)


def measure(nbytes: int, reps: int, device: torch.device) -> dict:
    model = Blob(nbytes, device)
    stalls, overlap_copies, overlapped = snapshot_stalls(model, reps, device, overlap=True)
    queued = QueuedWork(device, QUEUED_MS) if overlapped else None
    queued_stalls = snapshot_stalls(model, reps, device, overlap=True, queued=queued)[0] if queued else None
    sync_stalls = snapshot_stalls(model, reps, device, overlap=False)[0] if overlapped else stalls
    srcs = [p.data for p in model.params]
    dsts = [torch.empty(s.shape, dtype=s.dtype, pin_memory=device.type == "cuda") for s in srcs]
    for d in dsts:
        d.fill_(1.0)  # fault the pages in, as the segment was by the warm-up snapshot
    copies = []
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, backend().default_threads()))
    memcpy_threads = torch.get_num_threads()
    for i in range(reps + 1):
        sync(device)
        began = time.perf_counter()
        for d, s in zip(dsts, srcs):
            d.copy_(s)
        sync(device)
        if i:
            copies.append(time.perf_counter() - began)
    torch.set_num_threads(threads)
    stall_s, memcpy_s = statistics.median(stalls), statistics.median(copies)
    copy_s = statistics.median(sync_stalls)
    nb = model_bytes(model)
    behind = {} if queued is None else {
        "stall_behind_queued_s": round(statistics.median(queued_stalls), 6),
        "queued_ms": round(queued.ms, 1),
    }
    return {
        "bytes": nb,
        "stall_s": round(stall_s, 6),
        "copy_s": round(copy_s, 6),
        "memcpy_s": round(memcpy_s, 6),
        "ratio": round(stall_s / memcpy_s, 3),
        "overlapped": overlapped,
        "overlap_copy_s": round(statistics.median(overlap_copies), 6),
        "stall_ms_per_gb": round(stall_s * 1e3 / (nb / 1e9), 3),
        "copy_over_stall": round(copy_s / stall_s, 2),
        **behind,
        "device": str(device),
        "engine": "native" if is_native() else "python",
        "engine_threads": backend().default_threads(),
        "memcpy_threads": memcpy_threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="also measure 4 GB of state")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes-mb", type=str, default=None, help="comma-separated sizes in MB (overrides)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.sizes_mb:
        sizes = [int(float(s) * 1e6) for s in args.sizes_mb.split(",")]
    else:
        sizes = [100_000_000, 1_000_000_000] + ([4_000_000_000] if args.big else [])
    base = os.environ.get("RESILIENT_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    shm_dir = tempfile.mkdtemp(prefix="resilient-bench-stall-", dir=base)
    os.environ["RESILIENT_SHM_DIR"] = shm_dir
    try:
        for nbytes in sizes:
            print(json.dumps(measure(nbytes, args.reps, device)), flush=True)
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
