"""A snapshot never overwrites the local copy of the committed step, and never waits for a commit (the final one
excepted)."""

from __future__ import annotations

import pytest
import torch

from resilient.elastic import capture as cap
from resilient.elastic.context import Context
from resilient.elastic.snapshots import SnapshotWriter
from resilient.runtime.api import OverwriteAnswer
from resilient.runtime.local import LocalRuntime


def _context(runtime, **kw) -> tuple[Context, SnapshotWriter]:
    writer = SnapshotWriter(runtime)
    return Context(runtime=runtime, assignment=runtime.assignment(), device=torch.device("cpu"), writer=writer,
                   **kw), writer


class LaggingCommits(LocalRuntime):
    """A LocalRuntime whose commits are held back, like an agent still replicating the newest step."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.held: int | None = None

    def committed_step(self) -> int | None:
        return self.held


def test_a_snapshot_replaces_the_newest_uncommitted_one_rather_than_the_committed_copy(shm_dir):
    runtime = LaggingCommits()
    try:
        ctx, writer = _context(runtime, snapshot_every=1, seed=0)
        model = torch.nn.Linear(4, 2)
        ctx.protect(model=model)
        steps = ctx.steps(12)
        next(steps)  # step 0 runs
        next(steps)  # step 0 done -> snapshot of 1 (nothing committed yet)
        runtime.held = 1  # step 1 committed
        next(steps)  # snapshot of 2 goes into the other slot: step 1 stays
        assert {i.step for i in writer.segment.slots() if i.sealed} == {1, 2}
        # replication lags: 2 stays uncommitted, so the cadence thins snapshots (3: stride 2, not due;
        # 4: still pending, stride 4, due), and the one it takes replaces the uncommitted 2, never the committed 1
        next(steps)
        next(steps)
        assert {i.step for i in writer.segment.slots() if i.sealed} == {1, 4}
        assert writer.cadence.stride == 4
        runtime.held = 4  # seen one step after it was taken: fast enough to halve the stride again
        for _ in range(4):
            next(steps)  # 5, 6, 7 not due; 8 due: 4 is committed, so 8 goes into the slot of 1
        assert {i.step for i in writer.segment.slots() if i.sealed} == {4, 8}
        assert writer.cadence.stride == 2
        steps.close()
    finally:
        runtime.close()


class CommitsOnPoll(LaggingCommits):
    """Commits lag in the cheap view; asking the owner (``poll_committed``, ``before_overwrite``) sees them."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.released: int | None = None
        self.polls = 0
        self.beats = 0
        self.asked: list[str] = []  # segments a write asked about before overwriting
        self.skip_reason: str | None = None  # set: answer every question before an overwrite with skip

    def poll_committed(self) -> int | None:
        self.polls += 1
        return self.released if self.released is not None else self.held

    def before_overwrite(self, segment: str) -> OverwriteAnswer:
        self.asked.append(segment)
        if self.skip_reason is not None:
            return OverwriteAnswer(self.held, skip=True, reason=self.skip_reason)
        return OverwriteAnswer(self.poll_committed())

    def beat(self, step: int) -> None:
        self.beats += 1
        super().beat(step)


def test_the_owner_is_asked_before_the_newest_snapshot_is_overwritten(shm_dir):
    runtime = CommitsOnPoll()
    try:
        ctx, writer = _context(runtime, snapshot_every=1, seed=0)
        ctx.protect(model=torch.nn.Linear(4, 2))
        steps = ctx.steps(5)
        next(steps)
        next(steps)  # snapshot of 1
        runtime.held = 1
        next(steps)  # snapshot of 2 into the other slot
        runtime.released = 2  # step 2 commits, but only the owner knows it yet
        next(steps)  # snapshot of 3: the cheap view says 1, the owner says 2: step 1's slot is replaced
        assert runtime.asked == [writer.segment.name]
        assert {i.step for i in writer.segment.slots() if i.sealed} == {2, 3}
        assert writer.cadence.stride == 1, "the commit was there: no thinning"
        steps.close()
    finally:
        runtime.close()


