"""A snapshot never overwrites the only local copy of the committed step while a newer one is unreplicated."""

from __future__ import annotations

import torch

from resilient import events
from resilient.elastic.context import Context
from resilient.elastic.snapshots import SnapshotWriter
from resilient.runtime.local import LocalRuntime


class LaggingCommits(LocalRuntime):
    """A LocalRuntime whose commits are held back, like an agent still replicating the newest step."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.held: int | None = None

    def committed_step(self) -> int | None:
        return self.held


def test_snapshot_is_skipped_rather_than_overwrite_the_committed_copy(tmp_path, shm_dir):
    log = tmp_path / "events.jsonl"
    events.open_log(str(log))
    runtime = LaggingCommits()
    try:
        writer = SnapshotWriter(runtime)
        ctx = Context(runtime=runtime, assignment=runtime.assignment(), device=torch.device("cpu"),
                      writer=writer, snapshot_every=1, seed=0)
        model = torch.nn.Linear(4, 2)
        ctx.protect(model=model)
        steps = ctx.steps(5)
        next(steps)  # step 0 runs
        next(steps)  # step 0 done -> snapshot of 1 (nothing committed yet: free to write)
        runtime.held = 1  # step 1 committed
        next(steps)  # snapshot of 2 goes into the other slot: step 1 stays
        assert writer.overwrites_committed(), "slot of committed step 1 is the next write target"
        next(steps)  # snapshot of 3 would overwrite step 1 while step 2 is uncommitted: skipped
        slots = {info.step for info in writer.segment.slots() if info.sealed}
        assert slots == {1, 2}
        runtime.held = 2
        assert not writer.overwrites_committed()
        next(steps)  # snapshot of 4 replaces step 1's slot now that 2 is committed
        slots = {info.step for info in writer.segment.slots() if info.sealed}
        assert slots == {2, 4}
        skipped = [e for e in events.read(str(log)) if e["kind"] == "snapshot.skipped"]
        assert [e["step"] for e in skipped] == [3]
        steps.close()
    finally:
        events.open_log(None)
        runtime.close()
