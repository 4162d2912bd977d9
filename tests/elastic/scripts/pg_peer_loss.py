"""One worker of the peer-loss test: gloo over an agent-style TCPStore (client + per-generation prefix).

    python pg_peer_loss.py <store_port> <rank>

Generation 0 has world size 2. Rank 1 SIGKILLs itself in its fourth all-reduce. Rank 0 must see a
collective failure (not hang until a timeout), tear the group down, form generation 1 alone (world size 1)
over the same store connection, and all-reduce there. It prints ``RECOVERED detect_s=<seconds>``.
"""

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from resilient.elastic import distributed
from resilient.runtime.api import WorkerAssignment

port, rank = int(sys.argv[1]), int(sys.argv[2])


def assignment(generation: int, rank: int, world_size: int) -> WorkerAssignment:
    return WorkerAssignment(generation, rank, rank, world_size, world_size, 0, "127.0.0.1", port, generation, "t", "n")


cpu = torch.device("cpu")
timeout = timedelta(seconds=60)
distributed.init(assignment(0, rank, 2), rendezvous="agent", backend="gloo", device=cpu, timeout=timeout)
t = torch.ones(1 << 16)
began = None
try:
    for i in range(50):
        if rank == 1 and i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        began = time.monotonic()
        dist.all_reduce(t)
        time.sleep(0.05)
    print("NO FAILURE", flush=True)
    sys.exit(3)
except Exception as exc:  # noqa: BLE001 - the test prints what it caught
    detect = time.monotonic() - began
    if not distributed.is_collective_failure(exc):
        print(f"NOT A COLLECTIVE FAILURE: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(4)
distributed.teardown(abort=True)
distributed.init(assignment(1, 0, 1), rendezvous="agent", backend="gloo", device=cpu, timeout=timeout)
x = torch.full((4,), 2.0)
dist.all_reduce(x)
assert dist.get_world_size() == 1 and x.tolist() == [2.0] * 4
distributed.teardown(abort=False)
print(f"RECOVERED detect_s={detect:.3f}", flush=True)
