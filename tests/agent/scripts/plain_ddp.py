"""An unmodified torchrun-style gloo DDP script: env:// init, N steps, optional crash/hang on request.

Args: --steps N --sleep S --out DIR (with --out, ``progress-<rank>`` holds the last finished step, and
``done-<rank>`` appears at the end). Env knobs (read by tests): CRASH_RANK / CRASH_STEP make that rank
exit(3) at that step, once per restart count 0 (so the restarted worker runs through).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=5)
p.add_argument("--sleep", type=float, default=0.05)
p.add_argument("--out", default=None)
args = p.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
crash_rank = int(os.environ.get("CRASH_RANK", "-1"))
crash_step = int(os.environ.get("CRASH_STEP", "-1"))
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
for step in range(args.steps):
    if rank == crash_rank and step == crash_step and restart == 0:
        print(f"rank {rank} crashing at step {step}", flush=True)
        sys.exit(3)
    x = torch.randn(16, 8)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if args.out:
        with open(os.path.join(args.out, f"progress-{rank}"), "w") as fh:
            fh.write(f"{step}\n")
    time.sleep(args.sleep)
if args.out:
    with open(os.path.join(args.out, f"done-{rank}"), "w") as fh:
        fh.write(f"{world} {restart}\n")
dist.destroy_process_group()