def test_the_owner_is_asked_before_an_older_snapshot_committed_since_is_overwritten(shm_dir):
    """The chaos scenario partition-host: the cheap view lagged (16), the segment held 17 (committed just
    before, its only copy) and 18; the snapshot of 20 went to the slot not sealed last, over 17."""
    runtime = CommitsOnPoll()
    try:
        writer = SnapshotWriter(runtime)
        captured = cap.capture({"model": torch.nn.Linear(4, 2)})
        writer.write(captured, step=1, generation=1)
        writer.write(captured, step=2, generation=1)
        assert {i.step for i in writer.segment.slots() if i.sealed} == {1, 2}
        runtime.released = 1  # step 1 commits; the cheap view still says nothing was
        writer.write(captured, step=3, generation=1)
        assert runtime.asked == [writer.segment.name]  # only the write over a sealed step newer than the view
        assert {i.step for i in writer.segment.slots() if i.sealed} == {1, 3}
    finally:
        runtime.close()


def test_a_snapshot_the_owner_says_to_skip_writes_nothing_and_the_final_one_tries_again(event_log, shm_dir):
    """The owner could not withdraw the copy a write would go over (its commit lock held, etcd failing): the
    snapshot writes nothing and leaves both copies; the final snapshot of that step is written once the
    owner allows it."""
    runtime = CommitsOnPoll()
    try:
        ctx, writer = _context(runtime, snapshot_every=0, seed=0, commit_wait_s=5.0)
        ctx.protect(model=torch.nn.Linear(4, 2))
        steps = ctx.steps(3)
        next(steps)
        next(steps)
        assert ctx.snapshot() == 1
        next(steps)
        assert ctx.snapshot() == 2  # into the empty slot: nothing to ask
        assert runtime.asked == []
        with pytest.raises(StopIteration):
            next(steps)
        runtime.skip_reason = "etcd is down"
        assert ctx.snapshot() is None, "3 would go over 1 (uncommitted as far as anyone knows): skipped"
        assert {i.step for i in writer.segment.slots() if i.sealed} == {1, 2}
        assert [(e["step"], e["reason"]) for e in event_log("snapshot.skipped")] == [(3, "etcd is down")]
        runtime.skip_reason = None
        runtime.released = 3  # the final snapshot's step commits as soon as the owner is asked
        ctx._finish()
        assert {i.step for i in writer.segment.slots() if i.sealed} == {2, 3}
        assert runtime.asked == [writer.segment.name] * 2
        assert not event_log("snapshot.uncommitted")
    finally:
        runtime.close()


def test_the_final_snapshot_waits_for_its_commit_while_beating(event_log, shm_dir):
    runtime = CommitsOnPoll()
    try:
        ctx, writer = _context(runtime, snapshot_every=0, seed=0, commit_wait_s=60.0)
        ctx.protect(model=torch.nn.Linear(4, 2))
        for _ in ctx.steps(3):
            pass
        beats = runtime.beats

        def poll() -> int | None:
            runtime.polls += 1
            return 3 if runtime.polls >= 5 else None

        runtime.poll_committed = poll  # the final step commits after a few polls
        ctx._finish()
        assert runtime.polls >= 5 and runtime.beats > beats
        assert {i.step for i in writer.segment.slots() if i.sealed} == {3}
        assert not event_log("snapshot.uncommitted")
    finally:
        runtime.close()


def test_a_final_snapshot_that_never_commits_is_reported_after_the_wait(event_log, shm_dir):
    runtime = LaggingCommits()
    try:
        ctx, writer = _context(runtime, snapshot_every=0, seed=0, commit_wait_s=0.2)
        ctx.protect(model=torch.nn.Linear(4, 2))
        for _ in ctx.steps(2):
            pass
        ctx._finish()
        assert [e["step"] for e in event_log("snapshot.uncommitted")] == [2]
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
        stall = writer.write(small, step=1, generation=1)
        assert stall > 0 and runtime.stall == stall == writer.last_stall_s, "the stall is passed to the runtime"
        big = cap.capture({"m": torch.nn.Linear(512, 256)})  # far past the headroom
        writer.write(big, step=2, generation=1)
        with Segment.open(RecreatingRuntime.NAME) as seg:
            assert seg.latest().step == 2, "the write reached the runtime's current segment"
        assert len(runtime.asked) == 2 and runtime.asked[-1] > runtime.asked[0]
    finally:
        writer.close()
        runtime.close()
