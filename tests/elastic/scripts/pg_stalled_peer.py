"""One worker of the stalled-peer test: gloo over an agent-style TCPStore, a peer that stops answering.

    python pg_stalled_peer.py <store_port> <rank>

Generation 0 has world size 2. Rank 1 SIGSTOPs itself after three all-reduces: its connections stay open,
so nothing fails rank 0's fourth all-reduce (the group timeout is 60 s). A thread of rank 0 first asks to
abort for the current generation (nothing happens: it is not over), then, once the main thread sleeps in
the fourth all-reduce, for generation 1. Rank 0 must see a collective failure then, form generation 1 alone over the
same store connection and all-reduce there. It prints ``RELEASED after_s=<s> connections=<n> same_gen=<n>``.
"""

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist
from _pg_worker import init, reform_alone, seconds_until_collective_failure

from resilient.elastic import distributed
from resilient.testing.etcd import wait_until

port, rank = int(sys.argv[1]), int(sys.argv[2])
init(port, 0, rank, 2)
t = torch.ones(1 << 16)
same_gen = distributed.abort_collectives(0)  # generation 0 is current: not over
result: dict = {}
main_tid = threading.get_native_id()


def asleep_in_the_kernel() -> bool:
    with open(f"/proc/self/task/{main_tid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "S"


def abort_later() -> None:
    wait_until(asleep_in_the_kernel, 30, "rank 0 blocked in the all-reduce", 0.01)
    result["connections"] = distributed.abort_collectives(1)


def step(i: int) -> None:
    if rank == 1 and i == 3:
        os.kill(os.getpid(), signal.SIGSTOP)
    if i == 3:
        threading.Thread(target=abort_later, daemon=True).start()
    dist.all_reduce(t)


after = seconds_until_collective_failure(step, 4)
reform_alone(port)
assert distributed.abort_collectives(5) == 0, "generation 1's group is a world of one: no connections"
distributed.teardown(abort=False)
print(f"RELEASED after_s={after:.3f} connections={result.get('connections')} same_gen={same_gen}", flush=True)
