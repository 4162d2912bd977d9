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


class FakePending:
    """Stands in for the store's PendingWrite (whose copy runs on a GPU): the test decides when it is done."""

    def __init__(self, segment, tensors, step, generation, meta):
        segment.write(tensors, step=step, generation=generation, meta=meta)
        self.segment, self.step, self.generation = segment, step, generation
        self.copied = False
        self.stream_waits = 0
        self.info = None

    @property
    def sealed(self):
        return self.info is not None

    def done(self):
        return self.copied or self.sealed

    def stream_wait(self, stream=None):
        self.stream_waits += 1

    def wait(self):
        if self.info is None:
            self.info = self.segment.seal()
        return self.info


def test_overlapped_snapshot_is_sealed_by_poll_hook_or_next_snapshot(local_runtime, monkeypatch):
    from resilient.store import Segment

    made = []

    def write_async(self, tensors, *, step, generation, meta=b"", keep_step=None, stop=None):
        made.append(FakePending(self, tensors, step, generation, meta))
        return made[-1]

    monkeypatch.setattr(Segment, "write_async", write_async)
    monkeypatch.setattr(SnapshotWriter, "_overlap_tensors", lambda self, captured: dict(captured.tensors))
    sealed = []
    real_sealed = local_runtime.sealed
    monkeypatch.setattr(local_runtime, "sealed", lambda *a, **k: (sealed.append((a, k)), real_sealed(*a, **k)))
    writer = SnapshotWriter(local_runtime)
    try:
        ctx = make_context(local_runtime, writer)
        model = torch.nn.Linear(8, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx.protect(model=model, optimizer=opt)
        model(torch.randn(2, 8)).sum().backward()

        ctx.snapshot()  # queued: not sealed, not reported
        assert writer.in_flight and not made[0].sealed and sealed == []
        assert writer.poll() is None and writer.in_flight  # copy not done: poll never blocks
        opt.step()  # copy not done: the step is ordered after it on the GPU, nothing sealed
        assert made[0].stream_waits == 1 and writer.in_flight
        made[0].copied = True
        assert writer.poll() is not None  # done: sealed and reported with its stall
        assert not writer.in_flight and made[0].sealed
        (step, generation, nbytes), kwargs = sealed[-1]
        assert step == 0 and kwargs["stall_s"] == writer.last_stall_s

        ctx.snapshot()
        made[1].copied = True
        opt.step()  # done by the time of the step: the hook seals it
        assert made[1].sealed and made[1].stream_waits == 0 and len(sealed) == 2

        ctx.snapshot()
        ctx.snapshot()  # the next snapshot finishes the one in flight first
        assert made[2].sealed and len(sealed) == 3 and writer.in_flight
        writer.close()  # closing seals what is left
        assert made[3].sealed and len(sealed) == 4
    finally:
        writer.close()
