"""Pure pieces of the agent: the hang decision, the worker environment, the exit summary."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given
from hypothesis import strategies as st

from resilient.agent import hang
from resilient.agent.summary import Failure, render
from resilient.agent.worker_env import AgentPaths, worker_environment
from resilient.runtime.api import WorkerAssignment
from tests.agent.conftest import agent_runtime, one_rank_assignment

S = 1_000_000_000


def _decide(**kw):
    args = dict(now_ns=100 * S, beats=5, beat_mono_ns=90 * S, state="running", generation_handed_ns=0,
                hang_timeout=5.0, round_pending=False)
    args.update(kw)
    return hang.decide(**args)


def test_silent_worker_is_hung_after_the_timeout():
    assert _decide().hung and _decide().beat_age_s == 10.0
    assert not _decide(beat_mono_ns=96 * S).hung


def test_no_hang_before_the_first_beat_or_when_off_or_while_recovering():
    assert not _decide(beats=0).hung
    assert not _decide(hang_timeout=None).hung
    assert not _decide(state="recovering").hung
    assert not _decide(round_pending=True).hung


def test_a_new_generation_restarts_the_clock():
    assert not _decide(generation_handed_ns=98 * S).hung


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**12), st.floats(0.2, 100))
def test_hung_iff_age_exceeds_timeout(now, beat, handed, timeout):
    v = _decide(now_ns=now, beat_mono_ns=beat, generation_handed_ns=handed, hang_timeout=timeout)
    assert v.hung == (max(0.0, (now - max(beat, handed)) / 1e9) > timeout)


def test_stopped_worker_is_more_suspicious_than_one_blocked_in_a_collective():
    assert hang.suspicion("T") < hang.suspicion("R") < hang.suspicion("S")


def test_only_a_worker_still_running_an_announced_generation_must_leave():
    assert hang.must_leave(state="running", beats=7, generation=1, target=2)
    assert not hang.must_leave(state="running", beats=7, generation=2, target=2), "it took up the new generation"
    assert not hang.must_leave(state="recovering", beats=7, generation=1, target=2), "it left: waiting for the next"
    assert not hang.must_leave(state="starting", beats=0, generation=0, target=2), "not registered: reads it at start"
    assert not hang.must_leave(state="running", beats=0, generation=1, target=2), "still setting up, before its loop"
    assert not hang.must_leave(state="done", beats=7, generation=1, target=2)


def test_the_leave_clock_counts_checks_while_the_worker_must_leave_and_restarts_when_it_left():
    clock = hang.LeaveClock()
    assert clock.tick(10 * S, must=True, gap_cap_s=1.0) == 0.0, "the first check starts the clock"
    assert clock.tick(10 * S + S // 2, must=True, gap_cap_s=1.0) == 0.5
    assert clock.tick(11 * S, must=True, gap_cap_s=1.0) == 1.0
    assert clock.tick(12 * S, must=False, gap_cap_s=1.0) == 0.0, "it left"
    assert clock.tick(13 * S, must=True, gap_cap_s=1.0) == 0.0
    assert clock.tick(13 * S + S // 10, must=True, gap_cap_s=1.0) == 0.1


def test_a_pause_of_the_host_counts_as_one_capped_gap_not_its_length():
    clock = hang.LeaveClock()
    clock.tick(0, must=True, gap_cap_s=1.0)
    assert clock.tick(3600 * S, must=True, gap_cap_s=1.0) == 1.0, "an hour's SIGSTOP of agent and workers alike"
    assert clock.tick(3600 * S + S // 2, must=True, gap_cap_s=1.0) == 1.5


@given(st.lists(st.tuples(st.integers(0, 5 * S), st.booleans()), max_size=50), st.floats(0.1, 10))
def test_the_leave_clock_is_the_capped_time_since_the_worker_last_had_left(steps, cap):
    clock, now, expected, last = hang.LeaveClock(), 0, 0.0, None
    for gap, must in steps:
        now += gap
        if not must:
            expected, last = 0.0, None
        else:
            if last is not None:
                expected += min(gap / 1e9, cap)
            last = now
        assert abs(clock.tick(now, must, gap_cap_s=cap) - expected) < 1e-6


def test_worker_environment_follows_torchrun_and_adds_resilient():
    a = WorkerAssignment(generation=3, rank=5, local_rank=1, world_size=8, local_world_size=4, group_rank=1,
                         master_addr="10.0.0.1", master_port=29500, restart_count=2, job_id="j", node_id="n1")
    paths = AgentPaths(agent_socket="/s", control_file="/c", error_file="/e.json", event_log=None)
    e = worker_environment({"PATH": "/bin"}, a, group_world_size=2, max_restarts=3, snapshot_every=1, paths=paths)
    assert (e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"]) == ("5", "1", "8", "4", "1")
    assert (e["MASTER_ADDR"], e["MASTER_PORT"], e["TORCHELASTIC_RESTART_COUNT"]) == ("10.0.0.1", "29500", "2")
    assert e["TORCHELASTIC_USE_AGENT_STORE"] == "True" and e["TORCHELASTIC_ERROR_FILE"] == "/e.json"
    assert (e["RESILIENT_GENERATION"], e["RESILIENT_AGENT_SOCKET"], e["RESILIENT_JOB_ID"]) == ("3", "/s", "j")
    assert e["OMP_NUM_THREADS"] == "1" and e["PATH"] == "/bin"
    assert worker_environment({"OMP_NUM_THREADS": "4"}, a, group_world_size=2, max_restarts=3, snapshot_every=1,
                              paths=paths)["OMP_NUM_THREADS"] == "4"
    assert e["ROLE_NAME"] == "default"
    trainer = worker_environment({}, a, group_world_size=2, max_restarts=3, snapshot_every=1, paths=paths,
                                 role="trainer")
    assert (trainer["ROLE_NAME"], trainer["ROLE_RANK"], trainer["ROLE_WORLD_SIZE"]) == ("trainer", "5", "8")


def test_summary_names_the_first_failure_with_its_traceback(tmp_path):
    err = tmp_path / "error.json"
    err.write_text(json.dumps({"message": {"message": "ValueError: boom", "extraInfo": {
        "py_callstack": "Traceback (most recent call last):\n  File \"train.py\", line 3\nValueError: boom\n"}}}))
    f = Failure(rank=3, local_rank=1, node="n2", pid=42, exitcode=-9, generation=4, when=0.0, error_file=str(err))
    text = render(job="j", node="n2", exit_code=1, outcome="failed", first=f, restarts=3, generation=4,
                  committed_step=17)
    assert "rank 3 (local 1) on node n2, pid 42: signal SIGKILL" in text
    assert "ValueError: boom" in text and "committed step: 17" in text
    assert len(text.splitlines()) < 40


def test_metrics_are_served_over_http():
    import urllib.request

    from resilient.agent.metrics import AgentMetrics

    m = AgentMetrics()
    port = m.serve(0)
    try:
        m.generation.set(7)
        m.recovery.labels("rendezvous").set(0.25)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    assert "resilient_generation 7.0" in text
    assert 'resilient_recovery_seconds{phase="rendezvous"} 0.25' in text


def test_nnodes_min_above_max_is_reported_as_such_not_as_non_integers():
    import pytest

    from resilient.config import NodeRange
    from resilient.errors import ConfigError

    with pytest.raises(ConfigError, match="MIN must not exceed MAX") as info:
        NodeRange.parse("3:2")
    assert "integers" not in str(info.value)
    with pytest.raises(ConfigError, match="integers"):
        NodeRange.parse("a:2")
    assert NodeRange.parse("2") == NodeRange(2, 2) and NodeRange.parse("1:4") == NodeRange(1, 4)


def _write(snaps, shm_dir: str, rank: int, step: int, generation: int, keep: int | None = None) -> None:
    """What a worker does before it reports a seal: write a snapshot into its segment and seal it."""
    import torch

    from resilient.store import Segment

    seg = Segment.open(snaps.segment_for(rank, 4096), shm_dir)
    try:
        seg.write({"w": torch.full((8,), float(step))}, step=step, generation=generation, meta=b"", keep_step=keep)
        seg.seal()
    finally:
        seg.close()


@contextlib.contextmanager
def _two_ranks(tmp_path, job: str, step: int):
    """LocalSnapshots of two local ranks in generation 1 that both sealed, and so committed, ``step``."""
    from resilient.agent.snapshots import LocalSnapshots

    shm = str(tmp_path)
    snaps = LocalSnapshots(job=job, node="n0", shm_dir=shm)
    try:
        snaps.on_generation((0, 1), 2, generation=1)
        for rank in (0, 1):
            _write(snaps, shm, rank, step, 1)
            snaps.on_sealed(rank, step, 1, 100)
        assert snaps.committed_step() == step
        yield snaps, shm
    finally:
        snaps.close(unlink=True)


def test_a_late_seal_of_an_ended_generation_never_moves_the_committed_step(tmp_path):
    with _two_ranks(tmp_path, "fence-test", 5) as (snaps, shm):
        for rank in (0, 1):
            _write(snaps, shm, rank, 6, 1, keep=5)
        snaps.on_generation((0, 1), 2, generation=2)
        # both seals of step 6 were sent in generation 1 and arrive after generation 2 formed
        assert snaps.on_sealed(0, 6, 1, 100) is None and snaps.on_sealed(1, 6, 1, 100) is None
        assert snaps.committed_step() == 5
        assert snaps.prepare_restore(0).step == 5 and snaps.prepare_restore(1).step == 5
        for rank in (0, 1):
            _write(snaps, shm, rank, 6, 2, keep=5)
        snaps.on_sealed(0, 6, 2, 100)
        assert snaps.on_sealed(1, 6, 2, 100) == 6, "seals of the current generation commit"


def test_a_step_one_rank_already_wrote_over_is_never_committed(tmp_path):
    """Rank 1's seal of step 2 reaches the agent after rank 0 sealed 3 over its uncommitted 2 (it keeps the
    committed 1): step 2 is not committed (rank 0's copy is gone); 3 is, once both hold it."""
    with _two_ranks(tmp_path, "overwrite-test", 1) as (snaps, shm):
        _write(snaps, shm, 0, 2, 1, keep=1)
        snaps.on_sealed(0, 2, 1, 100)
        _write(snaps, shm, 0, 3, 1, keep=1)  # over 2: the slot of 1 is kept
        snaps.on_sealed(0, 3, 1, 100)
        _write(snaps, shm, 1, 2, 1, keep=1)
        assert snaps.on_sealed(1, 2, 1, 100) is None
        assert snaps.committed_step() == 1 and snaps.prepare_restore(0).step == 1
        _write(snaps, shm, 1, 3, 1, keep=1)
        assert snaps.on_sealed(1, 3, 1, 100) == 3


def _write_as_worker(snaps, shm_dir: str, rank: int, step: int, generation: int) -> None:
    """What a worker does when its write would go over a step newer than its view of the committed one: ask
    the agent first (``keep_for``, ``before_overwrite``), then write keeping the step it answered."""
    from resilient.elastic.snapshots import keep_for
    from resilient.store import Segment

    name = snaps.segment_for(rank, 4096)
    seg = Segment.open(name, shm_dir)
    try:
        answer = keep_for(seg, None, lambda: snaps.before_overwrite(rank, name))  # a view that knows nothing
        assert not answer.skip
        seg.write({"w": _filled(step)}, step=step, generation=generation, meta=b"", keep_step=answer.committed)
        seg.seal()
    finally:
        seg.close()


def _filled(step: int):
    import torch

    return torch.full((8,), float(step))  # what _write writes


def test_a_step_is_not_committed_on_a_copy_its_worker_is_about_to_overwrite(tmp_path):
    """Rank 0 asked before writing 3 over its uncommitted 2 (the write has not started: its segment still
    holds 2); rank 1's seal of 2 arrives now. Step 2 must not commit: the copy rank 0 is overwriting would be
    the only one. Without the withdrawal, 2 committed and the write of 3 then destroyed it."""
    from resilient.store import Segment

    with _two_ranks(tmp_path, "withdraw-test", 1) as (snaps, shm):
        _write(snaps, shm, 0, 2, 1, keep=1)
        snaps.on_sealed(0, 2, 1, 100)
        assert snaps.before_overwrite(0, snaps.segment_for(0, 4096)).committed == 1
        seg0 = Segment.open(snaps.segment_for(0, 4096), shm)
        try:
            assert seg0.sealed_slot(2, 1) is not None, "the write of 3 has not begun"
        finally:
            seg0.close()
        _write(snaps, shm, 1, 2, 1, keep=1)
        assert snaps.on_sealed(1, 2, 1, 100) is None
        assert snaps.committed_step() == 1
        _write(snaps, shm, 0, 3, 1, keep=1)  # the write it asked for: over 2, keeping 1
        snaps.on_sealed(0, 3, 1, 100)
        _write(snaps, shm, 1, 3, 1, keep=1)
        assert snaps.on_sealed(1, 3, 1, 100) == 3


def test_a_commit_before_the_question_keeps_the_committed_copy(tmp_path):
    """The other order: rank 1's seal commits 2 first; rank 0's question is then answered with 2, so its
    write of 3 goes over 1 and the committed copy of 2 stays (a step sealed anew after a withdrawal counts)."""
    from resilient.store import Segment

    with _two_ranks(tmp_path, "withdraw-order", 1) as (snaps, shm):
        for rank in (0, 1):
            _write(snaps, shm, rank, 2, 1, keep=1)
        snaps.on_sealed(0, 2, 1, 100)
        assert snaps.on_sealed(1, 2, 1, 100) == 2
        _write_as_worker(snaps, shm, 0, 3, 1)
        seg0 = Segment.open(snaps.segment_for(0, 4096), shm)
        try:
            assert {i.step for i in seg0.slots() if i.sealed} == {2, 3}
            assert seg0.read(step=2).tensors["w"].eq(2.0).all()
        finally:
            seg0.close()
        _write_as_worker(snaps, shm, 0, 3, 1)  # the same step written again, over its withdrawn copy
        snaps.on_sealed(0, 3, 1, 100)
        _write(snaps, shm, 1, 3, 1, keep=2)
        assert snaps.on_sealed(1, 3, 1, 100) == 3, "the copy sealed anew counts"


def test_a_segment_grown_for_a_larger_snapshot_keeps_the_committed_copy(tmp_path):
    """A worker's state outgrows its segment: the agent's new, larger segment starts with the committed step,
    so a crash before the next commit still restores it."""
    from resilient.store import Segment

    with _two_ranks(tmp_path, "grow-test", 5) as (snaps, shm):
        old = snaps.segment_for(0, 4096)
        new = snaps.segment_for(0, 1 << 22)
        assert new != old
        src = snaps.prepare_restore(0)
        assert (src.step, src.segment, src.source_rank) == (5, new, 0)
        seg = Segment.open(new, shm)
        try:
            assert seg.capacity >= 1 << 22
            assert _filled(5).equal(seg.read(step=5).tensors["w"])
        finally:
            seg.close()


class _NoSnapshots:
    def committed_step(self):
        return None

    def on_sealed(self, rank, step, generation, nbytes):
        return None


def test_the_hang_clock_stays_off_from_recovery_until_the_first_beat_of_the_step_loop(tmp_path):
    with agent_runtime(tmp_path, _NoSnapshots) as (hub, control, runtime):
        runtime.beat(3)
        hub.publish(2, {0: one_rank_assignment(2)})
        assert runtime.wait_for_generation(after=1, timeout=10).generation == 2
        # process-group set-up and restore run now: the worker is still "recovering", never hung
        assert control.state() == "recovering"
        assert not _decide(state=control.state(), beats=control.get("beats")).hung
        runtime.beat(3)  # top of the step loop
        assert control.state() == "running"


def test_a_sealed_snapshot_reports_its_stall_to_the_agent_metric(tmp_path):
    from resilient.agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    with agent_runtime(tmp_path, _NoSnapshots, on_stall=metrics.snapshot_stall.observe) as (_hub, _control, runtime):
        runtime.sealed(1, 1, 100, stall_s=0.25)
        runtime.sealed(2, 1, 100)  # not measured: not observed
        runtime.flush()
        count = metrics.registry.get_sample_value("resilient_snapshot_stall_seconds_count")
        total = metrics.registry.get_sample_value("resilient_snapshot_stall_seconds_sum")
        assert (count, total) == (1.0, 0.25)


def _closed_agent(status: str | None, handles: dict, finished: set):
    """The agent's close handling alone (a NodeAgent without its processes: a FakeKV holding the close record
    of ``status``, None: the job is not closed)."""
    from types import SimpleNamespace

    from resilient.agent.agent import NodeAgent
    from resilient.agent.hub import WorkerHub
    from resilient.etcd.fake import FakeKV
    from resilient.keys import JobKeys

    agent = object.__new__(NodeAgent)
    agent.kv, agent.keys, agent.hub, agent._closed = FakeKV(), JobKeys("j"), WorkerHub(), None
    if status is not None:
        agent.kv.put(agent.keys.closed, json.dumps({"status": status, "reason": "node a finished"}).encode())
    # every worker reached its step loop (its control block counts beats), unless a test says otherwise
    agent.handles = {slot: SimpleNamespace(alive=alive, rank=slot, control=SimpleNamespace(get=lambda name: 1))
                     for slot, alive in handles.items()}
    agent.finished = finished
    return agent


def test_a_job_closed_while_this_nodes_workers_are_dead_ends_the_agent():
    # the rest of the job finished while this node was cut off: its worker was killed as hung and no
    # generation will restart it; the agent used to wait for it forever
    agent = _closed_agent("succeeded", {0: False}, set())
    assert agent._ended() is None, "not closed yet: a generation may still restart the worker"
    agent._on_closed()
    assert agent.hub.wait(0, after=0, timeout=0).status == "closed", "workers waiting for a generation are told"
    code, outcome = agent._ended()
    assert code == 0 and outcome.startswith("job closed (succeeded")
    unknown = _closed_agent("unknown", {0: False}, set())
    unknown._on_closed()
    assert unknown._ended()[0] == 1


def test_a_job_closed_while_a_worker_of_this_node_runs_waits_for_it():
    agent = _closed_agent("succeeded", {0: True, 1: False}, {1})
    agent._on_closed()
    assert agent._ended() is None, "the live worker finishes first"
    agent.handles[0].alive = False
    agent.finished.add(0)
    agent._succeeded = lambda: (0, "succeeded")  # its exits (persist, leave) are not what this test is about
    assert agent._ended() == (0, "succeeded"), "all finished: the loop's success path, not the close"


def test_a_worker_that_never_reached_its_step_loop_is_stopped_when_the_job_finishes():
    # chaos kill-at-repl-commit-after-txn: the restarted node rejoined as the other node's workers finished
    # the last step; its fresh worker, in the generation formed for the join, waited for peers that were gone,
    # and the agent waited for that worker until the harness's deadline
    from types import SimpleNamespace

    agent = _closed_agent("succeeded", {0: True, 1: True}, set())
    agent.handles[1].control = SimpleNamespace(get=lambda name: 0)  # no beat yet: never reached its loop
    agent.s = SimpleNamespace(timeouts=SimpleNamespace(term_grace=5.0))
    stopped = []

    def stop(handles, grace):
        stopped.append(([h.rank for h in handles], grace))
        for h in handles:
            h.alive, h.stopping = False, True

    agent.supervisor = SimpleNamespace(stop=stop)
    agent._on_closed()
    assert stopped == [([1], 5.0)]
    assert agent._ended() is None, "the worker that took part finishes its last step first"
    agent.handles[0].alive = False
    agent.finished.add(0)
    code, outcome = agent._ended()
    assert code == 0 and outcome.startswith("job closed (succeeded")


def test_a_worker_failing_after_the_close_ends_the_agent_once_none_runs():
    # the close arrived while a worker ran (the agent waited for it); that worker then failed: no generation
    # will restart it, and the agent leaves with the closed job's outcome instead of waiting forever
    agent = _closed_agent("succeeded", {0: True}, set())
    agent._on_closed()
    assert agent._ended() is None
    agent.handles[0].alive = False  # failed, not finished
    code, outcome = agent._ended()
    assert code == 0 and outcome.startswith("job closed (succeeded")


def test_a_job_closed_as_failed_elsewhere_ends_the_agent_at_once():
    import pytest

    from resilient.agent.agent import _Exit

    with pytest.raises(_Exit) as ended:
        _closed_agent("failed", {0: True}, set())._on_closed()
    assert ended.value.code == 1


def test_a_failure_while_cut_off_from_etcd_still_starts_a_round_uncharged():
    # the partition-host chaos scenario: the cut-off node's hung worker is killed; publishing the fault and
    # charging the restart both fail (etcd unreachable); the agent used to crash here
    import threading
    from types import SimpleNamespace

    from resilient.agent.agent import NodeAgent
    from resilient.agent.metrics import AgentMetrics
    from resilient.agent.waker import Waker
    from resilient.errors import EtcdUnavailableError

    class CutOff:
        def publish_fault(self, *_a, **_k):
            raise EtcdUnavailableError("etcd unreachable")

        def consume_restart(self, _reason):
            raise EtcdUnavailableError("etcd unreachable")

    agent = object.__new__(NodeAgent)
    agent.s = SimpleNamespace(node_id="h1")
    agent.assignment = SimpleNamespace(generation=1)
    agent.rdzv, agent.metrics, agent._wake = CutOff(), AgentMetrics(), Waker()
    agent._round_lock, agent._round, agent._fault_gens = threading.Lock(), None, set()
    agent.first_failure, agent.restarts, agent.handles, agent.finished = None, 0, {}, set()
    worker = SimpleNamespace(rank=1, pid=4242, exitcode=-9, stopping=False, reaped=True, error_file="",
                             killed_for="hung")
    agent._on_exit(0, worker)
    assert agent._round is not None and agent._round.reason == "fault:h1", "the node recovers (rejoins)"
    assert agent.restarts == 0, "nothing was charged"
    assert agent.first_failure.rank == 1


def test_a_pending_generation_is_announced_to_workers_still_starting(tmp_path):
    # a worker spawned for a generation that ended during the hand-off has not registered yet; it must
    # still learn that its generation is over, or it waits in the gather for peers that left
    from types import SimpleNamespace

    from resilient.agent.agent import NodeAgent
    from resilient.runtime.control import ControlBlock

    agent = object.__new__(NodeAgent)
    starting = ControlBlock.create(str(tmp_path / "control-0"), 3)
    running = ControlBlock.create(str(tmp_path / "control-1"), 3)
    try:
        agent.handles = {0: SimpleNamespace(alive=True, registered=False, control=starting),
                         1: SimpleNamespace(alive=True, registered=True, control=running)}
        agent._announce_pending(3, failed=False)  # a node joins: the snapshots of generation 3 may still commit
        assert starting.get("target_generation") == 4 and running.get("target_generation") == 4
        assert starting.get("failed_generation") == -1 and running.get("failed_generation") == -1
        agent._announce_pending(3, failed=True)  # a member failed: their snapshot copies stop
        assert starting.get("failed_generation") == 3 and running.get("failed_generation") == 3
    finally:
        starting.unlink()
        running.unlink()
