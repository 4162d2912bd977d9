"""One worker of the stalled-peer test: gloo over an agent-style TCPStore, a peer that stops answering.

    python pg_stalled_peer.py <store_port> <rank>

Generation 0 has world size 2. Rank 1 SIGSTOPs itself after three all-reduces: its connections stay open,
so nothing fails rank 0's fourth all-reduce (the group timeout is 60 s). A thread of rank 0 first asks to
abort for the current generation (nothing happens: it is not over), then, 0.5 s into the blocked
all-reduce, for generation 1. Rank 0 must see a collective failure then, form generation 1 alone over the
same store connection and all-reduce there. It prints ``RELEASED after_s=<s> connections=<n> same_gen=<n>``.
"""

import os
import signal
import sys
import threading
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
same_gen = distributed.abort_collectives(0)  # generation 0 is current: not over
result: dict = {}


def abort_later() -> None:
    time.sleep(0.5)
    result["connections"] = distributed.abort_collectives(1)


began = None
try:
    for i in range(4):
        if rank == 1 and i == 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        if i == 3:
            threading.Thread(target=abort_later, daemon=True).start()
        began = time.monotonic()
        dist.all_reduce(t)
    print("NO FAILURE", flush=True)
    sys.exit(3)
except Exception as exc:  # noqa: BLE001 - the test prints what it caught
    after = time.monotonic() - began
    if not distributed.is_collective_failure(exc):
        print(f"NOT A COLLECTIVE FAILURE: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(4)
distributed.teardown(abort=True)
distributed.init(assignment(1, 0, 1), rendezvous="agent", backend="gloo", device=cpu, timeout=timeout)
x = torch.full((4,), 2.0)
dist.all_reduce(x)
assert dist.get_world_size() == 1 and x.tolist() == [2.0] * 4
assert distributed.abort_collectives(5) == 0, "generation 1's group is a world of one: no connections"
distributed.teardown(abort=False)
print(f"RELEASED after_s={after:.3f} connections={result.get('connections')} same_gen={same_gen}", flush=True)
