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


class CommitsOnPoll(LaggingCommits):
    """Commits lag in the cheap view; asking the owner (``poll_committed``) sees them after a few polls."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.released: int | None = None
        self.polls = 0
        self.beats = 0

    def poll_committed(self) -> int | None:
        self.polls += 1
        if self.polls >= 3:
            self.held = self.released
        return self.held

    def beat(self, step: int) -> None:
        self.beats += 1
        super().beat(step)


def test_snapshot_waits_for_the_pending_commit_while_beating_instead_of_skipping(tmp_path, shm_dir):
    log = tmp_path / "events.jsonl"
    events.open_log(str(log))
    runtime = CommitsOnPoll()
    try:
        writer = SnapshotWriter(runtime)
        ctx = Context(runtime=runtime, assignment=runtime.assignment(), device=torch.device("cpu"),
                      writer=writer, snapshot_every=1, seed=0, commit_wait_s=60.0)
        ctx.protect(model=torch.nn.Linear(4, 2))
        steps = ctx.steps(5)
        next(steps)
        next(steps)  # snapshot of 1
        runtime.held = 1
        next(steps)  # snapshot of 2 into the other slot
        runtime.released = 2  # step 2 commits, but only the owner knows it yet
        beats_before = runtime.beats
        next(steps)  # snapshot of 3 waits for the commit of 2 (beating), then replaces step 1's slot
        assert {i.step for i in writer.segment.slots() if i.sealed} == {2, 3}
        assert runtime.polls >= 3 and runtime.beats > beats_before + 1
        assert not [e for e in events.read(str(log)) if e["kind"] == "snapshot.skipped"]
        steps.close()
    finally:
        events.open_log(None)
        runtime.close()


def test_a_pending_step_of_an_older_generation_never_blocks_the_next_snapshot(shm_dir):
    runtime = LaggingCommits()
    try:
        writer = SnapshotWriter(runtime)
        ctx = Context(runtime=runtime, assignment=runtime.assignment(), device=torch.device("cpu"),
                      writer=writer, snapshot_every=1, seed=0)
        ctx.protect(model=torch.nn.Linear(4, 2))
        steps = ctx.steps(4)
        next(steps)
        next(steps)  # snapshot of 1
        runtime.held = 1
        next(steps)  # snapshot of 2 (uncommitted), step 1 in the other slot
        gen = runtime.assignment().generation
        assert writer.overwrites_committed(gen)
        # commits are fenced by generation: step 2 of generation `gen` can never commit once gen+1 formed
        assert not writer.overwrites_committed(gen + 1)
        steps.close()
    finally:
        runtime.close()


class RecreatingRuntime(LocalRuntime):
    """Gives one segment name and recreates it, larger, under the same name when asked for more room
    (what the agent's shard store does)."""

    NAME = "rsl-test-recreated"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seg = None
        self.asked: list[int] = []

    def segment_for(self, nbytes: int) -> str:
        from resilient.store import Segment

        self.asked.append(nbytes)
        if self.seg is None or self.seg.capacity < nbytes:
            if self.seg is not None:
                self.seg.unlink()
            self.seg = Segment.create(self.NAME, nbytes, job="t", rank=0)
        return self.NAME

    def sealed(self, step, generation, nbytes, stall_s=None) -> None:
        self.stall = stall_s

    def close(self) -> None:
        if self.seg is not None:
            self.seg.unlink()
        super().close()


def test_a_segment_recreated_larger_under_the_same_name_is_mapped_again(shm_dir):
    from resilient.elastic import capture as cap
    from resilient.store import Segment

    runtime = RecreatingRuntime()
    writer = SnapshotWriter(runtime)
    try:
        small = cap.capture({"m": torch.nn.Linear(4, 2)})
        writer.write(small, step=1, generation=1)
        assert runtime.stall is not None and runtime.stall >= 0, "the stall is passed to the runtime"
        big = cap.capture({"m": torch.nn.Linear(512, 256)})  # far past the headroom
        writer.write(big, step=2, generation=1)
        with Segment.open(RecreatingRuntime.NAME) as seg:
            assert seg.latest().step == 2, "the write reached the runtime's current segment"
        assert len(runtime.asked) == 2 and runtime.asked[-1] > runtime.asked[0]
    finally:
        writer.close()
        runtime.close()
