"""The step loop's snapshot stops part-way when a member of its generation fails: a worker's
``AgentRuntime`` (against a real ``WorkerService`` and ``LocalSnapshots``) hands the writer its control
block's ``failed_generation``; the agent marks it (``ControlBlock.mark_failed``) when a member fails.
Such a snapshot could never commit, and the recovery would wait for the rest of the copy."""

from __future__ import annotations

import pytest
import torch

from resilient.agent.snapshots import LocalSnapshots
from resilient.elastic.context import Context
from resilient.elastic.snapshots import SnapshotWriter
from resilient.errors import GenerationChangedError
from tests.agent.conftest import agent_runtime


@pytest.fixture
def snapshots(shm_dir):
    snaps = LocalSnapshots(job="stopjob", node="n0", shm_dir=shm_dir)
    snaps.on_generation((0,), 1, generation=1)
    yield snaps
    snaps.close()


def _context(runtime, writer) -> Context:
    ctx = Context(runtime=runtime, assignment=runtime.assignment(), device=torch.device("cpu"), writer=writer,
                  snapshot_every=0, seed=0)
    ctx.protect(model=torch.nn.Linear(512, 512))
    return ctx


def test_a_member_failure_stops_the_loops_snapshot_and_keeps_the_committed_one(tmp_path, snapshots, event_log):
    with agent_runtime(tmp_path, lambda: snapshots) as (_hub, control, runtime):
        writer = SnapshotWriter(runtime)
        try:
            ctx = _context(runtime, writer)
            assert ctx.snapshot() == 0
            runtime.flush()
            assert snapshots.committed_step() == 0
            ctx._completed = 1
            control.mark_failed(1)  # the agent: a member of generation 1 failed
            with pytest.raises(GenerationChangedError, match="a member failed.*snapshot of step 1"):
                ctx._snapshot(stoppable=True)
            [stopped] = event_log("snapshot.stopped")
            assert (stopped["step"], stopped["gen"]) == (1, 1)
            assert [e["step"] for e in event_log("snapshot.sealed")] == [0]
            runtime.flush()
            assert snapshots.committed_step() == 0
            latest = writer.segment.latest()
            assert (latest.step, latest.generation) == (0, 1)
        finally:
            writer.close()


def test_snapshots_outside_the_loop_and_of_a_healthy_generation_run_to_the_end(tmp_path, snapshots, event_log):
    with agent_runtime(tmp_path, lambda: snapshots) as (_hub, control, runtime):
        writer = SnapshotWriter(runtime)
        try:
            ctx = _context(runtime, writer)
            assert ctx._snapshot(stoppable=True) == 0  # nothing failed: the loop's snapshot seals
            control.raise_target(2)  # a newer generation without a failure (a node joins)
            ctx._completed = 1
            assert ctx._snapshot(stoppable=True) == 1
            control.mark_failed(1)
            ctx._completed = 2
            assert ctx.snapshot() == 2  # on demand (and the final snapshot): copied to its end
            assert [e["step"] for e in event_log("snapshot.sealed")] == [0, 1, 2]
            assert event_log("snapshot.stopped") == []
            assert writer.segment.latest().step == 2
        finally:
            writer.close()
