"""Deterministic small-transformer training under @resilient.elastic (single process, torchrun, resilient-run).

A two-layer causal Transformer language model on a synthetic token stream, AdamW with a warmup
``LambdaLR``, dropout (so the RNG state matters), data order from ``ElasticSampler``. Prints
``STATE_HASH <hex>`` at the end (also in the ``train.done`` event). Knobs (env): STEPS (default 30),
GLOBAL_BATCH (8), SNAPSHOT_EVERY (1), STEP_SLEEP (seconds per step), SAMPLES_LOG (append "step rank
idx,..." lines), DETERMINISTIC=1 (torch.use_deterministic_algorithms, for CUDA; also set
CUBLAS_WORKSPACE_CONFIG=:4096:8), LOCAL_REGEN_AT (single-process only: announce a new generation after this step).
"""

import os
import time

import torch
import torch.nn.functional as F

import resilient
from resilient.data import ElasticSampler
from resilient.elastic import state_hash

STEPS = int(os.environ.get("STEPS", "30"))
GLOBAL_BATCH = int(os.environ.get("GLOBAL_BATCH", "8"))
STEP_SLEEP = float(os.environ.get("STEP_SLEEP", "0"))
SAMPLES_LOG = os.environ.get("SAMPLES_LOG")
REGEN_AT = int(os.environ.get("LOCAL_REGEN_AT", "-1"))
if os.environ.get("DETERMINISTIC") == "1":
    torch.use_deterministic_algorithms(True)
VOCAB, SEQ, D_MODEL, SEQUENCES = 64, 16, 32, 256


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, D_MODEL)
        self.pos = torch.nn.Parameter(torch.randn(SEQ, D_MODEL) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(D_MODEL, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        return self.head(self.encoder(h, mask=self.mask, is_causal=True))


def corpus() -> torch.Tensor:
    gen = torch.Generator().manual_seed(99)
    return torch.randint(0, VOCAB, (SEQUENCES, SEQ + 1), generator=gen)


@resilient.elastic(snapshot_every=int(os.environ.get("SNAPSHOT_EVERY", "1")))
def train(ctx: resilient.Context) -> str:
    torch.manual_seed(0)
    model = TinyLM().to(ctx.device)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    sampler = ElasticSampler(SEQUENCES, global_batch_size=GLOBAL_BATCH, seed=11)
    ctx.protect(model=ddp, optimizer=opt, scheduler=sched, sampler=sampler)
    data = corpus().to(ctx.device)
    for step in ctx.steps(STEPS):
        idx = sampler.batches(step)
        if SAMPLES_LOG:
            with open(SAMPLES_LOG, "a") as fh:
                fh.write(f"{step} {ctx.rank} {','.join(map(str, idx))}\n")
        batch = data[idx]
        logits = ddp(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss = loss * (len(idx) * ctx.world_size / GLOBAL_BATCH)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
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
