"""The smallest resilient train function.

    resilient-run --standalone --nproc-per-node 2 examples/minimal.py --steps 50
    python examples/minimal.py --steps 50        # one process, for debugging

Each worker trains the same linear model on its own slice of every batch; DDP averages the gradients.
Kill a worker (``kill -9``) while it runs: the others recover in-process, the dead one is respawned, and
training continues from the last committed step.
"""

import argparse

import torch

import resilient


@resilient.elastic(snapshot_every=1)
def train(ctx: resilient.Context, steps: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    if ctx.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx.protect(model=model, optimizer=opt)
    w_true = torch.arange(16, dtype=torch.float32) / 16
    for step in ctx.steps(steps):
        g = torch.Generator().manual_seed(step * 1000 + ctx.rank)
        x = torch.randn(32, 16, generator=g)
        y = x @ w_true
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ctx.rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f} world {ctx.world_size}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    train(steps=parser.parse_args().steps)
