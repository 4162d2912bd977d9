"""Every interleaving of two workers' snapshots with the agent's commits keeps a copy of the committed step.

Real ``LocalSnapshots`` and real segments; hypothesis picks the order of what happens: a worker's view
of the committed step refreshed (the control block the agent rewrites now and then), a worker asking
before it overwrites (``SnapshotWriter.keep_step``'s rule), starting its write (the slot is invalidated
and filled), sealing it, and a seal report reaching the agent (asynchronous, in order per rank). After
every action, each rank's segment must hold a sealed copy of the committed step: nothing committed is
lost, whatever the timing. Without the withdrawal in ``before_overwrite`` hypothesis finds the order that
breaks it (the other rank's report commits a step between the question and the write over it)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient.elastic.snapshots import keep_for

RANKS = (0, 1)
SNAPSHOTS = 5  # per rank
GEN = 1


class Worker:
    """One rank's snapshot loop, one action at a time: ask (when the rule says so), write, seal."""

    def __init__(self, snaps, shm: str, rank: int) -> None:
        from resilient.store import Segment

        self.snaps, self.rank = snaps, rank
        self.name = snaps.segment_for(rank, 4096)
        self.seg = Segment.open(self.name, shm)
        self.view: int | None = None  # its cheap view of the committed step (the control block)
        self.step = 1
        self.keep: int | None = None
        self.phase = "ask"
        self.reports: list[int] = []  # seals sent, not yet delivered to the agent

    @property
    def done(self) -> bool:
        return self.step > SNAPSHOTS

    def act(self) -> None:
        import torch

        if self.phase == "ask":  # SnapshotWriter.keep_step's rule
            answer = keep_for(self.seg, self.view, lambda: self.snaps.before_overwrite(self.rank, self.name))
            assert not answer.skip
            self.keep = answer.committed
            self.phase = "write"
        elif self.phase == "write":  # the slot is invalidated and filled; not sealed yet
            self.seg.write({"w": torch.full((8,), float(self.step))}, step=self.step, generation=GEN, meta=b"",
                           keep_step=self.keep)
            self.phase = "seal"
        else:
            self.seg.seal()
            self.reports.append(self.step)
            self.step += 1
            self.phase = "ask"


def _check(snaps, workers) -> None:
    committed = snaps.committed_step()
    if committed is None:
        return
    for w in workers:
        assert w.seg.sealed_slot(committed, GEN) is not None, (
            f"step {committed} is committed but rank {w.rank}'s segment holds no copy of it "
            f"(slots: {[(i.step, i.sealed) for i in w.seg.slots()]})")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choices=st.lists(st.integers(min_value=0, max_value=5), min_size=80, max_size=80))
def test_no_interleaving_loses_the_committed_copy(tmp_path_factory, choices):
    """Choice k: 0/1 advance worker k, 2/3 deliver worker k-2's oldest report, 4/5 refresh worker k-4's view."""
    from resilient.agent.snapshots import LocalSnapshots

    shm = str(tmp_path_factory.mktemp("interleave"))
    snaps = LocalSnapshots(job="interleave", node="n0", shm_dir=shm)
    snaps.on_generation(RANKS, len(RANKS), generation=GEN)
    workers = [Worker(snaps, shm, r) for r in RANKS]
    try:
        for k in choices:
            w = workers[k % 2]
            if k < 2 and not w.done:
                w.act()
            elif 2 <= k < 4 and w.reports:
                snaps.on_sealed(w.rank, w.reports.pop(0), GEN, 100)
            elif k >= 4:
                w.view = snaps.committed_step()
            _check(snaps, workers)
        for w in workers:  # the rest in a fixed order: every report delivered
            while not w.done:
                w.act()
                _check(snaps, workers)
            while w.reports:
                snaps.on_sealed(w.rank, w.reports.pop(0), GEN, 100)
                _check(snaps, workers)
        # every seal delivered: the last step commits (the checks above ran against real commits)
        assert snaps.committed_step() == SNAPSHOTS
    finally:
        for w in workers:
            w.seg.close()
        snaps.close(unlink=True)
