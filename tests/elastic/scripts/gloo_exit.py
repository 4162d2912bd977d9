"""One rank of the gloo exit-race test: DDP backward passes over a group formed by
``resilient.elastic.distributed.init`` (agent-style TCPStore), then the script ends at once and the
interpreter finalizes (see ``resilient.elastic.exitdrain``).

    python gloo_exit.py <store_port> <rank>

Exits 0. Without the exit drain, about 4 runs in 10 end with one rank killed by SIGABRT ("terminate called
without an active exception") as a gloo worker thread takes the GIL during finalization.
"""

import sys
from datetime import timedelta

import torch

from resilient.elastic import distributed
from resilient.runtime.api import WorkerAssignment

port, rank = int(sys.argv[1]), int(sys.argv[2])
assignment = WorkerAssignment(0, rank, rank, 2, 2, 0, "127.0.0.1", port, 0, "t", "n")
distributed.init(assignment, rendezvous="agent", backend="gloo", device=torch.device("cpu"),
                 timeout=timedelta(seconds=60))
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(16)])
ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)  # many buckets: many works
x = torch.randn(4, 64)
for _ in range(3):
    ddp(x).sum().backward()
