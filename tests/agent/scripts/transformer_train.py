"""A tiny deterministic transformer trained under ``@resilient.elastic(snapshot_every=1)``, for the exactness test.

Two pre-LayerNorm ``nn.TransformerEncoderLayer`` blocks with a causal mask and dropout on (so the restored
RNG states matter), AdamW, next-token prediction on a fixed synthetic token set; every step's batch comes
from a protected ``resilient.data.ElasticSampler``. One thread and ``torch.use_deterministic_algorithms``,
so a run is bitwise reproducible. Every rank ends with ``train.done`` (state hash over model and optimizer),
emitted by ``@resilient.elastic``.

Args: --steps N; --hold-at-step K --hold-dir DIR: a rank of the first incarnation (nothing restored)
that finished step K writes ``DIR/held-<rank>`` and waits for ``DIR/release``, so a test can kill a worker
at a known point mid-run.
"""

import argparse
import os

import torch
from torch import nn

import resilient
from resilient.data import ElasticSampler
from resilient.testing.etcd import wait_until

VOCAB, SEQ, DIM, HEADS, LAYERS, SAMPLES, GLOBAL_BATCH = 32, 16, 64, 4, 2, 256, 16

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--hold-at-step", type=int, default=-1)
p.add_argument("--hold-dir", default=None)
args = p.parse_args()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(1, SEQ, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, dim_feedforward=2 * DIM, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos
        return self.head(self.blocks(x, mask=self.mask, is_causal=True))


def dataset() -> torch.Tensor:
    """Fixed token sequences with structure to learn (each token is the previous one plus a per-row stride)."""
    g = torch.Generator().manual_seed(1234)
    start = torch.randint(0, VOCAB, (SAMPLES, 1), generator=g)
    stride = torch.randint(1, 4, (SAMPLES, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


@resilient.elastic(snapshot_every=1)
def train(ctx: resilient.Context) -> None:
    data = dataset()
    torch.manual_seed(0)  # the same initial weights on every rank
    net = TinyGPT()
    model = nn.parallel.DistributedDataParallel(net) if ctx.world_size > 1 else net
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sampler = ElasticSampler(SAMPLES, global_batch_size=GLOBAL_BATCH, seed=5)
    torch.manual_seed(100 + ctx.rank)  # per-rank dropout masks (replaced by the snapshot's RNG on a restore)
    ctx.protect(model=net, optimizer=opt, sampler=sampler)
    for step in ctx.steps(args.steps):
        rows = data[sampler.batches(step)]
        logits = model(rows[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == args.hold_at_step and ctx.restored_step is None:
            hold(ctx.rank)


def hold(rank: int) -> None:
    open(os.path.join(args.hold_dir, f"held-{rank}"), "w").close()
    wait_until(lambda: os.path.exists(os.path.join(args.hold_dir, "release")), 120, "the test's release file")


if __name__ == "__main__":
    train()
