"""Capture into a real shared-memory segment and restore: bitwise round trips and errors naming the key."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resilient.data import ElasticSampler
from resilient.elastic.context import Context
from resilient.elastic.exactness import state_hash
from resilient.elastic.snapshots import SnapshotWriter
from resilient.errors import StateError
from resilient.runtime.api import RestoreSource
from resilient.runtime.local import LocalRuntime


def build(hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 4)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    sampler = ElasticSampler(100, global_batch_size=10, seed=3)
    return model, opt, sched, sampler


def context(runtime, writer, *, snapshot_every=0, world_size=None, rank=None, seed=0) -> Context:
    assignment = runtime.assignment()
    if world_size is not None:
        assignment = type(assignment)(**{**assignment.__dict__, "world_size": world_size, "rank": rank or 0})
    return Context(
        runtime=runtime,
        assignment=assignment,
        device=torch.device("cpu"),
        writer=writer,
        snapshot_every=snapshot_every,
        seed=seed,
    )


def run(ctx: Context, model, opt, sched, sampler, total: int) -> None:
    """Steps that read every RNG (torch via randn and dropout, Python random, NumPy) and the sampler."""
    data = torch.arange(100 * 8, dtype=torch.float32).reshape(100, 8) / 800
    for step in ctx.steps(total):
        idx = sampler.batches(step)
        x = data[idx] + 0.01 * torch.randn(len(idx), 8) + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        loss = F.mse_loss(model(x), torch.ones(len(idx), 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ctx.state["loss"] = float(loss.detach())


def hash_of(model, opt, sched) -> str:
    return state_hash({"model": model, "optimizer": opt, "scheduler": sched})


def test_round_trip_is_bitwise_equal_to_uninterrupted_run(local_runtime):
    writer = SnapshotWriter(local_runtime)
    random.seed(11)
    np.random.seed(11)
    objs = build()
    ctx = context(local_runtime, writer, snapshot_every=6)
    ctx.protect(model=objs[0], optimizer=objs[1], scheduler=objs[2], sampler=objs[3])
    run(ctx, *objs, total=6)  # snapshot after step 5 (6 steps completed)
    loss_at_snapshot = ctx.state["loss"]
    run(ctx, *objs, total=10)  # 4 more steps
    reference = hash_of(*objs[:3])
    reference_loss = ctx.state["loss"]
    assert local_runtime.committed_step() == 6

    random.seed(999)  # the restore must put every generator back, whatever they hold now
    np.random.seed(999)
    fresh = build(seed=123)
    assert hash_of(*fresh[:3]) != reference
    ctx2 = context(local_runtime, writer, snapshot_every=0)
    assert ctx2.restored_step == 6
    ctx2.protect(model=fresh[0], optimizer=fresh[1], scheduler=fresh[2], sampler=fresh[3])
    assert ctx2.state["loss"] == loss_at_snapshot  # ctx.state comes back too
    run(ctx2, *fresh, total=10)
    assert ctx2.completed_steps == 10
    assert hash_of(*fresh[:3]) == reference
    assert ctx2.state["loss"] == reference_loss
    writer.close()


@pytest.mark.parametrize("dedup", [False, True], ids=["whole", "dedup-sliced"])
def test_restore_reads_module_state_into_the_live_parameters(local_runtime, dedup):
    writer = SnapshotWriter(local_runtime, dedup=dedup)
    model, opt, _, _ = build()
    ctx = context(local_runtime, writer)
    ctx.protect(model=model, optimizer=opt)
    ctx.snapshot()
    fresh, fresh_opt, _, _ = build(seed=5)
    weight = fresh[0].weight
    ctx2 = context(local_runtime, writer)
    ctx2.protect(model=fresh, optimizer=fresh_opt)
    # the snapshot's copy of model/0.weight *is* the parameter's memory: read in place, not copied twice
    assert ctx2._loaded.tensors["model/0.weight"].data_ptr() == weight.data_ptr()
    assert fresh[0].weight is weight
    assert state_hash({"model": fresh, "optimizer": fresh_opt}) == state_hash({"model": model, "optimizer": opt})
    writer.close()


def test_skip_init_on_restore_still_restores_bitwise_and_does_nothing_on_a_fresh_start(local_runtime):
    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    writer = SnapshotWriter(local_runtime)
    fresh_ctx = context(local_runtime, writer)
    assert fresh_ctx.restored_step is None
    before = torch.get_rng_state()
    with fresh_ctx.skip_init():  # nothing to restore: the model is initialised as usual
        model = net()
    assert not torch.equal(before, torch.get_rng_state()), "a fresh start must initialise"
    fresh_ctx.protect(model=model, optimizer=torch.optim.AdamW(model.parameters()))
    fresh_ctx.snapshot()
    ctx = context(local_runtime, writer)
    assert ctx.restored_step is not None
    before = torch.get_rng_state()
    with ctx.skip_init():
        rebuilt = net()
    assert torch.equal(before, torch.get_rng_state()), "the initialisers were skipped"
    ctx.protect(model=rebuilt, optimizer=torch.optim.AdamW(rebuilt.parameters()))
    assert state_hash({"model": rebuilt}) == state_hash({"model": model})
    writer.close()


def test_snapshot_holds_named_tensors_and_plain_values(local_runtime):
    from resilient.store import Segment

    writer = SnapshotWriter(local_runtime)
    model, opt, sched, sampler = build()
    ctx = context(local_runtime, writer, snapshot_every=2)
    got = ctx.protect(model=model, optimizer=opt, best=0.5)
    assert got["best"] == 0.5 and got["model"] is model
    run(ctx, model, opt, sched, sampler, total=2)
    source = local_runtime.restore_source()
    seg = Segment.open(source.segment)
    try:
        snap = seg.read(step=2)
    finally:
        seg.close()
    names = set(snap.tensors)
    assert {"model/0.weight", "model/3.bias", "optimizer/state/0/exp_avg", "optimizer/state/3/exp_avg_sq"} <= names
    assert "_rng/torch_cpu" in names
    ctx2 = context(local_runtime, writer)
    assert ctx2.protect(best=0.0)["best"] == 0.5  # the restored value wins over the initial one
    writer.close()


def test_world_size_change_reseeds_rng_and_moves_sampler(local_runtime):
    writer = SnapshotWriter(local_runtime)
    model, opt, sched, sampler = build()
    ctx = context(local_runtime, writer, snapshot_every=4)
    ctx.protect(model=model, optimizer=opt, scheduler=sched, sampler=sampler)
    run(ctx, model, opt, sched, sampler, total=4)
    weights = hash_of(model, opt, sched)
    real = local_runtime.restore_source()

    class GrownWorld(LocalRuntime):
        """The same committed snapshot, reported as taken by rank 0 of a world of 1 (now: rank 1 of 2)."""

        def restore_source(self):
            return RestoreSource(real.step, real.generation, real.segment, 0, "peer:test", 1)

    grown = GrownWorld.__new__(GrownWorld)
    grown.__dict__.update(local_runtime.__dict__)
    calls = []
    fresh = build(seed=5)
    ctx2 = context(grown, writer, world_size=2, rank=1, seed=42)
    ctx2.on_world_change(lambda old, new: calls.append((old, new)))
    ctx2.protect(model=fresh[0], optimizer=fresh[1], scheduler=fresh[2], sampler=fresh[3])
    assert ctx2.world_changed and ctx2.restored_step == 4
    assert hash_of(*fresh[:3]) == weights  # model/optimizer state is shared by every data-parallel rank
    steps = iter(ctx2.steps(5))
    assert next(steps) == 4
    assert calls == [(1, 2)]
    assert (fresh[3].rank, fresh[3].world_size, fresh[3].step) == (1, 2, 4)
    from resilient.elastic.rng import derived_seed

    expected = torch.Generator().manual_seed(derived_seed(42, 4, 1))
    assert torch.equal(torch.randn(3), torch.randn(3, generator=expected))
    steps.close()
    writer.close()


def test_object_without_state_dict_is_refused_by_name(local_runtime):
    ctx = context(local_runtime, SnapshotWriter(local_runtime))

    class Opaque:
        pass

    with pytest.raises(StateError, match=r"thing.*Opaque.*state_dict"):
        ctx.protect(thing=Opaque())


def test_non_contiguous_tensor_is_refused_by_key(local_runtime):
    class Transposed:
        def state_dict(self):
            return {"w": torch.randn(4, 6).t()}

        def load_state_dict(self, state):
            pass

    writer = SnapshotWriter(local_runtime)
    ctx = context(local_runtime, writer)
    ctx.protect(weird=Transposed())
    with pytest.raises(StateError, match=r"'weird/w'.*non-contiguous"):
        ctx.snapshot()
    writer.close()


def test_restore_into_other_shape_names_key_and_both_shapes(local_runtime):
    writer = SnapshotWriter(local_runtime)
    model, opt, _, _ = build(hidden=16)
    ctx = context(local_runtime, writer)
    ctx.protect(model=model, optimizer=opt)
    ctx.snapshot()
    bigger, bigger_opt, _, _ = build(hidden=32)
    ctx2 = context(local_runtime, writer)
    with pytest.raises(StateError, match=r"model/0\.weight.*\(16, 8\).*\(32, 8\)"):
        ctx2.protect(model=bigger, optimizer=bigger_opt)
    writer.close()


def test_missing_object_in_snapshot_is_named(local_runtime):
    writer = SnapshotWriter(local_runtime)
    model, opt, sched, _ = build()
    ctx = context(local_runtime, writer)
    ctx.protect(model=model)
    ctx.snapshot()
    ctx2 = context(local_runtime, writer)
    with pytest.raises(StateError, match=r"Cannot restore optimizer.*holds \['model'\]"):
        ctx2.protect(model=build()[0], optimizer=opt)
    writer.close()


def test_state_that_grows_moves_to_a_bigger_segment_and_says_so(local_runtime, caplog):
    class Growing:
        def __init__(self):
            self.t = torch.zeros(10)

        def state_dict(self):
            return {"t": self.t}

        def load_state_dict(self, state):
            self.t = state["t"].clone()

    writer = SnapshotWriter(local_runtime)
    obj = Growing()
    ctx = context(local_runtime, writer)
    ctx.protect(buf=obj)
    ctx.snapshot()
    first = local_runtime.restore_source().segment
    obj.t = torch.arange(1_000_000, dtype=torch.float32)
    root = logging.getLogger("resilient")  # may not propagate (resilient.logs installs its own handler)
    root.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="resilient"):
            ctx.snapshot()
    finally:
        root.removeHandler(caplog.handler)
    second = local_runtime.restore_source().segment
    assert second != first
    assert "changed shape" in caplog.text and "outgrew segment" in caplog.text
    restored = Growing()
    context(local_runtime, writer).protect(buf=restored)
    assert torch.equal(restored.t, obj.t)
    writer.close()


def test_ddp_wrapped_and_plain_modules_share_snapshots(local_runtime):
    writer = SnapshotWriter(local_runtime)
    model, opt, _, _ = build()
    wrapped = torch.nn.DataParallel(model)  # unwrapped like DistributedDataParallel (no process group needed)
    ctx = context(local_runtime, writer)
    ctx.protect(model=wrapped)
    ctx.snapshot()
    plain = build(seed=9)[0]
    context(local_runtime, writer).protect(model=plain)
    assert state_hash({"m": plain}) == state_hash({"m": model})
    writer.close()


def test_state_hash_sees_one_flipped_bit():
    model = build()[0]
    before = state_hash({"model": model})
    with torch.no_grad():
        w = model[0].weight.view(-1).view(torch.int32)
        w[7] ^= 1
    assert state_hash({"model": model}) != before
