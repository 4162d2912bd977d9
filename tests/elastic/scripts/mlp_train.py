"""Deterministic MLP training under @resilient.elastic (single process, torchrun or resilient-run).

Prints ``STATE_HASH <hex>`` at the end (also in the ``train.done`` event). Knobs (env): STEPS (default
40), HIDDEN (64), GLOBAL_BATCH (16), SNAPSHOT_EVERY (1), STEP_SLEEP (seconds per step, default 0; lets a
test kill a worker mid-run), SAMPLES_LOG (path: append "step rank idx,idx,..." lines, to check the data
order), DETERMINISTIC=1 (torch.use_deterministic_algorithms, for CUDA; also set
CUBLAS_WORKSPACE_CONFIG=:4096:8), LOCAL_REGEN_AT (single-process only: announce a new generation after
this step, to exercise the in-process recovery path).
"""

import os
import time

import torch
import torch.nn.functional as F

import resilient
from resilient.data import ElasticSampler
from resilient.elastic import state_hash

STEPS = int(os.environ.get("STEPS", "40"))
HIDDEN = int(os.environ.get("HIDDEN", "64"))
GLOBAL_BATCH = int(os.environ.get("GLOBAL_BATCH", "16"))
STEP_SLEEP = float(os.environ.get("STEP_SLEEP", "0"))
SAMPLES_LOG = os.environ.get("SAMPLES_LOG")
REGEN_AT = int(os.environ.get("LOCAL_REGEN_AT", "-1"))
if os.environ.get("DETERMINISTIC") == "1":
    torch.use_deterministic_algorithms(True)
DATASET = 512
IN_DIM, OUT_DIM = 32, 8


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(DATASET, IN_DIM, generator=gen)
    y = torch.randint(0, OUT_DIM, (DATASET,), generator=gen)
    return x, y


@resilient.elastic(snapshot_every=int(os.environ.get("SNAPSHOT_EVERY", "1")))
def train(ctx: resilient.Context) -> str:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(HIDDEN, OUT_DIM)
    ).to(ctx.device)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
    sampler = ElasticSampler(DATASET, global_batch_size=GLOBAL_BATCH, seed=7)
    ctx.protect(model=ddp, optimizer=opt, scheduler=sched, sampler=sampler)
    x, y = (t.to(ctx.device) for t in dataset())
    for step in ctx.steps(STEPS):
        idx = sampler.batches(step)
        if SAMPLES_LOG:
            with open(SAMPLES_LOG, "a") as fh:
                fh.write(f"{step} {ctx.rank} {','.join(map(str, idx))}\n")
        loss = F.cross_entropy(ddp(x[idx]), y[idx]) * (len(idx) * ctx.world_size / GLOBAL_BATCH)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if STEP_SLEEP:
            time.sleep(STEP_SLEEP)
        if step == REGEN_AT and ctx.restart_count == 0 and hasattr(ctx.runtime, "request_generation"):
            ctx.runtime.request_generation()
    digest = state_hash({"model": model, "optimizer": opt})
    print(f"STATE_HASH {digest} rank={ctx.rank} world={ctx.world_size} restarts={ctx.restart_count}", flush=True)
    return digest


if __name__ == "__main__":
    train()
