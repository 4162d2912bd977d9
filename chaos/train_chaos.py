"""The deterministic training job the chaos scenarios break (the default ``--script``).

A tiny float64 MLP trained with Adam on synthetic data under ``@resilient.elastic``. The result is
bitwise independent of the physical world size and of where a recovery happened:

- the global batch is split into L fixed *logical* shards (``--logical-shards``, default 4); rank r
  computes the gradients of the shards l with ``l % world_size == r``;
- every rank all-gathers the per-logical-shard gradients and sums them in logical order (a canonical
  reduction, never a ring all-reduce whose summation order depends on the world size);
- each (step, logical shard) draws its data from its own generator seeded from (seed, step, shard);
- ``torch.use_deterministic_algorithms(True)`` and one thread.

Each step calls ``resilient.chaos.inworker.at_step`` (faults the harness arms in the worker). At the end
every rank emits ``train.done`` with the canonical state hash (``resilient.state_hash`` of model and
optimizer) and the final loss, and rank 0 writes the hash to ``--hash-out``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import resilient
from resilient import events
from resilient.chaos import inworker

IN_DIM = 16
BATCH_PER_SHARD = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--logical-shards", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep-ms", type=float, default=0.0, help="pace the steps (so faults land mid-run)")
    p.add_argument("--hash-out", default=None, help="file to write the final state hash to (rank 0)")
    return p.parse_args(argv)


def shard_batch(seed: int, step: int, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + shard) % (2**63))
    x = torch.randn(BATCH_PER_SHARD, IN_DIM, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(BATCH_PER_SHARD, 1, generator=g, dtype=torch.float64)
    return x, y


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, args.hidden), torch.nn.Tanh(), torch.nn.Linear(args.hidden, 1)
    ).to(torch.float64)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr)


def canonical_grads(model: torch.nn.Module, args: argparse.Namespace, step: int, rank: int, world: int) -> float:
    """Set every parameter's .grad to the mean over logical shards, summed in logical order; returns the
    mean loss of the step (also canonical)."""
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    L = args.logical_shards
    mine = torch.zeros(L, n + 1, dtype=torch.float64)
    for shard in range(L):
        if shard % world != rank:
            continue
        x, y = shard_batch(args.seed, step, shard)
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        mine[shard, :n] = torch.cat([g.reshape(-1) for g in grads])
        mine[shard, n] = loss.detach()
    if world > 1:
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
    else:
        gathered = [mine]
    total = torch.zeros(n + 1, dtype=torch.float64)
    for shard in range(L):
        total = total + gathered[shard % world][shard]
    total = total / L
    offset = 0
    for p in params:
        p.grad = total[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return float(total[n])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    @resilient.elastic(seed=args.seed)
    def train(ctx: resilient.Context) -> None:
        model, opt = build(args)
        ctx.protect(model=model, optimizer=opt)
        loss = float("nan")
        for step in ctx.steps(args.steps):
            inworker.at_step(step, ctx.local_rank)
            opt.zero_grad(set_to_none=True)
            loss = canonical_grads(model, args, step, ctx.rank, ctx.world_size)
            opt.step()
            if args.step_sleep_ms:
                time.sleep(args.step_sleep_ms / 1000.0)
        digest = resilient.state_hash({"model": model, "optimizer": opt})
        events.emit("train.done", step=args.steps, state_hash=digest, loss=loss, source="train_chaos",
                    world_size=ctx.world_size)
        if ctx.rank == 0 and args.hash_out:
            tmp = f"{args.hash_out}.tmp"
            with open(tmp, "w") as fh:
                fh.write(digest + "\n")
            os.replace(tmp, args.hash_out)

    train()


if __name__ == "__main__":
    main()
