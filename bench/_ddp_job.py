"""The training job the launcher benchmarks run, under torchrun and under resilient-run.

``--mode plain``: an unmodified torchrun DDP script (env:// init); with ``--save-every N`` it torch.saves
model + optimizer every N steps (rank 0) and resumes from that file when restarted.
``--mode elastic``: the same model and loop under ``@resilient.elastic`` (in-memory snapshot every step).

Every rank appends ``<step> <CLOCK_MONOTONIC> <pid> <restart> <stall_s>`` to ``<out>/steps-<rank>.txt``
after each step, so the benchmark can time recovery from outside.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=("plain", "elastic"), required=True)
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--steps", type=int, default=60)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--save-every", type=int, default=0)
p.add_argument("--adam", choices=("fused", "foreach", "for-loop"), default="for-loop",
               help="Adam's implementation (torch.optim.Adam's fused / foreach flags; for-loop is what "
                    "torch.optim.Adam(params) picks on CPU); the same in both modes")
p.add_argument("--out", required=True)
args = p.parse_args()


def make_model(skip_init: bool = False) -> torch.nn.Module:
    """``skip_init``: the plain script's way to skip the random initialisation a resume overwrites anyway
    (``torch.nn.utils.skip_init``); the elastic script builds under ``ctx.skip_init()`` instead."""
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        if skip_init:
            linear = torch.nn.utils.skip_init(torch.nn.Linear, args.hidden, args.hidden)
        else:
            linear = torch.nn.Linear(args.hidden, args.hidden)
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def make_optimizer(params) -> torch.optim.Optimizer:
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[args.adam]
    return torch.optim.Adam(params, lr=1e-4, **impl)


def record(rank: int, step: int, stall: float) -> None:
    with open(os.path.join(args.out, f"steps-{rank}.txt"), "a") as fh:
        fh.write(f"{step} {time.monotonic():.6f} {os.getpid()} {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} "
                 f"{stall:.6f}\n")


def mark(rank: int, what: str) -> None:
    """Time the phases of (re)entering the train function: ``<what> <CLOCK_MONOTONIC> <pid>``."""
    with open(os.path.join(args.out, f"phases-{rank}.txt"), "a") as fh:
        fh.write(f"{what} {time.monotonic():.6f} {os.getpid()}\n")


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    return torch.randn(args.batch, args.hidden, generator=g)


def plain() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ckpt = os.path.join(args.out, "ckpt.pt")
    resuming = bool(args.save_every) and os.path.exists(ckpt)
    # every rank loads the same checkpoint below: the random initialisation and DDP's initial parameter
    # broadcast are redundant then
    model = torch.nn.parallel.DistributedDataParallel(make_model(skip_init=resuming), init_sync=not resuming)
    opt = make_optimizer(model.parameters())
    start = 0
    if resuming:
        state = torch.load(ckpt, weights_only=False)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"] + 1
    for step in range(start, args.steps):
        loss = model(batch(step, rank)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        stall = 0.0
        if args.save_every and (step + 1) % args.save_every == 0 and rank == 0:
            t0 = time.perf_counter()
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
            stall = time.perf_counter() - t0
        record(rank, step, stall)
        time.sleep(args.sleep)
    dist.destroy_process_group()
    # torch 2.13 + gloo + DDP aborts at interpreter exit in about 1 run in 4 (a gloo worker takes the GIL
    # during finalization; resilient/elastic/exitdrain.py): torchrun then reports the finished baseline run
    # as failed and the benchmark retries it. Every step is recorded (files closed): leave without finalizing.
    os._exit(0)


def elastic() -> None:
    import resilient

    @resilient.elastic(snapshot_every=1)
    def train(ctx):
        mark(ctx.rank, "enter")
        with ctx.skip_init():  # on a restore the snapshot overwrites the random initialisation
            model = make_model()
        mark(ctx.rank, "model")
        # on a restore every rank loads the same committed state in protect(): skip DDP's initial broadcast
        model = torch.nn.parallel.DistributedDataParallel(model, init_sync=ctx.restored_step is None)
        opt = make_optimizer(model.parameters())
        mark(ctx.rank, "ddp")
        ctx.protect(model=model, optimizer=opt)
        mark(ctx.rank, "protect")
        writer = getattr(ctx, "_writer", None)
        for step in ctx.steps(args.steps):
            loss = model(batch(step, ctx.rank)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            record(ctx.rank, step, getattr(writer, "last_stall_s", 0.0) or 0.0)
            time.sleep(args.sleep)

    train()


if __name__ == "__main__":
    plain() if args.mode == "plain" else elastic()
