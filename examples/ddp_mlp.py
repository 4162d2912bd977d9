"""Data-parallel MLP with AdamW, an LR schedule and an elastic sampler.

    resilient-run --standalone --nproc-per-node 2 examples/ddp_mlp.py --steps 200

The global sample order is a pure function of (seed, step), so the job can shrink or grow between
generations without skipping or repeating a sample; ``on_world_change`` rescales the learning rate
with the world size (linear scaling rule).
"""

import argparse

import torch

import resilient
from resilient.data import ElasticSampler

DATASET = 8192
FEATURES = 64


def make_dataset(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(DATASET, FEATURES, generator=g)
    w = torch.randn(FEATURES, 1, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(DATASET, 1, generator=g)
    return x, y


@resilient.elastic(snapshot_every=1)
def train(ctx: resilient.Context, steps: int, hidden: int, global_batch: int, base_lr: float) -> None:
    x, y = make_dataset()
    torch.manual_seed(1234)
    net = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, 1),
    ).to(ctx.device)
    model = torch.nn.parallel.DistributedDataParallel(net) if ctx.world_size > 1 else net
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    sampler = ElasticSampler(DATASET, global_batch_size=global_batch, seed=7)
    sampler.set_world(ctx.rank, ctx.world_size)
    ctx.protect(model=net, optimizer=opt, scheduler=sched, sampler=sampler)

    @ctx.on_world_change
    def _rescale(old: int, new: int) -> None:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * new / old

    for step in ctx.steps(steps):
        idx = torch.as_tensor(sampler.batches(step))
        xb, yb = x[idx].to(ctx.device), y[idx].to(ctx.device)
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if ctx.rank == 0 and step % 20 == 0:
            print(f"step {step:4d} loss {loss.item():.4f} world {ctx.world_size} gen {ctx.generation}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()
    train(steps=a.steps, hidden=a.hidden, global_batch=a.global_batch, base_lr=a.lr)
