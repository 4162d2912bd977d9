"""One worker of the peer-loss test: gloo over an agent-style TCPStore (client + per-generation prefix).

    python pg_peer_loss.py <store_port> <rank>

Generation 0 has world size 2. Rank 1 SIGKILLs itself in its fourth all-reduce. Rank 0 must see a
collective failure (not hang until a timeout), tear the group down, form generation 1 alone (world size 1)
over the same store connection, and all-reduce there. It prints ``RECOVERED detect_s=<seconds>``.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist
from _pg_worker import init, reform_alone, seconds_until_collective_failure

from resilient.elastic import distributed

port, rank = int(sys.argv[1]), int(sys.argv[2])
init(port, 0, rank, 2)
t = torch.ones(1 << 16)


def step(i: int) -> None:
    if rank == 1 and i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(t)


detect = seconds_until_collective_failure(step, 50)
reform_alone(port)
distributed.teardown(abort=False)
print(f"RECOVERED detect_s={detect:.3f}", flush=True)
