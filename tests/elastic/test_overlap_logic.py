"""The overlapped-snapshot plumbing of SnapshotWriter on CPU-only state: it stays synchronous."""

from __future__ import annotations

import torch

from resilient.elastic.context import Context
from resilient.elastic.snapshots import SnapshotWriter


def make_context(runtime, writer) -> Context:
    return Context(
        runtime=runtime, assignment=runtime.assignment(), device=torch.device("cpu"), writer=writer,
        snapshot_every=0, seed=0,
    )


def test_cpu_state_is_sealed_synchronously(local_runtime):
    writer = SnapshotWriter(local_runtime)
    try:
        ctx = make_context(local_runtime, writer)
        model = torch.nn.Linear(8, 4)
        ctx.protect(model=model)
        assert ctx.snapshot() == 0
        assert not writer.in_flight
        assert writer.finish() is None and writer.poll() is None  # nothing was left in flight
        assert writer.last_stall_s is not None and writer.last_stall_s > 0
        assert local_runtime.committed_step() == 0  # sealed and reported by the snapshot itself
    finally:
        writer.close()


def test_protect_guards_each_optimizer_once(local_runtime):
    writer = SnapshotWriter(local_runtime)
    try:
        model = torch.nn.Linear(8, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        make_context(local_runtime, writer).protect(model=model, optimizer=opt)
        writer.guard(opt)
        hooks = [h for h in opt._optimizer_step_pre_hooks.values() if getattr(h, "__self__", None) is writer]
        assert len(hooks) == 1
        model(torch.randn(2, 8)).sum().backward()
        before = model.weight.detach().clone()
        opt.step()  # the pre-hook with nothing in flight lets the step run unchanged
        assert not torch.equal(before, model.weight.detach())
    finally:
        writer.close()
