"""The tiny deterministic model and step the in-process decorator tests train, and the state hash of a
fault-free run of it (the reference a recovered run must equal bit for bit)."""

from __future__ import annotations

import torch

import resilient
from resilient.runtime.local import LocalRuntime


def build(optimizer: str = "sgd"):
    """A seeded 4->2 linear model with SGD+momentum (``"sgd"``) or Adam (``"adam"``): both keep state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    if optimizer == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=0.1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def step(model, opt) -> None:
    loss = model(torch.randn(3, 4)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def reference_hash(steps: int, optimizer: str = "sgd") -> str:
    """State hash after ``steps`` steps without any fault."""

    @resilient.elastic(runtime=lambda: LocalRuntime())
    def reference(ctx):
        model, opt = build(optimizer)
        ctx.protect(model=model, optimizer=opt)
        for _ in ctx.steps(steps):
            step(model, opt)
        return resilient.state_hash({"model": model, "optimizer": opt})

    return reference()
