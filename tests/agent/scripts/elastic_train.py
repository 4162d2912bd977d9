"""A small @resilient.elastic gloo job for the agent tests.

Args: --steps N --sleep S --out DIR. Writes ``<out>/done-<rank>`` with "<world> <generation> <step> <hash>"
when it finishes, and ``<out>/pid-<rank>-<pid>`` when it starts (so tests can find who to kill).
Env knobs: CRASH_BEFORE_FIRST_STEP=1 makes every rank-1 process exit(5) before its first step;
CRASH_AT_GENERATION=g makes the rank-1 process started for generation g exit(3) as it starts, before
it joins the process group (its peers are already waiting there); STALL_AT_STEP=s makes rank 0 of generation
1 write ``<out>/stalled-<pid>`` and sleep for an hour inside step s, before its collective (as a CUDA
synchronisation on a NCCL collective whose peer is gone would: nothing the agent announces reaches it).
"""

import argparse
import os
import time

import torch

import resilient

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=20)
p.add_argument("--sleep", type=float, default=0.05)
p.add_argument("--out", required=True)
args = p.parse_args()
if os.environ.get("RANK") == "1" and os.environ.get("CRASH_AT_GENERATION") == os.environ.get("RESILIENT_GENERATION"):
    os._exit(3)


@resilient.elastic(snapshot_every=1)
def train(ctx: resilient.Context) -> None:
    open(os.path.join(args.out, f"pid-{ctx.rank}-{os.getpid()}"), "w").close()
    if os.environ.get("CRASH_BEFORE_FIRST_STEP") == "1" and ctx.rank == 1:
        raise SystemExit(5)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    if ctx.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx.protect(model=model, optimizer=opt)
    step = ctx.restored_step
    for step in ctx.steps(args.steps):
        if ctx.rank == 0 and ctx.generation == 1 and os.environ.get("STALL_AT_STEP") == str(step):
            open(os.path.join(args.out, f"stalled-{os.getpid()}"), "w").close()
            time.sleep(3600)
        g = torch.Generator().manual_seed(step * 100 + ctx.rank)
        loss = model(torch.randn(16, 8, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(args.sleep)
    digest = resilient.state_hash({"model": model})
    with open(os.path.join(args.out, f"done-{ctx.rank}"), "w") as fh:
        fh.write(f"{ctx.world_size} {ctx.generation} {step} {digest} {ctx.restored_step}\n")


if __name__ == "__main__":
    train()
