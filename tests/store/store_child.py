"""Child process for the store tests (run as a script): writers to kill, owners that exit, senders."""

from __future__ import annotations

import os
import sys

import torch

from resilient.errors import TransportError
from resilient.store import Segment
from resilient.store.transport import SlotHeader, offer, send_slot

BIG = 4 << 20  # float32 elements per step in the crash test (16 MiB)


def pattern(step: int) -> dict[str, torch.Tensor]:
    """What a crash-test writer stores at ``step`` (the parent recomputes it to compare bit for bit)."""
    return {
        "big": torch.full((BIG,), float(step), dtype=torch.float32),
        "ramp": torch.arange(4097, dtype=torch.int64) + step,
        "half": torch.full((3, 5), float(step), dtype=torch.bfloat16),
    }


def writer_loop(seg: Segment) -> None:
    step = seg.latest().step + 1
    while True:
        seg.write(pattern(step), step=step, generation=7, meta=f"step={step}".encode())
        seg.seal()
        step += 1


def zygote(name: str, shm_dir: str) -> None:
    """Fork a writer on each 'go', reap it on 'wait' (torch is imported once)."""
    pid = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go":
            pid = os.fork()
            if pid == 0:
                seg = Segment.open(name, shm_dir=shm_dir)
                try:
                    writer_loop(seg)
                finally:
                    os._exit(1)
            print(f"pid {pid}", flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(pid, 0)
            print(f"reaped {status}", flush=True)
        elif cmd == "quit":
            return


def main() -> int:
    cmd, *args = sys.argv[1:]
    if cmd == "zygote":
        zygote(*args)
    elif cmd == "create-and-exit":
        name, shm_dir = args
        seg = Segment.create(name, 1 << 20, job="dead-job", rank=3, shm_dir=shm_dir)
        seg.close()
        print("created", flush=True)
    elif cmd in ("send", "truncate"):
        name, shm_dir, host, port, token = args
        seg = Segment.open(name, shm_dir=shm_dir)
        slot = seg.latest().slot
        try:
            if cmd == "send":
                sent = send_slot(seg, slot, (host, int(port)), token.encode(), timeout=10)
                print(f"sent {sent}", flush=True)
            else:
                info = seg.slots()[slot]
                blob = seg._index_blob(slot)
                header = SlotHeader(seg.job, seg.rank, seg.name, info.step, info.generation, info.nbytes,
                                    len(blob), "truncating-child")
                sock = offer((host, int(port)), token.encode(), header, timeout=10)
                sock.sendall(blob)
                sock.sendall(bytes(seg.slot_buffer(slot)[: info.nbytes // 2]))
                print("truncated", flush=True)
                os._exit(0)  # vanish mid-transfer
        except TransportError as exc:
            print(f"TransportError: {exc}", file=sys.stderr, flush=True)
            return 3
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
