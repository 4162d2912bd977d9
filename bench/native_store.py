"""Benchmark of the native shard store, each figure beside its ceiling measured in the same run.

    python bench/native_store.py            # 64 MB .. 1 GB
    python bench/native_store.py --big      # .. 4 GB
    python bench/native_store.py --gpu      # + D2H into the registered arena vs pinned cudaMemcpy

One JSON line per measurement: {"op", "bytes", "gbps", "ceiling_gbps", "ratio"}, where
  write    = Segment.write + seal (copy + CRC32C per chunk)       vs torch dst.copy_(src), same bytes
  read     = Segment.read_into(verify=True) into existing tensors vs torch dst.copy_(src)
  transfer = send_slot -> BulkReceiver between two processes over loopback (large writes, receive straight
             into the peer segment, verify) vs a plain C++ send()/recv() blast of the same bytes
  d2h      = CUDA tensor -> registered segment (native, side stream) vs torch copy into pinned memory
  gpu_write= Segment.write + seal of a CUDA tensor (D2H + GPU CRC; the caller's stall) vs the same ceiling
GB/s are 1e9 bytes per second; each figure is the median of several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from resilient.store import Segment, backend, is_native  # noqa: E402
from resilient.store.transport import BulkReceiver, send_slot  # noqa: E402

MB = 1 << 20
TOKEN = b"bench-token"


def emit(op: str, nbytes: int, seconds: float, ceiling_seconds: float, **extra) -> None:
    extra.setdefault("threads", backend().default_threads())
    gbps = nbytes / seconds / 1e9
    ceiling = nbytes / ceiling_seconds / 1e9
    print(json.dumps({"op": op, "bytes": nbytes, "gbps": round(gbps, 3), "ceiling_gbps": round(ceiling, 3),
                      "ratio": round(gbps / ceiling, 3), **extra}), flush=True)


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def runs_for(nbytes: int) -> int:
    return 7 if nbytes <= 256 * MB else 3


# --- write / read ---------------------------------------------------------------------------------
def bench_host(sizes: list[int], shm_dir: str) -> None:
    for n in sizes:
        src = torch.randint(0, 256, (n,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch
        seg = Segment.create(f"bench-{n}", n, job="bench", rank=0, shm_dir=shm_dir)
        try:
            state = {"x": src}
            for step in range(2):  # touch both slots
                seg.write(state, step=step, generation=0)
                seg.seal()
            runs = runs_for(n)
            memcpy = median_time(lambda: dst.copy_(src), runs)
            counter = iter(range(2, 10_000))

            def write():
                seg.write(state, step=next(counter), generation=0)
                seg.seal()

            emit("write", n, median_time(write, runs), memcpy, engine=backend().__name__)
            target = {"x": dst}
            memcpy = median_time(lambda: dst.copy_(src), runs)
            emit("read", n, median_time(lambda: seg.read_into(target, verify=True), runs), memcpy,
                 engine=backend().__name__)
        finally:
            seg.close()
            seg.unlink()
        del src, dst


# --- transfer ---------------------------------------------------------------------------------------
def sender_main(args) -> None:
    """Child process: for each size, a raw blast then a slot transfer, alternating, timed here."""
    be = backend()
    host, port, blast_port = args.host, args.port, args.blast_port
    for n in args.sizes:
        seg = Segment.open(f"bench-src-{n}", shm_dir=args.shm_dir)
        buf = torch.randint(0, 256, (n,), dtype=torch.uint8)
        slot = seg.latest().slot
        blast, transfer = [], []
        send_slot(seg, slot, (host, port), TOKEN, timeout=30.0)  # warm-up: both receiving slots
        send_slot(seg, slot, (host, port), TOKEN, timeout=30.0)
        for _ in range(runs_for(n)):
            with socket.create_connection((host, blast_port)) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t0 = time.perf_counter()
                s.sendall(struct.pack("<Q", n))
                be.blast_send(s.fileno(), buf.data_ptr(), n, 30.0)
                assert s.recv(1) == b"k"
                blast.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            send_slot(seg, slot, (host, port), TOKEN, timeout=30.0)
            transfer.append(time.perf_counter() - t0)
        seg.close()
        print(json.dumps({"n": n, "transfer": statistics.median(transfer), "blast": statistics.median(blast)}), flush=True)


def blast_server(listener: socket.socket, stop: threading.Event) -> None:
    be = backend()
    bufs: dict[int, torch.Tensor] = {}
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(30)
            (n,) = struct.unpack("<Q", conn.recv(8, socket.MSG_WAITALL))
            buf = bufs.get(n)
            if buf is None:
                buf = bufs[n] = torch.zeros(n, dtype=torch.uint8)
            got = be.blast_recv(conn.fileno(), buf.data_ptr(), n, 30.0)
            if got != n:
                raise RuntimeError(f"blast received {got} of {n} bytes")
            conn.sendall(b"k")


def bench_transfer(sizes: list[int], shm_dir: str) -> None:
    srcs, dsts = {}, {}
    for n in sizes:
        src = Segment.create(f"bench-src-{n}", n, job="bench", rank=0, shm_dir=shm_dir)
        src.write({"x": torch.randint(0, 256, (n,), dtype=torch.uint8)}, step=1, generation=0)
        src.seal()
        srcs[n] = src
        dsts[n] = Segment.create(f"bench-dst-{n}", n, job="bench", rank=n, shm_dir=shm_dir)
    def resolve(header):  # the smallest destination the slot fits in
        return next((dsts[n] for n in sorted(dsts) if header.nbytes <= n), None)

    rx = BulkReceiver("127.0.0.1", 0, TOKEN, resolve)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    server = threading.Thread(target=blast_server, args=(listener, stop), daemon=True)
    server.start()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--_send", "--shm-dir", shm_dir, "--host", "127.0.0.1",
           "--port", str(rx.address[1]), "--blast-port", str(listener.getsockname()[1]),
           "--sizes", *[str(n) for n in sizes]]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"sender failed: {proc.stderr}")
        if rx.errors:
            raise RuntimeError(f"receiver errors: {rx.errors}")
        for line in proc.stdout.splitlines():
            r = json.loads(line)
            emit("transfer", r["n"], r["transfer"], r["blast"], engine=backend().__name__)
    finally:
        stop.set()
        server.join()
        listener.close()
        rx.close()
        for seg in list(srcs.values()) + list(dsts.values()):
            seg.close()
            seg.unlink()


# --- GPU ------------------------------------------------------------------------------------------
def bench_gpu(sizes: list[int], shm_dir: str) -> None:
    be = backend()
    if not (torch.cuda.is_available() and be.cuda_available()):
        print(json.dumps({"op": "gpu", "skipped": f"CUDA unavailable (torch: {torch.cuda.is_available()}, native: {be.cuda_status()})"}), flush=True)
        return
    dev = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(dev)
    for n in sizes:
        gpu = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        plain = torch.empty(n, dtype=torch.uint8)
        plain.fill_(1)
        seg = Segment.create(f"bench-gpu-{n}", n, job="bench", rank=0, shm_dir=shm_dir)
        try:
            seg.write({"x": gpu}, step=0, generation=0)  # registers the mapping (once), touches slot 0
            seg.seal()
            seg.write({"x": gpu}, step=1, generation=0)
            seg.seal()
            stream = torch.cuda.Stream(dev)
            arena = seg.slot_address(0)

            def timed(fn) -> float:
                times = []
                for _ in range(5):
                    torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize(dev)
                    times.append(time.perf_counter() - t0)
                return statistics.median(times)

            def pinned_copy():
                with torch.cuda.stream(stream):
                    pinned.copy_(gpu, non_blocking=True)
                stream.synchronize()

            def arena_copy():
                be.copy_d2h_async(arena, gpu.data_ptr(), n, stream.cuda_stream, 64 * MB)
                be.stream_synchronize(stream.cuda_stream)

            def plain_copy():
                plain.copy_(gpu)

            ceiling = timed(pinned_copy)
            emit("d2h", n, timed(arena_copy), ceiling, device=name, target="registered segment")
            emit("d2h_plain", n, timed(plain_copy), ceiling, device=name, target="pageable memory")
            counter = iter(range(2, 10_000))

            def gpu_write():
                seg.write({"x": gpu}, step=next(counter), generation=0)
                seg.seal()

            emit("gpu_write", n, timed(gpu_write), ceiling, device=name, note="write+seal incl. GPU CRC32C")
            crc_t = timed(lambda: be.crc32c_device(gpu.data_ptr(), n, 1 << 20, stream.cuda_stream))
            print(json.dumps({"op": "crc32c_device", "bytes": n, "gbps": round(n / crc_t / 1e9, 3), "device": name}), flush=True)
        finally:
            seg.close()
            seg.unlink()
            del gpu, pinned, plain
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big", action="store_true", help="go up to 4 GB")
    p.add_argument("--gpu", action="store_true", help="also measure the CUDA path")
    p.add_argument("--skip-host", action="store_true", help="skip write/read/transfer")
    p.add_argument("--sizes", type=int, nargs="*", help="explicit sizes in bytes")
    p.add_argument("--shm-dir", default=None)
    p.add_argument("--_send", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--blast-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._send:
        sender_main(args)
        return
    sizes = sorted(set(args.sizes)) if args.sizes else [64 * MB, 256 * MB, 1024 * MB] + ([4096 * MB] if args.big else [])
    if not is_native():
        print(json.dumps({"warning": "resilient._native is not in use; measuring the pure-Python twin"}), flush=True)
    shm_dir = tempfile.mkdtemp(prefix="resilient-bench-", dir=args.shm_dir or "/dev/shm")
    try:
        if not args.skip_host:
            bench_host(sizes, shm_dir)
            bench_transfer([n for n in sizes if n <= 1024 * MB], shm_dir)
        if args.gpu:
            bench_gpu(sizes, shm_dir)
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
