"""``@resilient.elastic(dedup=True)`` in-process over a real LocalRuntime (world size 1): the snapshot is
written sliced (marker tensor in the slot) and an in-process recovery restores it bit for bit; the
argument beats ``RESILIENT_DEDUP``."""

from __future__ import annotations


import resilient
from resilient.elastic.decorator import ElasticConfig
from resilient.replication.slices import marker_of
from resilient.runtime.local import LocalRuntime
from resilient.store import Segment
from tiny_training import build, reference_hash, step


def test_dedup_snapshot_restores_bit_exact_after_in_process_recovery(shm_dir):
    runtime = LocalRuntime()
    seen, markers = [], []

    @resilient.elastic(snapshot_every=1, runtime=lambda: runtime, dedup=True)
    def train(ctx):
        model, opt = build("adam")
        ctx.protect(model=model, optimizer=opt, epoch=3)
        seen.append(ctx.restored_step)
        for s in ctx.steps(8):
            step(model, opt)
            if s == 4 and ctx.generation == 0:
                src = runtime.restore_source()
                seg = Segment.open(src.segment)
                markers.append(marker_of(seg, seg.latest().slot))
                seg.close()
                runtime.request_generation()
        return resilient.state_hash({"model": model, "optimizer": opt})

    assert train() == reference_hash(8, "adam")
    assert seen == [None, 5]
    assert markers and (markers[0].rank, markers[0].world_size) == (0, 1)
    assert markers[0].hi == markers[0].total > 0


def test_dedup_defaults_to_the_environment(monkeypatch):
    import resilient.elastic.decorator as deco

    assert ElasticConfig().dedup is False
    configs = []

    class Driver:
        def __init__(self, fn, config, runtime) -> None:
            configs.append(config)

        def run(self, args, kwargs) -> None:
            return None

    monkeypatch.setattr(deco, "Driver", Driver)
    monkeypatch.setenv("RESILIENT_DEDUP", "1")
    resilient.elastic(lambda ctx: None)()
    resilient.elastic(dedup=False)(lambda ctx: None)()
    monkeypatch.delenv("RESILIENT_DEDUP")
    resilient.elastic(lambda ctx: None)()
    assert [c.dedup for c in configs] == [True, False, False]
